"""Wake-ups for long polls: a queued job reaches a waiting agent the moment it is committed."""

from __future__ import annotations

import asyncio
import contextlib

from core.store import Store

JOB_READY_KINDS = frozenset({"job_queued", "job_requeued"})


class Signal:
    """Wakes every waiter on ``notify``; waiters then re-check their condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.waiting = 0  # how many callers are parked right now (e.g. idle agents polling)

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        finally:
            self.waiting -= 1


class Changes:
    """Signals fed by the store's commits: ``jobs`` when a job becomes fetchable, ``events``
    for every committed event."""

    def __init__(self, store: Store) -> None:
        self.jobs = Signal()
        self.events = Signal()
        self.closing = False
        store.listeners.append(self._committed)

    def close(self) -> None:
        """Answer every parked long poll now, so a stopping server has nothing to cancel."""
        self.closing = True
        self.jobs.notify()
        self.events.notify()

    def _committed(self, kinds: set[str]) -> None:
        self.events.notify()
        if kinds & JOB_READY_KINDS:
            self.jobs.notify()
