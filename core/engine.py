"""The engine: reconcile, observe, decide, act.

Observations (queue demand, cloud state) go into the store; the policy reads a snapshot and
returns actions; the engine carries them out through providers and records the outcome. Cloud
calls run in worker threads as per-cloud tasks, so one slow cloud never stalls the loop, the
other clouds or the web service. Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from core import policy, userdata
from core.clouds import CapacityError, CloudError, CloudProvider, Instance, LaunchRequest
from core.config import Config
from core.model import ALIVE_STATES, Launch, VMState
from core.queues import DemandError, DemandSource
from core.store import Store
from core.userdata import launch_secret

log = logging.getLogger("alienec2.engine")

Clock = Callable[[], float]

GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
VANISH_GRACE_S = 120.0  # an instance younger than this may not be listed yet (eventual consistency)
BASELINE_REFRESH_S = 60.0  # the day's average arrival rate is recounted this often


class Engine:
    def __init__(
        self,
        config: Config,
        store: Store,
        providers: Mapping[str, CloudProvider],
        demand: DemandSource,
        *,
        clock: Clock = time.time,
        core_url: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.providers = dict(providers)
        self.demand = demand
        self.clock = clock
        self.core_url = core_url or config.web.public_url or f"http://127.0.0.1:{config.web.port}"
        self.launch_key = userdata.launch_key(store, clock())
        self._launching: dict[str, asyncio.Task[None]] = {}
        self._terminating: dict[str, asyncio.Task[None]] = {}
        self._describing: dict[str, asyncio.Task[None]] = {}
        self._reconciling: dict[str, asyncio.Task[None]] = {}
        self._last_reconcile = float("-inf")
        self._stopping = False
        self.cycles = 0
        self.wake = asyncio.Event()  # set to run the next cycle now (e.g. a job was submitted)
        self._baseline = (-math.inf, 0.0)  # (counted at, jobs per second over warm_history_s)

    # ---- runtime settings (admin overrides, durable) -----------------------------------

    def settings(self) -> policy.Settings:
        pool = self.config.pool
        return policy.Settings(
            min_vms=self.store.setting("min_vms", pool.min_vms),
            max_vms=self.store.setting("max_vms", pool.max_vms),
            idle_timeout_s=pool.idle_timeout_s,
            boot_timeout_s=pool.boot_timeout_s,
            heartbeat_timeout_s=pool.heartbeat_timeout_s,
            max_launch_per_cycle=pool.max_launch_per_cycle,
            adaptive_warm=pool.adaptive_warm,
            paused=self.store.setting("paused", False),
            cycle_interval_s=pool.cycle_interval_s,
            warm_margin=pool.warm_margin,
        )

    def resize(self, min_vms: int | None = None, max_vms: int | None = None) -> policy.Settings:
        """Change the pool bounds; raises ValueError with a message an admin can act on."""
        current = self.settings()
        low = current.min_vms if min_vms is None else min_vms
        high = current.max_vms if max_vms is None else max_vms
        if low < 0 or high < 0:
            raise ValueError(f"min and max must be >= 0 (got min {low}, max {high})")
        if high < low:
            raise ValueError(f"max must be >= min (got max {high} < min {low})")
        now = self.clock()
        self.store.set_setting("min_vms", low, now, f"pool min_vms {current.min_vms} -> {low}")
        self.store.set_setting("max_vms", high, now, f"pool max_vms {current.max_vms} -> {high}")
        self.wake.set()
        return self.settings()

    def pause(self, paused: bool) -> None:
        """Paused: no launches and no reaping; health rules (boot/heartbeat timeouts) still run."""
        self.store.set_setting(
            "paused", paused, self.clock(), "scaling paused" if paused else "scaling resumed"
        )
        self.wake.set()

    # ---- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace_s: float = 5.0) -> None:
        """Cycle until ``stop`` is set; then stop launching and wait briefly for cloud calls.

        Instances keep running: the next start re-adopts them."""
        await self.start()
        while not stop.is_set():
            try:
                await self.cycle()
            except Exception:
                log.exception("event=cycle_error")
            self.wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            await asyncio.wait(
                waiters, timeout=self.config.pool.cycle_interval_s, return_when="FIRST_COMPLETED"
            )
            for waiter in waiters:
                waiter.cancel()
        await self.shutdown(grace_s)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        tasks = self._tasks()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()  # the intent stays pending in the store; the next start finishes it
        log.info("event=engine_stopped")

    async def start(self) -> None:
        """Reconcile before the first decision: finish interrupted launches, adopt our tagged
        instances, and mark those that vanished."""
        await asyncio.gather(*(self._resume_launch(launch) for launch in self._pending()))
        await asyncio.gather(*(self._reconcile(name) for name in self.providers))
        self._last_reconcile = self.clock()

    async def cycle(self) -> list[policy.Action]:
        """One observe → decide → act pass. Cloud calls are started, not awaited."""
        now = self.clock()
        self.cycles += 1
        if now - self._last_reconcile >= self.config.pool.reconcile_interval_s:
            self._last_reconcile = now
            for name in self.providers:
                self._spawn(self._reconciling, name, self._reconcile(name))
        self._observe_requested()
        for launch in self._pending():
            self._spawn(self._launching, launch.cloud, self._resume_launch(launch))
        try:
            waiting: int | None = await self.demand.waiting()
        except DemandError as exc:
            self.store.record_event(now, "demand_error", f"{exc}; no scaling change this cycle")
            waiting = None
        actions = policy.decide(self.snapshot(now), waiting, now, self.settings())
        self._act(actions, now)
        self._send_terminations()
        return actions

    async def settle(self) -> None:
        """Wait until no cloud call is in flight (tests and shutdown)."""
        while tasks := self._tasks():
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- observe ------------------------------------------------------------------------

    def snapshot(self, now: float) -> policy.Snapshot:
        vms = tuple(
            policy.VMView(
                id=vm.id,
                cloud=vm.cloud,
                state=vm.state,
                launched_at=vm.launched_at,
                idle_since=vm.idle_since,
                last_heartbeat=vm.last_heartbeat,
                jobs=1 if vm.job_id is not None else 0,
                kill_requested=vm.kill_requested,
            )
            for vm in self.store.vms(ALIVE_STATES)
        )
        pending: dict[str, int] = {}
        for launch in self.store.pending_launches():
            pending[launch.cloud] = pending.get(launch.cloud, 0) + launch.count
        clouds = tuple(
            policy.CloudView(
                name=cloud.name,
                priority=cloud.priority,
                max_instances=cloud.max_instances,
                backoff_until=self.store.cloud_status(cloud.name).backoff_until,
                launch_in_flight=cloud.name in self._launching or cloud.name in pending,
                pending=pending.get(cloud.name, 0),
            )
            for cloud in self.config.clouds
            if cloud.name in self.providers
        )
        pool = self.config.pool
        recent, _ = self.store.submitted_since(now - pool.arrival_window_s)
        last_minute, first = self.store.submitted_since(now - policy.BURST_WINDOW_S)
        return policy.Snapshot(
            vms=vms,
            clouds=clouds,
            arrival_rate=policy.arrival_rate(
                recent,
                pool.arrival_window_s,
                last_minute,
                now - first if first is not None else 0.0,
            ),
            baseline_rate=self._baseline_rate(now),
            boot_time_s=policy.boot_time(self.store.recent_boot_times(), pool.boot_time_guess_s),
        )

    def _baseline_rate(self, now: float) -> float:
        """The ``warm_history_s`` average arrival rate. It moves slowly and counting a day of
        submissions takes milliseconds at 100,000 jobs a day, so it is recounted once a minute."""
        history_s = self.config.pool.warm_history_s
        if not history_s:
            return 0.0
        counted_at, rate = self._baseline
        if not 0 <= now - counted_at < BASELINE_REFRESH_S:
            rate = self.store.submitted_since(now - history_s)[0] / history_s
            self._baseline = (now, rate)
        return rate

    def _observe_requested(self) -> None:
        """Describe only instances the cloud has not yet reported running: cost per cycle
        follows what is changing, not the fleet size."""
        by_cloud: dict[str, list[str]] = {}
        for vm in self.store.vms([VMState.REQUESTED]):
            by_cloud.setdefault(vm.cloud, []).append(vm.id)
        for cloud, ids in by_cloud.items():
            if cloud in self.providers:
                self._spawn(self._describing, cloud, self._describe(cloud, ids))

    async def _describe(self, cloud: str, ids: list[str]) -> None:
        try:
            found = await asyncio.to_thread(self.providers[cloud].describe, ids)
        except CloudError as exc:
            log.warning("event=describe_failed cloud=%s error=%s", cloud, exc)
            return
        now = self.clock()
        for instance in found:
            self._apply_instance_state(instance, now)

    def _apply_instance_state(self, instance: Instance, now: float) -> None:
        vm = self.store.vm(instance.id)
        if instance.state in GONE_STATES and vm.state in ALIVE_STATES:
            self.store.transition_vm(
                vm.id, VMState.TERMINATED, now, f"cloud reports {instance.state}"
            )
        elif instance.state == "running":
            self.store.vm_running(vm.id, instance.address, now)

    async def _reconcile(self, cloud: str) -> None:
        """Full tag-filtered listing of one cloud: adopt strays, retire vanished VMs."""
        started = self.clock()
        try:
            listed = await asyncio.to_thread(self.providers[cloud].list_pool)
        except CloudError as exc:
            self.store.record_event(
                started, "reconcile_failed", f"listing failed: {exc}", cloud=cloud
            )
            return
        now = self.clock()
        known = {vm.id: vm for vm in self.store.vms() if vm.cloud == cloud}
        seen: set[str] = set()
        for instance in listed:
            seen.add(instance.id)
            if instance.id in known:
                self._apply_instance_state(instance, now)
            elif instance.state not in GONE_STATES:
                self.store.adopt_vm(
                    instance.id, cloud, instance.launch_id or "unknown", instance.address, now
                )
        for vm in known.values():
            if (
                vm.id not in seen
                and vm.state in ALIVE_STATES
                and vm.launched_at < started - VANISH_GRACE_S
            ):
                self.store.transition_vm(vm.id, VMState.TERMINATED, now, "vanished from the cloud")

    # ---- act ----------------------------------------------------------------------------

    def _act(self, actions: list[policy.Action], now: float) -> None:
        for action in actions:
            match action:
                case policy.Launch(cloud=cloud, count=count):
                    # Health actions come first and may just have put this cloud in backoff.
                    if not self._stopping and self.store.cloud_status(cloud).backoff_until <= now:
                        launch = self._new_launch(cloud, count, now)
                        self._spawn(self._launching, cloud, self._run_launch(launch))
                case policy.Fail(vm_id=vm_id, reason=reason):
                    vm = self.store.transition_vm(vm_id, VMState.FAILED, now, reason)
                    self._count_boot_failure(vm.cloud, now)
                    self.store.transition_vm(vm_id, VMState.TERMINATING, now, "boot failed")
                case policy.Lose(vm_id=vm_id, reason=reason):
                    self.store.transition_vm(vm_id, VMState.LOST, now, reason)
                    self.store.transition_vm(vm_id, VMState.TERMINATING, now, "lost")
                case policy.Terminate(vm_id=vm_id, reason=reason):
                    self.store.transition_vm(vm_id, VMState.TERMINATING, now, reason)

    def _new_launch(self, cloud: str, count: int, now: float) -> Launch:
        """Persist the intent (with its ClientToken) before any call reaches the cloud."""
        launch_id = uuid.uuid4().hex[:16]
        return self.store.add_launch(launch_id, cloud, count, f"alienec2-{launch_id}", now)

    def _request(self, launch: Launch) -> LaunchRequest:
        contextualisation = self.config.contextualisation
        settings = userdata.agent_settings(
            self.core_url, launch.id, launch_secret(self.launch_key, launch.id), contextualisation
        )
        return LaunchRequest(
            launch_id=launch.id,
            count=launch.count,
            client_token=launch.client_token,
            user_data=userdata.render(settings, contextualisation),
        )

    async def _run_launch(self, launch: Launch) -> None:
        provider = self.providers[launch.cloud]
        try:
            instances = await asyncio.to_thread(provider.launch, self._request(launch))
        except CloudError as exc:
            now = self.clock()
            if exc.code is not None:
                # The cloud refused: nothing was launched.
                self.store.fail_launch(launch.id, str(exc), now)
            # Without a code (timeout, connection lost) the cloud may have acted: the intent
            # stays pending and is resumed by tag and ClientToken once the backoff ends.
            self._back_off(launch.cloud, exc, now)
            return
        now = self.clock()
        self.store.complete_launch(launch.id, [(i.id, i.address) for i in instances], now)
        status = self.store.cloud_status(launch.cloud)
        if status.backoff_level:
            status.backoff_level, status.backoff_until, status.last_error = 0, 0.0, None
            self.store.save_cloud_status(status, now, ("cloud_recovered", "launch succeeded"))

    async def _resume_launch(self, launch: Launch) -> None:
        """Finish a launch whose result was never recorded: adopt its tagged instances if the
        cloud acted, else send it again with the same ClientToken."""
        provider = self.providers.get(launch.cloud)
        now = self.clock()
        if provider is None:
            self.store.fail_launch(launch.id, "cloud no longer configured", now)
            return
        if self.store.cloud_status(launch.cloud).backoff_until > now or self._stopping:
            return
        try:
            found = await asyncio.to_thread(provider.find_launch, launch.id)
        except CloudError as exc:
            self._back_off(launch.cloud, exc, self.clock())
            return
        if found:
            self.store.complete_launch(launch.id, [(i.id, i.address) for i in found], self.clock())
            return
        await self._run_launch(launch)

    def _pending(self) -> list[Launch]:
        return [launch for launch in self.store.pending_launches() if not self._stopping]

    def _send_terminations(self) -> None:
        """Terminate every VM the store says is terminating, one batch per cloud. Retried each
        cycle until the cloud accepts, so a crash between decision and call loses nothing."""
        by_cloud: dict[str, list[str]] = {}
        for vm in self.store.vms([VMState.TERMINATING]):
            by_cloud.setdefault(vm.cloud, []).append(vm.id)
        for cloud, ids in by_cloud.items():
            if cloud in self.providers:
                self._spawn(self._terminating, cloud, self._terminate(cloud, ids))

    async def _terminate(self, cloud: str, ids: list[str]) -> None:
        try:
            missing = await asyncio.to_thread(self.providers[cloud].terminate, ids)
        except CloudError as exc:
            self.store.record_event(
                self.clock(), "terminate_failed", f"{len(ids)} VMs: {exc}", cloud=cloud
            )
            return
        now = self.clock()
        for vm_id in ids:
            reason = "unknown to the cloud" if vm_id in missing else "terminate accepted"
            self.store.transition_vm(vm_id, VMState.TERMINATED, now, reason)

    # ---- backoff ------------------------------------------------------------------------

    def _back_off(self, cloud: str, error: CloudError, now: float) -> None:
        config = next(c for c in self.config.clouds if c.name == cloud)
        status = self.store.cloud_status(cloud)
        delay = min(config.backoff_initial_s * 2**status.backoff_level, config.backoff_max_s)
        status.backoff_level += 1
        status.backoff_until = now + delay
        status.last_error = str(error)
        kind = "capacity" if isinstance(error, CapacityError) else "error"
        self.store.save_cloud_status(
            status, now, ("cloud_backoff", f"{kind}: {error}; no launches for {delay:g}s")
        )

    def _count_boot_failure(self, cloud: str, now: float) -> None:
        config = next((c for c in self.config.clouds if c.name == cloud), None)
        if config is None:
            return
        status = self.store.cloud_status(cloud)
        status.boot_failures += 1
        if status.boot_failures < config.boot_failures_before_backoff:
            self.store.save_cloud_status(status, now)
            return
        status.boot_failures = 0
        self.store.save_cloud_status(status, now)
        self._back_off(
            cloud, CloudError(f"{config.boot_failures_before_backoff} VMs failed to boot"), now
        )

    # ---- tasks --------------------------------------------------------------------------

    def _spawn(
        self, slot: dict[str, asyncio.Task[None]], cloud: str, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run ``work`` unless the same kind of call to that cloud is still in flight."""
        if cloud in slot:
            work.close()
            return
        task = asyncio.create_task(work)
        slot[cloud] = task

        def done(finished: asyncio.Task[None]) -> None:
            if slot.get(cloud) is finished:
                del slot[cloud]
            if not finished.cancelled() and finished.exception() is not None:
                log.error("event=cloud_task_failed cloud=%s", cloud, exc_info=finished.exception())

        task.add_done_callback(done)

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [
            task
            for slot in (self._launching, self._terminating, self._describing, self._reconciling)
            for task in slot.values()
        ]
