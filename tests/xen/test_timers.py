"""vCPU timers (VCPUOP_*_timer, set_timer_op) through the real Dispatcher with the shared fake domain.

Expiry runs on a real IoLoop and raises VIRQ_TIMER through real EventChannels;
the upcall is observed on the fake domain's recorder.  The domain's clock is a
``FakeClock``: the test moves time with ``advance`` and ``io.wait_idle()``
returns once everything due has run, so every assertion about what has (or
has not) fired is exact.  One smoke test at the end runs on the real clock.
"""
from __future__ import annotations

import json
import time

import pytest

from fakeclock import FakeClock
from xenkvm.xen.abi import Errno, EvtchnOp, Hypercall, VcpuOp, ffi, lib
from evtchnfakes import SHINFO, FakeDomain, hc
from xenkvm.xen.timers import HUGE_TIMEOUT_REPLACEMENT_NS

RAM = 4 << 20
ARG = 0x20000
SH_PENDING = ffi.offsetof("struct shared_info", "evtchn_pending")
MS = 1_000_000


def bind_timer_virqs(dom) -> dict[int, int]:
    """Linux binds VIRQ_TIMER on every vCPU before arming its clockevent."""
    ports = {}
    for v in range(2):
        obj = ffi.new("struct evtchn_bind_virq *", {"virq": lib.VIRQ_TIMER, "vcpu": v})
        dom.mem.write(ARG, bytes(ffi.buffer(obj)))
        assert hc(dom, Hypercall.event_channel_op, EvtchnOp.bind_virq, ARG) == 0
        ports[v] = dom.mem.read_u32(ARG + ffi.offsetof("struct evtchn_bind_virq", "port"))
    return ports


@pytest.fixture
def d():
    clock = FakeClock()
    dom = FakeDomain(ram=RAM, clock=clock)
    dom.fake_clock = clock
    dom.ports = bind_timer_virqs(dom)
    clock.advance(MS)               # the guest has run for 1 ms: system time 1 is past
    yield dom
    dom.close()


def advance(d, ns: int) -> None:
    """Move the domain's clock by ``ns`` and let the I/O loop run everything now due."""
    d.fake_clock.advance(ns)
    assert d.io.wait_idle()


def singleshot(d, deadline, flags=0, vcpu=0, target=None):
    obj = ffi.new("struct vcpu_set_singleshot_timer *", {"timeout_abs_ns": deadline, "flags": flags})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    return hc(d, Hypercall.vcpu_op, VcpuOp.set_singleshot_timer, vcpu if target is None else target, ARG, vcpu=vcpu)


def periodic(d, period, vcpu=0, target=None):
    obj = ffi.new("struct vcpu_set_periodic_timer *", {"period_ns": period})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    return hc(d, Hypercall.vcpu_op, VcpuOp.set_periodic_timer, vcpu if target is None else target, ARG, vcpu=vcpu)


