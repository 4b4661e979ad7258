"""Long-poll wake-ups: one job wakes one parked agent, the one that has waited longest."""

from __future__ import annotations

import asyncio

from core.api.longpoll import Signal
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
