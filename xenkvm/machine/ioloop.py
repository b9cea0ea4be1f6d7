"""The machine's I/O thread: timers, file readers and cross-thread calls in one selector loop.

vCPU threads never block on I/O; they hand work to this loop with
``call_soon`` (thread-safe) and device timers run here with ``call_at``.
Deadlines are nanoseconds of the loop's ``HostClock`` (``time.monotonic_ns``
unless another is injected); how long the selector waits comes from that
clock too, so a test can run the loop on a clock it advances.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
from typing import Callable

from xenkvm.machine.clock import MONOTONIC, HostClock

log = logging.getLogger(__name__)
COMPACT_MIN = 1024


class TimerHandle:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: int, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class IoLoop:
    def __init__(self, name: str = "io", clock: HostClock = MONOTONIC):
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[int, int, TimerHandle]] = []
        self._compact_at = COMPACT_MIN
        self._seq = itertools.count()
        self._soon: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._idle_waiters: list[threading.Event] = []
        self._stop = False
        self.passes = 0     #: times the loop thread came out of its wait (statistics: the cost lines)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        clock.on_jump(self._wake)

    # -- any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the loop thread and close its pipe.  Idempotent: a second call, or a wake-up from
        a clock jump afterwards, must not touch the fd numbers, which may belong to someone else
        by then (a late close or write there would hit another machine's eventfd or socket)."""
        self._stop = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            if self._wake_w < 0:
                return
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._soon.append(fn)
        self._wake()

    def call_at(self, deadline_ns: int, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` on the loop thread at ``deadline_ns``.  The loop is woken only when this
        timer is now the earliest: its wait already ends at or before the earliest one's
        deadline (read under the lock, see ``_timeout``), and looks again then.  A guest that
        re-arms its Xen timer later (Linux entering idle) costs no thread hand-off."""
        handle = TimerHandle(deadline_ns, fn)
        with self._lock:
            if len(self._timers) >= self._compact_at:
                self._compact()
            earliest = not self._timers or deadline_ns < self._timers[0][0]
            heapq.heappush(self._timers, (deadline_ns, next(self._seq), handle))
        if earliest:
            self._wake()
        return handle

    def _compact(self) -> None:
        """Drop cancelled timers (a guest re-arming far deadlines must not grow the heap)."""
        self._timers = [t for t in self._timers if not t[2].cancelled]
        heapq.heapify(self._timers)
        self._compact_at = max(COMPACT_MIN, 2 * len(self._timers))

    def call_later(self, delay_ns: int, fn: Callable[[], None]) -> TimerHandle:
        return self.call_at(self.clock.now_ns() + delay_ns, fn)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until the loop has run everything due: no call_soon work left and no
        timer at or before the clock's now (so a test knows what has, and has not, fired)."""
        ev = threading.Event()
        with self._lock:
            self._idle_waiters.append(ev)
        self._wake()
        return ev.wait(timeout)

    def add_reader(self, fd: int, fn: Callable[[], None]) -> None:
        self.call_soon(lambda: self._sel.register(fd, selectors.EVENT_READ, fn))

    def remove_reader(self, fd: int) -> None:
        def remove() -> None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self.call_soon(remove)

    def _wake(self) -> None:
        with self._lock:                # stop() closes the pipe under it
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    # -- the loop thread ----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            ready = self._sel.select(self._timeout())
            self.passes += 1
            for key, _ in ready:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self._safe(key.data)
            self._run_soon()
            self._run_timers()
            self._release_idle_waiters()

    def _timeout(self) -> float | None:
        with self._lock:
            if self._soon:
                return 0
            if not self._timers:
                return None
            return self.clock.wait_s(self._timers[0][0] - self.clock.now_ns())

    def _release_idle_waiters(self) -> None:
        now = self.clock.now_ns()
        with self._lock:
            if not self._idle_waiters or self._soon or (self._timers and self._timers[0][0] <= now):
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        for ev in waiters:
            ev.set()

    def _run_soon(self) -> None:
        with self._lock:
            soon, self._soon = self._soon, []
        for fn in soon:
            self._safe(fn)

    def _run_timers(self) -> None:
        now = self.clock.now_ns()
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self._safe(handle.fn)

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("I/O thread callback failed")
