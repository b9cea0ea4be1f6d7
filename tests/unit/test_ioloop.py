"""The I/O thread: timers in order, cross-thread calls, cancellation and heap compaction.

Timer tests run the loop on a ``FakeClock``: nothing fires until the test
advances it, and ``wait_idle`` says when everything due has run.  One smoke
test uses the real clock.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from fakeclock import FakeClock
from xenkvm.machine.clock import GuestClock
from xenkvm.machine.ioloop import COMPACT_MIN, IoLoop

MS = 1_000_000


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def loop(clock):
    lp = IoLoop("test-io", clock=clock)
    lp.start()
    yield lp
    lp.stop()


def test_timers_fire_in_deadline_order_and_cancel(loop, clock):
    fired: list[tuple[int, int]] = []
    now = clock.now_ns()
    loop.call_at(now + 30 * MS, lambda: fired.append((3, clock.now_ns())))
    loop.call_at(now + 10 * MS, lambda: fired.append((1, clock.now_ns())))
    cancelled = loop.call_at(now + 20 * MS, lambda: fired.append((2, clock.now_ns())))
    cancelled.cancel()
    loop.call_later(40 * MS, lambda: fired.append((4, clock.now_ns())))
    assert loop.wait_idle() and fired == []
    clock.advance(10 * MS - 1)
    assert loop.wait_idle() and fired == []           # one ns early: nothing
    clock.advance(1)
    assert loop.wait_idle() and fired == [(1, now + 10 * MS)]
    clock.advance(25 * MS)                            # past 20 (cancelled) and 30
    assert loop.wait_idle() and fired == [(1, now + 10 * MS), (3, now + 35 * MS)]
    clock.advance(5 * MS)
    assert loop.wait_idle() and [f[0] for f in fired] == [1, 3, 4]


def test_the_loop_waits_on_its_clock_not_real_time(loop, clock):
    """A timer 1 ns ahead on a clock nobody advances never fires, however long real time runs."""
    fired = threading.Event()
    loop.call_later(1, fired.set)
    assert loop._timeout() is None                    # the selector blocks until woken
    for _ in range(3):
        assert loop.wait_idle()
    assert not fired.is_set()
    clock.advance(1)                                  # advancing wakes the loop by itself
    assert fired.wait(10)


def test_timers_armed_from_a_timer_run_when_due(loop, clock):
    order = []
    loop.call_later(5 * MS, lambda: (order.append("a"), loop.call_later(5 * MS, lambda: order.append("b"))))
    clock.advance(5 * MS)
    assert loop.wait_idle() and order == ["a"]
    clock.advance(5 * MS)
    assert loop.wait_idle() and order == ["a", "b"]


def test_guest_clock_follows_its_host_clock(clock):
    guest = GuestClock(1, 15, host=clock)             # dilated 15x, as on PVM hosts
    assert guest.ns() == 0 and guest.boot_ns == clock.now_ns()
    clock.advance(15 * MS)
    assert guest.ns() == MS
    assert guest.monotonic_at(2 * MS) == guest.boot_ns + 30 * MS


def test_real_clock_smoke():
    """On the real clock: timers fire in order, never early, within generous bounds."""
    loop = IoLoop()
    loop.start()
    fired: list[tuple[int, int]] = []
    done = threading.Event()
    now = time.monotonic_ns()
    loop.call_at(now + 30 * MS, lambda: (fired.append((3, time.monotonic_ns())), done.set()))
    loop.call_at(now + 10 * MS, lambda: fired.append((1, time.monotonic_ns())))
    loop.call_at(now + 20 * MS, lambda: fired.append((2, time.monotonic_ns()))).cancel()
    assert done.wait(30)
    loop.stop()
    assert [f[0] for f in fired] == [1, 3]
    assert fired[0][1] >= now + 10 * MS and fired[1][1] >= now + 30 * MS


def test_call_soon_from_other_threads_and_readers():
    loop = IoLoop()
    loop.start()
    got = []
    ev = threading.Event()
    r, w = os.pipe()
    loop.add_reader(r, lambda: (got.append(os.read(r, 10)), ev.set()))
    threading.Thread(target=lambda: loop.call_soon(lambda: os.write(w, b"x"))).start()
    assert ev.wait(10)
    loop.stop()
    os.close(r)
    os.close(w)
    assert got == [b"x"]


def test_cancelled_far_timers_do_not_pile_up():
    loop = IoLoop()
    far = time.monotonic_ns() + 10**12
    for _ in range(20 * COMPACT_MIN):
        loop.call_at(far, lambda: None).cancel()
    assert len(loop._timers) <= 2 * COMPACT_MIN
    loop.stop()


def test_a_failing_callback_does_not_kill_the_loop(loop):
    ev = threading.Event()
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(ev.set)
    assert ev.wait(10)


def test_wait_idle_runs_call_soon_work_first(loop):
    seen = []
    for i in range(100):
        loop.call_soon(lambda i=i: seen.append(i))
    assert loop.wait_idle()
    assert seen == list(range(100))


def _woken(lp: IoLoop) -> bool:
    """Whether a wake-up is waiting in the loop's pipe (drained; the loop thread is not running)."""
    try:
        return len(os.read(lp._wake_r, 4096)) > 0
    except BlockingIOError:
        return False


