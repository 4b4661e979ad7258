"""Demand sources: how many jobs are waiting for a VM.

``builtin`` is the core's own FIFO task queue; ``command`` and ``htcondor`` read an external
queue whose jobs a pilot (e.g. the AliEn JobAgent) fetches by itself.
"""

from __future__ import annotations

from typing import Protocol

from core.config import BuiltinQueueConfig, CommandQueueConfig, HTCondorQueueConfig
from core.store import Store


class DemandError(Exception):
    """The demand could not be read this cycle; the engine makes no scaling change."""


class DemandSource(Protocol):
    async def waiting(self) -> int:
        """Jobs waiting for a VM; raises DemandError when that cannot be known."""
        ...


def demand_source(
    config: BuiltinQueueConfig | CommandQueueConfig | HTCondorQueueConfig, store: Store
) -> DemandSource:
    from core.queues.builtin import BuiltinQueue
    from core.queues.command import CommandQueue
    from core.queues.htcondor import HTCondorQueue

    match config:
        case BuiltinQueueConfig():
            return BuiltinQueue(store)
        case CommandQueueConfig():
            return CommandQueue(config.command, config.timeout_s)
        case HTCondorQueueConfig():
            return HTCondorQueue(config.condor_q, config.constraint, config.timeout_s)
    raise AssertionError(f"unknown queue kind {config!r}")
