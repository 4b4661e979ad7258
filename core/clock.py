"""The core's clock: wall time at start, then advanced by the monotonic clock.

Durations (heartbeat age, boot and idle time, backoff) are differences of this clock, so a
step of the wall clock (NTP, a resumed host) moves none of them. Stored times stay close to
wall time for display; across a restart the clock never runs behind what the state already
holds, so a wall clock stepped back while the core was down cannot make durations negative.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CoreClock:
    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        not_before: float = 0.0,
    ) -> None:
        self._monotonic = monotonic
        self._base = max(wall(), not_before) - monotonic()

    def __call__(self) -> float:
        return self._base + self._monotonic()
