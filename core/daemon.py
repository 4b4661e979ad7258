"""The core process: store, providers, demand source and engine wired from a Config."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from core.clouds import CloudProvider
from core.clouds.ec2 import EC2Provider
from core.config import Config
from core.engine import Clock, Engine
from core.queues import demand_source
from core.store import Store

log = logging.getLogger("alienec2.core")


def build_engine(config: Config, store: Store, clock: Clock = time.time) -> Engine:
    providers: dict[str, CloudProvider] = {
        cloud.name: EC2Provider(cloud, config.pool.name, config.core_id) for cloud in config.clouds
    }
    return Engine(config, store, providers, demand_source(config.queue, store), clock=clock)


async def run_core(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``); instances keep running for the next start."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = Store(config.state.path, config.state.synchronous)
    try:
        engine = build_engine(config, store)
        log.info(
            "event=core_started core=%s pool=%s clouds=%s state=%s",
            config.core_id,
            config.pool.name,
            ",".join(c.name for c in config.clouds),
            config.state.path,
        )
        await engine.run(stop)
    finally:
        store.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
