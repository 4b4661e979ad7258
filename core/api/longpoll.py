"""Wake-ups for long polls: a queued job reaches a waiting agent the moment it is committed.

Waking every parked agent for each queued job would make each of them try to claim it (one
write transaction each) while only one can win: with hundreds of agents parked that stalls
the event loop. So a job wakes one waiter, the one parked longest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque

from core.model import EventKind
from core.store import Store

JOB_READY_KINDS = (EventKind.JOB_QUEUED, EventKind.JOB_REQUEUED)


class Signal:
    """Parked waiters, woken oldest first: ``notify(n)`` wakes n of them, ``notify()`` all."""

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[bool]] = deque()  # result: True woken, False expired

    @property
    def waiting(self) -> int:
        """How many callers are parked right now (e.g. idle agents polling)."""
        return len(self._waiters)

    def notify(self, count: int | None = None) -> None:
        woken = 0
        while self._waiters and (count is None or woken < count):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                woken += 1

    async def wait(self, timeout: float) -> bool:
        """Return when notified (True) or after ``timeout`` seconds (False), whichever comes
        first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)

        def expire() -> None:
            if not waiter.done():
                waiter.set_result(False)

        timer = loop.call_later(timeout, expire)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.notify(1)  # woken, but our client is gone: pass the wake-up on
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


class Changes:
    """Signals fed by the store's commits: ``jobs`` wakes one waiter per job that became
    fetchable, ``events`` wakes every event follower."""

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

    def _committed(self, kinds: Counter[str]) -> None:
        self.events.notify()
        ready = sum(kinds[kind] for kind in JOB_READY_KINDS)
        if ready:
            self.jobs.notify(ready)
