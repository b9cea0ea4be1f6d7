"""Backend notifies delivered in C (xenkvm/xen/evtchn/cdeliver.py, ``xkd_notify``).

Two fake domains (real memory, lock, dispatcher, event channels) get the same VMM kick port;
one is notified through C, the other through Python (``VmmPorts.notify``, the reference).
Whatever the guest does in between (acknowledging, masking, rebinding), the guest-visible
state (shared_info's pending and mask words, each vcpu_info's pending selector and
upcall_pending) and the upcalls raised must never differ.  The fakes have no VM fd, so C
hands the upcall itself to Python (``XKD_RAISE``): the recorder sees it either way.
"""
from __future__ import annotations

import os
import random
import time

import pytest
from tests.xen.evtchnfakes import SHINFO, FakeDomain, hc

from xenkvm.xen.abi import Errno, EvtchnOp, Hypercall, ffi
from xenkvm.xen.abi import lib as xlib
from xenkvm.xen.evtchn.cdeliver import PYTHON, CDelivery, changes_delivery

VECTOR = 0xF3
PENDING_OFF = ffi.offsetof("struct shared_info", "evtchn_pending")
MASK_OFF = ffi.offsetof("struct shared_info", "evtchn_mask")
SEL_OFF = ffi.offsetof("struct vcpu_info", "evtchn_pending_sel")
UPCALL_OFF = ffi.offsetof("struct vcpu_info", "evtchn_upcall_pending")


def make_domain(nvcpus: int = 2) -> FakeDomain:
    d = FakeDomain(nvcpus=nvcpus)
    for v in d.vcpus:
        v.upcall_vector = VECTOR
    d.vcpu_state = lambda v: d.vcpus[v]
    d.cdeliver = CDelivery(d, -1)
    d.evtchn.pollers.on_count = d.cdeliver.pollers
    return d


def bound_port(d: FakeDomain) -> int:
    """A guest port allocated for domain 0, bound by a 'backend' with a kick eventfd."""
    buf = ffi.new("struct evtchn_alloc_unbound *")
    buf.dom, buf.remote_dom = xlib.DOMID_SELF, 0
    gpa = 0x8000
    d.mem.write(gpa, bytes(ffi.buffer(buf)))
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.alloc_unbound, gpa) == 0
    port = int(ffi.cast("struct evtchn_alloc_unbound *", ffi.from_buffer(d.mem.view(gpa, ffi.sizeof(buf)))).port)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    d._fds = getattr(d, "_fds", []) + [fd]
    d.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    return port


@pytest.fixture
def pair():
    a, b = make_domain(), make_domain()
    yield a, b
    for d in (a, b):
        d.cdeliver.close()
        for fd in getattr(d, "_fds", []):
            os.close(fd)
        d.close()


def guest_state(d: FakeDomain) -> tuple:
    m = d.mem
    words = (bytes(m.read(SHINFO + PENDING_OFF, 64)), bytes(m.read(SHINFO + MASK_OFF, 64)))
    vis = tuple((bytes(m.read(d.vcpu_info_gpa(v) + SEL_OFF, 8)), bytes(m.read(d.vcpu_info_gpa(v) + UPCALL_OFF, 1)))
                for v in range(len(d.vcpus)))
    return words, vis, tuple(d.upcalls.calls)


def test_a_c_notify_leaves_what_the_python_one_leaves(pair):
    c, py = pair
    pc, pp = bound_port(c), bound_port(py)
    assert pc == pp
    c.cdeliver.notify(pc)
    py.evtchn.notify(pp)
    assert guest_state(c) == guest_state(py)
    assert c.cdeliver.notifies == 1 and c.cdeliver.declined == 0
    assert c.upcalls.calls and c.upcalls.calls[-1] == 0      # vCPU 0's upcall