def test_only_a_new_earliest_timer_wakes_the_loop(clock):
    """A timer due after the earliest one needs no wake-up (the loop's wait ends at the earliest
    and looks again); a new earliest one does.  Each still fires at its time."""
    lp = IoLoop("test-io", clock=clock)     # not started: what each call_at writes to the pipe stays there
    fired: list[str] = []
    try:
        lp.call_later(20 * MS, lambda: fired.append("20"))
        assert _woken(lp)                       # the first timer: the loop waited for nothing
        lp.call_later(30 * MS, lambda: fired.append("30"))
        lp.call_later(20 * MS, lambda: fired.append("20b"))     # not earlier than the earliest
        assert not _woken(lp)
        lp.call_later(10 * MS, lambda: fired.append("10"))
        assert _woken(lp)
        lp.start()
        clock.advance(10 * MS)
        assert lp.wait_idle() and fired == ["10"]
        clock.advance(10 * MS)
        assert lp.wait_idle() and fired == ["10", "20", "20b"]
        clock.advance(10 * MS)
        assert lp.wait_idle() and fired == ["10", "20", "20b", "30"]
    finally:
        lp.stop()


def test_a_later_timer_armed_while_the_loop_waits_fires(loop, clock):
    """The loop waits for the earliest timer; one armed behind it (no wake-up) runs after it."""
    fired: list[str] = []
    loop.call_later(10 * MS, lambda: fired.append("a"))
    assert loop.wait_idle()
    passes = loop.passes
    loop.call_later(15 * MS, lambda: fired.append("b"))
    clock.advance(15 * MS)
    assert loop.wait_idle() and fired == ["a", "b"] and loop.passes > passes


def test_a_stopped_loop_leaves_reused_fd_numbers_alone(clock):
    """stop() twice, and a clock jump after it, must not close or write whatever now holds
    the pipe's old fd numbers (another machine's eventfd, a store socket)."""
    lp = IoLoop("test-io", clock=clock)
    lp.start()
    old = {lp._wake_r, lp._wake_w}
    lp.stop()
    held: list[int] = []
    try:
        while not old <= set(held) and len(held) < 16:   # the kernel reuses the lowest free numbers
            held.append(os.eventfd(0, os.EFD_NONBLOCK))
        assert old <= set(held)
        lp.stop()
        lp.call_soon(lambda: None)
        clock.advance(MS)
        for fd in old:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)       # nothing was written there, and it is still open
    finally:
        for fd in held:
            os.close(fd)
