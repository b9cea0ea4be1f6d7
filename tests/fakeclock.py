"""A host clock that only the test moves: ``from fakeclock import FakeClock``.

It implements ``xenkvm.machine.clock.HostClock``: an ``IoLoop`` built on it
waits (without a timeout) until the test calls ``advance``, then runs what has
become due; ``loop.wait_idle()`` tells the test when it has.  What a timer
test asserts then depends only on the times it chose, never on the machine's
load.
"""
from __future__ import annotations

import threading
from typing import Callable

START_NS = 1_000_000_000_000      #: an arbitrary, non-zero "boot" time


class FakeClock:
    """Monotonic nanoseconds that advance only by ``advance`` (thread-safe)."""

    def __init__(self, start_ns: int = START_NS):
        self._now = start_ns
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []

    def now_ns(self) -> int:
        with self._lock:
            return self._now

    def wait_s(self, delta_ns: int) -> float | None:
        """Due now: no wait; otherwise block until ``advance`` wakes the waiter."""
        return 0.0 if delta_ns <= 0 else None

    def on_jump(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.append(wake)

    def advance(self, ns: int) -> None:
        """Move time forward by ``ns`` and wake every loop on this clock."""
        if ns < 0:
            raise ValueError("a monotonic clock does not go back")
        with self._lock:
            self._now += ns
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
