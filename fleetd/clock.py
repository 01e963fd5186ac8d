"""Time as the agent sees it: an injected monotonic clock, so tests can drive fencing, backoff and
lease expiry to the exact instant without sleeping.

`Clock` is any zero-argument callable returning seconds. Production passes `time.monotonic`
(CLOCK_MONOTONIC, shared by every process of one boot, which is what lets a successor fleetd and
the guard read a deadline the previous fleetd wrote). Tests pass a `FakeClock` and advance it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Clock = Callable[[], float]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        with self._lock:
            self._now += seconds