@pytest.mark.parametrize("seed", range(6))
def test_random_guest_and_backend_actions_never_tell_c_from_python(pair, seed):
    """Notifies, the guest's acknowledgements, masks, unmasks and rebinds, in a random order."""
    rnd = random.Random(seed)
    c, py = pair
    port = bound_port(c)
    assert bound_port(py) == port
    word, bit = port // 64, 1 << (port % 64)

    def act(d, what, vcpu):
        m = d.mem
        if what == "notify":
            (d.cdeliver.notify if d is c else d.evtchn.notify)(port)
        elif what == "ack":         # the guest's upcall handler: upcall_pending, sel, pending cleared
            vi = d.vcpu_info_gpa(vcpu)
            m.write(vi + UPCALL_OFF, b"\0")
            m.write(vi + SEL_OFF, bytes(8))
            m.write(SHINFO + PENDING_OFF + 8 * word, bytes(8))
        elif what == "mask":
            cur = int.from_bytes(m.read(SHINFO + MASK_OFF + 8 * word, 8), "little")
            m.write(SHINFO + MASK_OFF + 8 * word, (cur | bit).to_bytes(8, "little"))
        elif what == "unmask":
            req = ffi.new("struct evtchn_unmask *", {"port": port})
            m.write(0x9000, bytes(ffi.buffer(req)))
            assert hc(d, Hypercall.event_channel_op, EvtchnOp.unmask, 0x9000) == 0
        elif what == "rebind":
            req = ffi.new("struct evtchn_bind_vcpu *", {"port": port, "vcpu": vcpu})
            m.write(0x9000, bytes(ffi.buffer(req)))
            assert hc(d, Hypercall.event_channel_op, EvtchnOp.bind_vcpu, 0x9000) == 0

    for _ in range(200):
        what = rnd.choice(["notify", "notify", "notify", "ack", "mask", "unmask", "rebind"])
        vcpu = rnd.randrange(2)
        for d in (c, py):
            act(d, what, vcpu)
        assert guest_state(c) == guest_state(py), what
    assert c.cdeliver.notifies > 0 and c.cdeliver.declined == 0


def test_c_declines_what_it_does_not_have(pair):
    c, _ = pair
    port = bound_port(c)
    from xenkvm.xen._fast_cffi import lib
    assert lib.xkd_notify(c.cdeliver.c, port + 1) == PYTHON          # not a kick port of the VMM
    c.cdeliver.hold()                                               # a hypercall is changing things
    assert lib.xkd_notify(c.cdeliver.c, port) == PYTHON
    with c.lock:
        c.cdeliver.reload()
    assert lib.xkd_notify(c.cdeliver.c, port) == lib.XKD_RAISE     # delivered (no VM fd: Python raises)
    c.mem.write(SHINFO + PENDING_OFF, bytes(8))                     # the guest took it
    c.vcpus[0].upcall_vector = 0                                    # the global callback instead
    with c.lock:
        c.cdeliver.reload()
    assert lib.xkd_notify(c.cdeliver.c, port) == PYTHON
    c.vcpus[0].upcall_vector = VECTOR
    with c.lock:
        c.cdeliver.reload()
    c.evtchn.close_vmm_port(port)                                   # the backend let go
    assert lib.xkd_notify(c.cdeliver.c, port) == PYTHON
    c.cdeliver.close()
    with c.lock:
        c.cdeliver.reload()                                         # closed is closed
    assert lib.xkd_notify(c.cdeliver.c, 0) == PYTHON


def test_a_declined_notify_is_delivered_by_python(pair):
    c, py = pair
    port = bound_port(c)
    bound_port(py)
    c.cdeliver.hold()
    c.cdeliver.notify(port)                 # C declines: the Python path delivers it
    py.evtchn.notify(port)
    assert guest_state(c) == guest_state(py) and c.cdeliver.fallbacks == 1


def test_pollers_are_handed_to_python(pair):
    from xenkvm.xen._fast_cffi import lib
    c, _ = pair
    port = bound_port(c)
    c.cdeliver.pollers(1)                   # a vCPU counted itself in before looking
    r = lib.xkd_notify(c.cdeliver.c, port)
    assert r & lib.XKD_POLLERS and r & lib.XKD_KICK and r & lib.XKD_RAISE and r >> 8 == 0
    assert lib.xkd_notify(c.cdeliver.c, port) == 0      # already pending: nothing for anyone
    c.cdeliver.pollers(-1)


def test_the_dispatcher_reloads_c_after_a_rebind(pair):
    c, py = pair
    port = bound_port(c)
    bound_port(py)
    for d in (c, py):
        req = ffi.new("struct evtchn_bind_vcpu *", {"port": port, "vcpu": 1})
        d.mem.write(0x9000, bytes(ffi.buffer(req)))
        assert hc(d, Hypercall.event_channel_op, EvtchnOp.bind_vcpu, 0x9000) == 0
    c.cdeliver.notify(port)
    py.evtchn.notify(port)
    assert guest_state(c) == guest_state(py) and c.upcalls.calls[-1] == 1


