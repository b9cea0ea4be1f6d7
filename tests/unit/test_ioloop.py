"""The I/O thread: timers in order, cross-thread calls, cancellation and heap compaction."""
from __future__ import annotations

import os
import threading
import time

from xenkvm.machine.ioloop import COMPACT_MIN, IoLoop


def test_timers_fire_in_deadline_order_and_cancel():
    loop = IoLoop()
    loop.start()
    fired: list[int] = []
    done = threading.Event()
    now = time.monotonic_ns()
    loop.call_at(now + 30_000_000, lambda: (fired.append(3), done.set()))
    loop.call_at(now + 10_000_000, lambda: fired.append(1))
    cancelled = loop.call_at(now + 20_000_000, lambda: fired.append(2))
    cancelled.cancel()
    assert done.wait(2)
    loop.stop()
    assert fired == [1, 3]


def test_call_soon_from_other_threads_and_readers():
    loop = IoLoop()
    loop.start()
    got = []
    ev = threading.Event()
    r, w = os.pipe()
    loop.add_reader(r, lambda: (got.append(os.read(r, 10)), ev.set()))
    threading.Thread(target=lambda: loop.call_soon(lambda: os.write(w, b"x"))).start()
    assert ev.wait(2)
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


def test_a_failing_callback_does_not_kill_the_loop():
    loop = IoLoop()
    loop.start()
    ev = threading.Event()
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(ev.set)
    assert ev.wait(2)
    loop.stop()
