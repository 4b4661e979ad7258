"""The core process: store, engine and web service wired from a Config.

``Core`` is what `alienec2 core` runs and what the integration tests start on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from core.api.admin import create_admin_app, token_gate
from core.api.agent import create_agent_app, network_guard
from core.api.limits import (
    admin_limits,
    agent_limits,
    follow_pool_bounds,
    warn_if_open_files_short,
)
from core.api.longpoll import Changes
from core.api.server import EmbeddedServer, make_server, tcp_socket, unix_socket
from core.clock import CoreClock
from core.clouds import CloudProvider
from core.clouds.ec2 import EC2Provider
from core.config import Config, ConfigError
from core.engine import Clock, Engine
from core.liveness import Liveness
from core.lock import StateLock
from core.model import EventKind, VMState
from core.queues import demand_source
from core.service import PoolService
from core.store import Store
from core.systemd import Notifier

FULL_COLLECTION_EVERY = 1000  # gen-1 collections per full one (CPython's default: 10)

log = logging.getLogger("alienec2.core")

# What SIGHUP can change without a restart, and what only a restart applies.
LIVE_SECTIONS = ("pool", "clouds", "queue", "contextualisation")
RESTART_SECTIONS = ("core_id", "web", "admin", "state")


def build_engine(
    config: Config,
    store: Store,
    clock: Clock = time.time,
    core_url: str | None = None,
    liveness: Liveness | None = None,
) -> Engine:
    providers: dict[str, CloudProvider] = {
        cloud.name: EC2Provider(cloud, config.pool.name, config.core_id) for cloud in config.clouds
    }
    return Engine(
        config,
        store,
        providers,
        demand_source(config.queue, store),
        clock=clock,
        core_url=core_url,
        liveness=liveness,
    )


def pool_status(store: Store) -> str:
    """The one line systemd shows for the core (``systemctl status``)."""
    vms = store.vm_counts()
    return (
        f"{vms[VMState.IDLE]} idle, {vms[VMState.BUSY]} busy, "
        f"{vms[VMState.REQUESTED] + vms[VMState.BOOTING]} booting; "
        f"{store.queued_count()} jobs waiting"
    )


def _url(sock: socket.socket, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


class Core:
    """A running core: engine loop, agent API on TCP, admin API on a unix socket (and TCP)."""

    def __init__(
        self, config: Config, clock: Clock | None = None, notifier: Notifier | None = None
    ) -> None:
        self.config = config
        self._clock = clock
        self.notifier = notifier or Notifier()
        self.stop_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[EmbeddedServer] = []
        self.agent_url = ""
        self.admin_socket = Path(config.admin.socket)
        self.admin_url: str | None = None
        self._lock = StateLock(config.state.path)
        self._socket_inode: int | None = None

    def clock(self) -> float:
        assert self._clock is not None, "the clock is set when the core starts"
        return self._clock()

    async def start(self) -> None:
        """Lock and open the state, bind every listener, start the engine. Raises
        StateError or OSError with a one-line message an admin can act on."""
        config = self.config
        admin_token = config.admin.resolved_token()
        if config.admin.tcp_host and not admin_token:
            raise ConfigError(
                [f"admin.tcp_host: needs a token (admin.token or ${config.admin.token_env})"]
            )
        warn_if_open_files_short(config)
        self._lock.acquire()
        try:
            self.store = Store(config.state.path, config.state.synchronous)
        except BaseException:
            self._lock.release()
            raise
        if self._clock is None:
            self._clock = CoreClock(not_before=self.store.latest_time())
        tls = bool(config.web.ssl_certfile)
        agent_sock = tcp_socket(config.web.host, config.web.port)
        self.agent_url = _url(agent_sock, tls)
        core_url = config.web.public_url or self.agent_url
        if not config.web.public_url and config.web.host in ("0.0.0.0", "::"):
            log.warning(
                "event=public_url_unset msg=%s", f"set web.public_url; VMs are told {core_url}"
            )
        self.liveness = Liveness(self.clock())
        self.engine = build_engine(config, self.store, self.clock, core_url, self.liveness)
        self.changes = Changes(self.store)
        engine = self.engine
        self.service = PoolService(
            config,
            self.store,
            self.liveness,
            self.clock,
            engine.wake.set,
            engine.launch_keys,
        )
        self.service.cloud_details = engine.cloud_details
        self.service.settle_bounds()

        self.agent_limits = agent_limits(config, self.service.bounds()[1])
        self.store.listeners.append(self._follow_pool_bounds)
        agent_app = create_agent_app(
            self.service, self.changes, config.contextualisation.agent_heartbeat_s
        )
        admin_sock = unix_socket(self.admin_socket)
        self._socket_inode = self.admin_socket.stat().st_ino
        listeners: list[tuple[socket.socket, EmbeddedServer]] = [
            (
                agent_sock,
                make_server(
                    agent_app,
                    limits=self.agent_limits,
                    admits=network_guard(config.web),
                    ssl_certfile=config.web.ssl_certfile,
                    ssl_keyfile=config.web.ssl_keyfile,
                ),
            ),
            (
                admin_sock,
                make_server(
                    create_admin_app(self.service, self.changes, engine),
                    limits=admin_limits(config, "admin_socket"),
                ),
            ),
        ]
        if config.admin.tcp_host:
            admin_tcp = tcp_socket(config.admin.tcp_host, config.admin.tcp_port)
            self.admin_url = _url(admin_tcp, bool(config.admin.ssl_certfile))
            readonly_token = config.admin.resolved_readonly_token()
            app = create_admin_app(
                self.service,
                self.changes,
                engine,
                token=admin_token,
                readonly_token=readonly_token,
            )
            server = make_server(
                app,
                limits=admin_limits(config, "admin_tcp"),
                guard=token_gate(admin_token, readonly_token),
                ssl_certfile=config.admin.ssl_certfile,
                ssl_keyfile=config.admin.ssl_keyfile,
            )
            listeners.append((admin_tcp, server))
        for sock, server in listeners:
            self._servers.append(server)
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        engine.on_ready = lambda: self.notifier.ready(pool_status(self.store))
        engine.on_cycle = lambda: self.notifier.watchdog(pool_status(self.store))
        if self.notifier.watchdog_interval_s:
            engine.max_sleep_s = self.notifier.watchdog_interval_s
        self._tasks.append(asyncio.create_task(engine.run(self.stop_requested)))
        log.info(
            "event=core_started core=%s pool=%s clouds=%s agent_api=%s admin_socket=%s",
            config.core_id,
            config.pool.name,
            ",".join(c.name for c in config.clouds),
            self.agent_url,
            self.admin_socket,
        )

    async def stop(self) -> None:
        """Stop launching, finish in-flight cloud calls briefly, close listeners and the store."""
        self.notifier.stopping()
        self.stop_requested.set()
        self.changes.close()
        for server in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()
        self._remove_own_socket()
        self._lock.release()
        log.info("event=core_stopped")

    def reload(self, load: Callable[[], Config]) -> list[str]:
        """Read the configuration again and apply what can change live: pool, clouds, queue,
        contextualisation. Listeners, the admin API and the state path need a restart (said
        in the log). A configuration with errors is refused with check-config's messages and
        the one in force stays. Returns the sections that changed."""
        old = self.config
        try:
            new = load()
        except ConfigError as exc:
            for line in exc.errors:
                log.error("event=reload_refused error=%s", json.dumps(line))
            self.store.record_event(
                self.clock(),
                EventKind.SETTING_CHANGED,
                f"configuration reload refused ({len(exc.errors)} errors: {exc.errors[0]}); "
                "the one in force stays",
            )
            return []
        frozen = [s for s in RESTART_SECTIONS if getattr(new, s) != getattr(old, s)]
        if frozen:
            log.warning("event=reload_needs_restart sections=%s", ",".join(frozen))
        new = new.model_copy(update={s: getattr(old, s) for s in RESTART_SECTIONS})
        changed = [s for s in LIVE_SECTIONS if getattr(new, s) != getattr(old, s)]
        engine = self.engine
        for cloud in new.clouds:
            before = next((c for c in old.clouds if c.name == cloud.name), None)
            if before != cloud:
                engine.providers[cloud.name] = EC2Provider(cloud, new.pool.name, new.core_id)
        # Clouds no longer configured keep their provider: their VMs can still be terminated.
        if new.queue != old.queue:
            engine.demand = demand_source(new.queue, self.store)
        self.config = engine.config = self.service.config = new
        self.service.settle_bounds()
        message = "configuration reloaded: " + (
            ", ".join(changed) + " changed" if changed else "nothing changed"
        )
        if frozen:
            message += f"; {', '.join(frozen)} changed but need a restart"
        self.store.record_event(self.clock(), EventKind.SETTING_CHANGED, message)
        engine.wake.set()
        return changed

    def _follow_pool_bounds(self, kinds: Counter[str]) -> None:
        """After a committed resize or reload: the agent listener's cap follows the pool."""
        if kinds[EventKind.SETTING_CHANGED]:
            follow_pool_bounds(self.agent_limits, self.config, self.service.bounds()[1])

    def _remove_own_socket(self) -> None:
        """Remove the admin socket only if it is still the one this core created."""
        with contextlib.suppress(FileNotFoundError):
            if self.admin_socket.stat().st_ino == self._socket_inode:
                self.admin_socket.unlink()


async def run_core(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run until SIGTERM/SIGINT; instances keep running for the next start. SIGHUP reads the
    configuration again with ``reload`` (``systemctl reload``)."""
    loop = asyncio.get_running_loop()
    core = Core(config, clock=None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, core.stop_requested.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: core.reload(reload))
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("event=reload_unavailable"))
    await core.start()
    # What is loaded by now (modules, boto3's service models, the apps) lives as long as the
    # process: keep it out of every full collection, which the engine's per-cycle snapshot of
    # the fleet triggers (a third of a 10,000-VM cycle otherwise).
    gc.freeze()
    # A full collection walks every object of every open connection (5,000 sockets: up to
    # 480 ms with the event loop stopped, and it freed nothing): every 1,000th gen-1
    # collection instead of every 10th (a few minutes apart under load). Cycles that live
    # that long are rare; they wait longer (benchmarks/README.md, load.py).
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_EVERY)
    try:
        await core.stop_requested.wait()
    finally:
        await core.stop()