def test_fifo_guests_stay_on_python(pair):
    """C delivery is 2-level only: once the guest switches to FIFO, C declines every notify."""
    from xenkvm.xen._fast_cffi import lib
    c, _ = pair
    port = bound_port(c)
    c.mem.write(0x20000, bytes(4096))
    req = ffi.new("struct evtchn_init_control *", {"control_gfn": 0x20, "offset": 0, "vcpu": 0})
    c.mem.write(0x9000, bytes(ffi.buffer(req)))
    assert hc(c, Hypercall.event_channel_op, EvtchnOp.init_control, 0x9000) == 0
    assert c.evtchn.delivery.name == "fifo"
    assert lib.xkd_notify(c.cdeliver.c, port) == PYTHON


def test_which_hypercalls_hold_c_off():
    op = xlib.__HYPERVISOR_event_channel_op
    assert not changes_delivery(op, (EvtchnOp.send, 0))
    assert changes_delivery(op, (EvtchnOp.bind_vcpu, 0)) and changes_delivery(op, (EvtchnOp.close, 0))
    assert changes_delivery(op, (EvtchnOp.bind_virq, 0))                   # VIRQ_TIMER: the timer thread's
    assert changes_delivery(xlib.__HYPERVISOR_memory_op, (7, 0))          # shared_info may move
    assert changes_delivery(xlib.__HYPERVISOR_hvm_op, (0, 0))             # upcall vectors, callback
    assert changes_delivery(xlib.__HYPERVISOR_sched_op, (xlib.SCHEDOP_shutdown, 0))
    assert not changes_delivery(xlib.__HYPERVISOR_sched_op, (xlib.SCHEDOP_poll, 0))
    assert changes_delivery(xlib.__HYPERVISOR_vcpu_op, (xlib.VCPUOP_register_vcpu_info, 0))


def test_fifo_events_false_answers_the_fifo_ops_enosys(pair):
    """``xen.fifo_events: false`` (the default): Linux's init_control fails (it then stays on
    2-level, as under QEMU)."""
    import dataclasses
    c, _ = pair
    c.cfg = dataclasses.replace(c.cfg, fifo_events=False)
    req = ffi.new("struct evtchn_init_control *", {"control_gfn": 0x20, "offset": 0, "vcpu": 0})
    c.mem.write(0x9000, bytes(ffi.buffer(req)))
    assert hc(c, Hypercall.event_channel_op, EvtchnOp.init_control, 0x9000) == -Errno.ENOSYS
    assert c.evtchn.delivery.name == "2l"
    for op in (EvtchnOp.expand_array, EvtchnOp.set_priority):
        assert hc(c, Hypercall.event_channel_op, op, 0x9000) == -Errno.ENOSYS


def test_fifo_events_is_a_boolean_key():
    from xenkvm.config import ConfigError, _xen as parse_xen
    assert parse_xen({"fifo_events": False}).fifo_events is False
    assert parse_xen({}).fifo_events is False        # 2-level by default, as QEMU
    assert parse_xen({"fifo_events": True}).fifo_events is True
    with pytest.raises(ConfigError, match="xen.fifo_events"):
        parse_xen({"fifo_events": "no"})


# -- VIRQ_TIMER fired by the timer thread in C (xen/timers.py CTimerThread, ``xkt_wait``) ----------
def bind_timer(d: FakeDomain, vcpu: int) -> int:
    """The guest binds VIRQ_TIMER of ``vcpu`` (through the dispatcher: C reloads after it)."""
    req = ffi.new("struct evtchn_bind_virq *", {"virq": xlib.VIRQ_TIMER, "vcpu": vcpu})
    d.mem.write(0x9000, bytes(ffi.buffer(req)))
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.bind_virq, 0x9000) == 0
    return int(ffi.cast("struct evtchn_bind_virq *", ffi.from_buffer(d.mem.view(0x9000, ffi.sizeof(req)))).port)


def with_c_timers(d: FakeDomain) -> None:
    d.timers.use_fast(d.fast)
    d.fast.publish_clock((d.clock.boot_ns, 0, 1, 1))


