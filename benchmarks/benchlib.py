"""Small pieces the benchmarks share (imported from the benchmark's own folder)."""
from __future__ import annotations

import time
from typing import Callable


class ConsoleLines:
    """A console listener that hands each complete guest line, stripped, to :meth:`line`."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            self.line(raw.decode(errors="replace").strip())

    def line(self, line: str) -> None:
        raise NotImplementedError


def min_thread_cpu_ns(fn: Callable[[], object], n: int, batches: int) -> float:
    """Minimum thread-CPU ns per call of ``fn()`` over ``batches`` timed batches of ``n`` calls.

    The minimum of CPU time, not a median of wall time: robust on a loaded machine.
    """
    fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.thread_time_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / n)
    return best