def timer_pending(d, v):
    port = d.ports[v]
    return bool(d.mem.read(SHINFO + SH_PENDING + port // 8, 1)[0] >> (port % 8) & 1)


def ack(d, v):
    """The guest handles the event: clear pending, sel and upcall_pending."""
    port = d.ports[v]
    b = d.mem.read(SHINFO + SH_PENDING + port // 8, 1)[0]
    d.mem.write(SHINFO + SH_PENDING + port // 8, bytes([b & ~(1 << (port % 8))]))
    d.mem.write(SHINFO + 64 * v, b"\0" * 16)


def test_singleshot_fires_at_its_deadline(d):
    armed = d.fake_clock.now_ns()
    assert singleshot(d, d.now_ns() + 20 * MS) == 0
    assert not timer_pending(d, 0) and d.upcalls.calls == []
    assert d.timers.singleshot_deadline(0) is not None
    advance(d, 20 * MS - 1)
    assert d.upcalls.calls == [] and d.timers.fired == [0, 0]
    advance(d, 1)
    assert d.upcalls.events == [(0, armed + 20 * MS)]
    assert timer_pending(d, 0) and not timer_pending(d, 1)
    assert d.timers.singleshot_deadline(0) is None and d.timers.fired == [1, 0]


def test_singleshot_on_vcpu1_raises_vcpu1(d):
    assert singleshot(d, d.now_ns() + 2 * MS, vcpu=1) == 0
    advance(d, 2 * MS)
    assert d.upcalls.calls == [1] and timer_pending(d, 1) and not timer_pending(d, 0)


def test_past_deadline_fires_at_once_unless_future_flag(d):
    assert singleshot(d, 1, flags=lib.VCPU_SSHOTTMR_future) == -Errno.ETIME
    assert d.upcalls.calls == [] and not timer_pending(d, 0)
    assert singleshot(d, 1) == 0               # flags 0 (what Linux uses): fires now
    assert timer_pending(d, 0) and d.upcalls.calls == [0]
    assert d.timers.singleshot_deadline(0) is None
    assert singleshot(d, d.now_ns() + 50 * MS, flags=lib.VCPU_SSHOTTMR_future) == 0


def test_stop_and_rearm_singleshot(d):
    assert singleshot(d, d.now_ns() + 15 * MS) == 0
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_singleshot_timer, 0, 0) == 0
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_singleshot_timer, 0, 0) == 0     # idempotent
    advance(d, 20 * MS)
    assert d.upcalls.calls == []                 # the stopped timer never fires
    # Re-arming replaces the earlier deadline.
    assert singleshot(d, d.now_ns() + 5 * MS) == 0
    assert singleshot(d, d.now_ns() + 40 * MS) == 0
    advance(d, 30 * MS)
    assert d.upcalls.calls == []                 # 5 ms was replaced
    advance(d, 10 * MS)
    assert d.upcalls.calls == [0]
    advance(d, 100 * MS)
    assert d.upcalls.calls == [0] and d.timers.fired == [1, 0]


def test_singleshot_vcpu_checks(d):
    assert singleshot(d, d.now_ns() + MS, vcpu=0, target=1) == -Errno.EINVAL   # only on itself
    assert singleshot(d, d.now_ns() + MS, vcpu=0, target=2) == -Errno.ENOENT
    assert singleshot(d, d.now_ns() + MS, vcpu=0, target=(1 << 64) - 1) == -Errno.ENOENT
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_singleshot_timer, 1, 0, vcpu=0) == -Errno.EINVAL
    assert hc(d, Hypercall.vcpu_op, VcpuOp.set_singleshot_timer, 0, 1 << 45) == -Errno.EFAULT
    assert hc(d, Hypercall.vcpu_op, VcpuOp.set_periodic_timer, 0, RAM - 4) == -Errno.EFAULT


def test_periodic_timer_ticks_and_stops(d):
    assert periodic(d, MS - 1) == -Errno.EINVAL
    assert periodic(d, 1 << 62) == -Errno.EINVAL
    assert periodic(d, 5 * MS, target=3) == -Errno.ENOENT
    assert periodic(d, 5 * MS, vcpu=0, target=1) == 0          # any vCPU may set another's
    assert d.timers.periodic_period(1) == 5 * MS
    advance(d, 5 * MS - 1)
    assert d.timers.fired == [0, 0]                            # first tick one period away
    for tick in range(1, 5):
        advance(d, 1 if tick == 1 else 5 * MS)
        assert d.timers.fired == [0, tick] and d.upcalls.calls == [1] * tick
        ack(d, 1)
    # Xen re-anchors at the expiry time: a late expiry is one tick, not a burst.
    advance(d, 23 * MS)
    assert d.timers.fired == [0, 5]
    advance(d, 5 * MS)
    assert d.timers.fired == [0, 6]
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_periodic_timer, 1, 0) == 0
    assert d.timers.periodic_period(1) == 0
    advance(d, 100 * MS)
    assert d.timers.fired == [0, 6]


def test_stop_periodic_succeeds_without_a_timer(d):
    # Linux picks the vcpuop clockevent only if this returns 0 (and BUGs otherwise later).
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_periodic_timer, 0, 0) == 0
    assert hc(d, Hypercall.vcpu_op, VcpuOp.stop_periodic_timer, 9, 0) == -Errno.ENOENT