def wait_for(cond, seconds: float = 20.0) -> bool:
    """Real time only bounds the wait (the thread runs on CLOCK_MONOTONIC); the test asserts the outcome."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture
def timed_pair(pair):
    for d in pair:
        with_c_timers(d)
    yield pair
    for d in pair:
        d.timers.detach_fast()
        d.fast.close()


def test_a_c_timer_fires_virq_timer_as_python_would(timed_pair):
    from xenkvm.xen._fast_cffi import lib
    c, py = timed_pair
    assert bind_timer(c, 1) == bind_timer(py, 1)
    assert lib.xkf_timer_arm(c.fast.c, 1, c.now_ns() + 2_000_000)
    assert wait_for(lambda: c.timers.fired_in_c() == 1)
    py.timers._fire(1)                                  # the Python path: raise_virq
    assert guest_state(c) == guest_state(py) and c.upcalls.calls == [1]
    assert c.timers.fired == [0, 1] and c.fast.timer_deadline(1) is None      # taken: fires once


def test_a_timer_c_cannot_deliver_goes_to_python_untaken(timed_pair):
    """Held off (a hypercall or a snapshot) or nothing bound: the thread hands the vCPU to
    Python's look, which takes the deadline and fires under the domain's lock."""
    from xenkvm.xen._fast_cffi import lib
    c, py = timed_pair
    bind_timer(c, 0)
    bind_timer(py, 0)
    c.cdeliver.hold()
    assert lib.xkf_timer_arm(c.fast.c, 0, c.now_ns() + 2_000_000)
    assert wait_for(lambda: c.timers.fired == [1, 0])
    assert c.timers.fired_in_c() == 0 and c.fast.timer_deadline(0) is None
    py.timers._fire(0)
    assert guest_state(c) == guest_state(py)
    with c.lock:
        c.cdeliver.reload()
    before = guest_state(c)
    assert lib.xkf_timer_arm(c.fast.c, 1, c.now_ns() + 2_000_000)   # vCPU 1: no VIRQ_TIMER bound
    assert wait_for(lambda: c.timers.fired == [1, 1])                # Python's look took it...
    assert c.timers.fired_in_c() == 0 and guest_state(c) == before  # ...and had nothing to raise


def test_a_rearmed_timer_fires_for_its_new_deadline_only(timed_pair):
    from xenkvm.xen._fast_cffi import lib
    c, _ = timed_pair
    bind_timer(c, 0)
    assert lib.xkf_timer_arm(c.fast.c, 0, c.now_ns() + 3_000_000)
    assert lib.xkf_timer_arm(c.fast.c, 0, c.now_ns() + 3_600 * 10**9)      # re-armed an hour away
    time.sleep(0.05)                                    # past the first deadline: it must not fire
    assert c.timers.fired == [0, 0] and c.fast.timer_deadline(0) is not None
    assert lib.xkf_timer_arm(c.fast.c, 0, c.now_ns() + 1_000_000)
    assert wait_for(lambda: c.timers.fired == [1, 0])


def test_timers_held_by_the_snapshot_lock_stay_armed_or_are_delivered():
    """snapshot_begin holds C delivery off: a timer due meanwhile is left armed for Python,
    which waits for the domain's lock, so the saved state has it either armed or pending."""
    d = make_domain()
    with_c_timers(d)
    from xenkvm.xen._fast_cffi import lib
    try:
        bind_timer(d, 0)
        with d.lock:
            d.cdeliver.hold()
            assert lib.xkf_timer_arm(d.fast.c, 0, d.now_ns() + 1_000_000)
            time.sleep(0.05)
            assert d.timers.fired == [0, 0] and d.fast.timer_deadline(0) is not None
            d.cdeliver.reload()
        assert wait_for(lambda: d.timers.fired == [1, 0])
    finally:
        d.timers.detach_fast()
        d.fast.close()
        d.cdeliver.close()
        d.close()


def test_if_the_timer_thread_ends_the_io_thread_fires_the_timers():
    """The fallback of a failed timer thread (its poll errored): the I/O thread watches the
    timerfds again, and detaching removes them from its loop before they are closed."""
    d = make_domain()
    with_c_timers(d)
    from xenkvm.xen._fast_cffi import lib
    try:
        bind_timer(d, 0)
        d.timers._thread.stop()                     # as if it had died
        d.timers._watch_on_io()
        assert lib.xkf_timer_arm(d.fast.c, 0, d.now_ns() + 1_000_000)
        assert wait_for(lambda: d.timers.fired == [1, 0]) and d.timers.fired_in_c() == 0
    finally:
        d.timers._thread = None
        d.timers.detach_fast()
        assert not d.timers._on_io
        d.fast.close()
        d.cdeliver.close()
        d.close()
