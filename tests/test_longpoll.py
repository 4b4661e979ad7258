"""Long-poll wake-ups: one job wakes one parked agent, the one that has waited longest."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from core.api.longpoll import Signal, poll_deadline
from tests.conftest import eventually


async def test_notify_one_wakes_only_the_longest_waiting() -> None:
    signal = Signal()
    first = asyncio.create_task(signal.wait(10))
    await eventually(lambda: signal.waiting == 1)
    second = asyncio.create_task(signal.wait(10))
    await eventually(lambda: signal.waiting == 2)

    signal.notify(1)
    await asyncio.wait_for(first, 1)
    assert not second.done()
    assert signal.waiting == 1
    signal.notify()
    await asyncio.wait_for(second, 1)
    assert signal.waiting == 0


async def test_a_wake_up_a_cancelled_waiter_cannot_use_is_passed_on() -> None:
    signal = Signal()
    gone = asyncio.create_task(signal.wait(10))
    await eventually(lambda: signal.waiting == 1)
    stays = asyncio.create_task(signal.wait(10))
    await eventually(lambda: signal.waiting == 2)

    signal.notify(1)  # wakes `gone`, whose client disconnects before it runs
    gone.cancel()
    await asyncio.wait_for(stays, 1)
    assert gone.cancelled()


async def test_waiting_times_out_and_leaves_no_trace() -> None:
    signal = Signal()
    await signal.wait(0.01)
    assert signal.waiting == 0
    signal.notify(1)  # nobody to wake: nothing breaks


def test_an_empty_poll_ends_within_the_last_quarter_of_its_wait() -> None:
    assert poll_deadline(100.0, 20.0, lambda: 0.0) == 120.0
    assert poll_deadline(100.0, 20.0, lambda: 1.0) == 115.0
    assert poll_deadline(100.0, 0.0) == 100.0  # wait=0 answers at once


def test_polls_parked_together_drift_apart_instead_of_returning_as_one_wave() -> None:
    """1,000 agents re-poll in the same instant (a core restart), then each polls again the
    moment its empty poll ends: two minutes later their polls no longer end together."""
    draw = random.Random(7).random
    ends = [0.0] * 1000
    for _ in range(6):
        ends = [poll_deadline(end, 20.0, draw) for end in ends]
    per_second = Counter(int(end) for end in ends)
    assert max(per_second.values()) < 200  # with a fixed end: all 1,000 in one second