def test_set_timer_op(d):
    now = d.now_ns()
    assert hc(d, Hypercall.set_timer_op, now + 30 * MS) == 0
    assert d.timers.singleshot_deadline(0) == now + 30 * MS
    assert hc(d, Hypercall.set_timer_op, 0) == 0                 # 0 stops it
    assert d.timers.singleshot_deadline(0) is None
    advance(d, 40 * MS)
    assert d.timers.fired == [0, 0]
    # More than 2^50 ns ahead (wrapped guest arithmetic): 100 ms from now instead.
    now = d.now_ns()
    assert hc(d, Hypercall.set_timer_op, now + (1 << 51)) == 0
    assert d.timers.singleshot_deadline(0) == now + HUGE_TIMEOUT_REPLACEMENT_NS
    # A negative (wrapped) deadline is in the past: fires at once.
    assert hc(d, Hypercall.set_timer_op, (1 << 64) - 5) == 0
    assert timer_pending(d, 0) and d.timers.singleshot_deadline(0) is None
    # 32-bit guests pass the deadline in two registers.
    target = d.now_ns() + 40 * MS
    assert hc(d, Hypercall.set_timer_op, target & 0xFFFFFFFF, target >> 32, vcpu=1, long_mode=False) == 0
    assert d.timers.singleshot_deadline(1) == target


def test_far_deadlines_are_chained_through_a_short_horizon(d, monkeypatch):
    monkeypatch.setattr("xenkvm.xen.timers.HORIZON_NS", 5 * MS)
    armed = d.fake_clock.now_ns()
    assert singleshot(d, d.now_ns() + 30 * MS) == 0
    assert max(h[0] for h in d.io._timers) == armed + 5 * MS    # only one horizon ahead
    for _ in range(5):
        advance(d, 5 * MS)
        assert d.timers.fired == [0, 0]
    advance(d, 5 * MS)
    assert d.upcalls.events == [(0, armed + 30 * MS)] and d.timers.fired == [1, 0]
    # A deadline >= 2^63 is a negative system time for Xen's timer: it fires at once.
    assert singleshot(d, (1 << 64) - 1, flags=lib.VCPU_SSHOTTMR_future) == 0
    assert d.timers.fired == [2, 0]
    # Re-arming far ahead again and again leaves only horizon-bounded entries behind.
    for _ in range(200):
        assert hc(d, Hypercall.set_timer_op, d.now_ns() + (1 << 49)) == 0
    now = d.fake_clock.now_ns()
    assert all(h[0] <= now + 5 * MS for h in d.io._timers)


def test_timer_without_bound_virq_is_harmless():
    clock = FakeClock()
    d = FakeDomain(ram=RAM, clock=clock)
    clock.advance(MS)
    try:
        assert singleshot(d, 1) == 0
        assert d.timers.fired == [1, 0] and d.upcalls.calls == []
    finally:
        d.close()


def test_state_round_trip_and_reset(d):
    base = d.now_ns()
    assert singleshot(d, base + 10_000 * MS) == 0
    assert periodic(d, 7 * MS, target=1) == 0
    state = json.loads(json.dumps(d.timers.to_state()))
    d.timers.reset()
    assert d.timers.singleshot_deadline(0) is None and d.timers.periodic_period(1) == 0
    advance(d, 7 * MS)
    assert d.timers.fired == [0, 0]              # reset cancelled the armed timers
    d.timers.from_state(state)
    assert d.timers.singleshot_deadline(0) == base + 10_000 * MS
    assert d.timers.periodic_period(1) == 7 * MS
    # The saved periodic deadline (base + 7 ms) is now past: it fires at once, then every 7 ms.
    assert d.io.wait_idle()
    assert d.timers.fired == [0, 1] and d.upcalls.calls == [1]
    d.timers.stop_vcpu(1)
    d.timers.stop_vcpu(0)
    assert d.timers.singleshot_deadline(0) is None
    advance(d, 20_000 * MS)
    assert d.timers.fired == [0, 1]


def test_real_clock_smoke():
    """The same path on the real clock: a 20 ms timer fires, never early, within generous bounds."""
    d = FakeDomain(ram=RAM)
    try:
        bind_timer_virqs(d)
        armed = time.monotonic_ns()
        assert singleshot(d, d.now_ns() + 20 * MS) == 0
        assert d.upcalls.wait(1, timeout=30)
        assert d.upcalls.events[0][1] - armed >= 20 * MS and d.timers.fired == [1, 0]
    finally:
        d.close()
