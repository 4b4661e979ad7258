"""Wake-ups for long polls: a queued job reaches a waiting agent the moment it is committed.

Waking every parked agent for each queued job would make each of them try to claim it (one
write transaction each) while only one can win: with hundreds of agents parked that stalls
the event loop. So a job wakes one waiter, the one parked longest.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, OrderedDict
from collections.abc import Callable

from core.model import EventKind
from core.store import Store

JOB_READY_KINDS = (EventKind.JOB_QUEUED, EventKind.JOB_REQUEUED)
POLL_END_SPREAD = 0.25  # an empty job poll ends within the last quarter of its wait


def poll_deadline(now: float, wait: float, draw: Callable[[], float] = random.random) -> float:
    """When a job poll that finds nothing ends: at a random moment of its wait's last quarter.

    Polls parked together come back together, every ``wait`` seconds, for ever: after a core
    restart or a network blip a whole fleet re-polls in the same seconds, and each wave parks
    it together again. Measured (benchmarks/load.py) at 5,000 agents whose polls began within
    5 s: every 20 s a wave of ~1,000 polls a second, and the probe's p99 over 50 ms in it. A
    random end widens such a wave by a quarter of the wait each period until it covers the
    whole wait; the price is ~14% more polls (a mean of 7/8 of the wait)."""
    return now + wait * (1 - POLL_END_SPREAD * draw())


class Signal:
    """Parked waiters, woken oldest first: ``notify(n)`` wakes n of them, ``notify()`` all."""

    def __init__(self) -> None:
        # Oldest first; result: True woken, False expired. An OrderedDict, not a deque: a waiter
        # that expires or is cancelled leaves from anywhere in O(1) (deque.remove scanned up
        # to 10,000 parked polls, each time one of them ended).
        self._waiters: OrderedDict[asyncio.Future[bool], None] = OrderedDict()

    @property
    def waiting(self) -> int:
        """How many callers are parked right now (e.g. idle agents polling)."""
        return len(self._waiters)

    def notify(self, count: int | None = None) -> None:
        woken = 0
        while self._waiters and (count is None or woken < count):
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(True)
                woken += 1

    async def wait(self, timeout: float, ended: asyncio.Future[None] | None = None) -> bool:
        """Return when notified (True), or after ``timeout`` seconds or once ``ended`` is
        done (False), whichever comes first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters[waiter] = None

        def expire(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(False)

        timer = loop.call_later(timeout, expire)
        if ended is not None:
            ended.add_done_callback(expire)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.notify(1)  # woken, but our client is gone: pass the wake-up on
            raise
        finally:
            timer.cancel()
            if ended is not None:
                ended.remove_done_callback(expire)
            self._waiters.pop(waiter, None)


class SlotPolls:
    """One parked poll per VM slot: a newer poll of a slot ends the one before it. An agent
    polls each slot in turn, so an older poll still parked is one its agent gave up on (a
    dropped connection the core has not noticed yet), or a job on the VM using the VM's
    token to hold connections: parked polls are busy and never displaced, so 300 of them
    from one VM filled the connection cap and cut every other VM off."""

    def __init__(self) -> None:
        self._current: dict[tuple[str, int], asyncio.Future[None]] = {}

    def take(self, vm_id: str, slot: int) -> asyncio.Future[None]:
        """The new poll's end signal, done once a newer poll takes the slot."""
        key = (vm_id, slot)
        previous = self._current.get(key)
        if previous is not None and not previous.done():
            previous.set_result(None)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._current[key] = mine
        return mine

    def release(self, vm_id: str, slot: int, mine: asyncio.Future[None]) -> None:
        key = (vm_id, slot)
        if self._current.get(key) is mine:
            del self._current[key]


class Changes:
    """Signals fed by the store's commits: ``jobs`` wakes one waiter per job that became
    fetchable, ``events`` wakes every event follower."""

    def __init__(self, store: Store) -> None:
        self.jobs = Signal()
        self.events = Signal()
        self.polls = SlotPolls()
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
