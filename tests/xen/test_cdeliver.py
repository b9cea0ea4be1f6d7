"""Notifies from C (xen/evtchn/cdeliver.py, ``xkd_notify``): the guest sees what the Python path gives.

Each test runs on the real event channels of a FakeDomain (no VM fd: C marks the
upcall and leaves the MSI to the recorded ``upcalls.raise_``); the real-KVM MSI
is exercised by the freestanding blkfront/netfront guests (tests/backends).
"""
from __future__ import annotations

import random

import pytest

from evtchnfakes import SHINFO, FakeDomain
from test_evtchn import (CB, EvtchnOp, consume, fifo, guest_ack, head, ipi, masked, op, pending, poll_in_thread,
                         ready, sel, set_bit, unbound, unmask, upcall_pending, word, word_gpa)
from xenkvm.xen._fast_cffi import lib as flib
from xenkvm.xen.abi import Hypercall, lib
from xenkvm.xen.evtchn.cdeliver import changes_delivery
from xenkvm.xen.evtchn.fifo import LINK_MASK, LINKED, MASKED, PENDING
from xenkvm.xen.evtchn.twolevel import SH_MASK, SH_PENDING

VECTOR = 0xF3


@pytest.fixture
def d():
    dom = FakeDomain()
    yield dom
    dom.io.stop()


def vmm_port(d, vcpu=0) -> int:
    """A guest-allocated port bound by a backend with a kick eventfd (as a ring's port is)."""
    port = unbound(d)
    if vcpu:
        assert bind_vcpu(d, port, vcpu) == 0
    d.evtchn.bind_vmm_to_guest_port(port, kick_fd=d.fast.lease_fd())
    guest_ack(d, 0)       # the bind's own notify (Xen's bind_interdomain) is not the test's
    if vcpu:
        guest_ack(d, vcpu)
    d.upcalls.calls.clear()
    return port


def bind_vcpu(d, port, vcpu):
    return op(d, EvtchnOp.bind_vcpu, "evtchn_bind_vcpu", port=port, vcpu=vcpu)[0]


def vectors(d, vector=VECTOR):
    """HVMOP_set_evtchn_upcall_vector on every vCPU (the fake's state; then the reload the
    hypercall's dispatch would do)."""
    for v in d.vcpus:
        v.upcall_vector = vector
    with d.lock:
        d.cdeliver.reload()


def counts(d):
    return d.cdeliver.notifies, d.cdeliver.fallbacks


def test_2l_notify_in_c_sets_pending_sel_and_upcall_once(d):
    vectors(d)
    a, b = vmm_port(d), vmm_port(d)
    d.cdeliver.notify(a)
    assert pending(d, a) and sel(d, 0) == 1 and upcall_pending(d, 0) == 1 and d.upcalls.calls == [0]
    d.cdeliver.notify(a)          # coalesced in the pending bit
    d.cdeliver.notify(b)          # a new port, the selector bit already set: no second upcall
    assert pending(d, b) and d.upcalls.calls == [0]
    assert counts(d) == (3, 0)
    guest_ack(d, 0)
    set_bit(d, SHINFO + SH_PENDING, b, False)
    set_bit(d, SHINFO + SH_MASK, b)
    d.cdeliver.notify(b)          # masked: pending only
    assert pending(d, b) and masked(d, b) and sel(d, 0) == 0 and d.upcalls.calls == [0]
    assert unmask(d, b) == 0      # the unmask hypercall (Python) delivers it
    assert sel(d, 0) == 1 and d.upcalls.calls == [0, 0]


def test_c_declines_what_it_cannot_do_and_python_delivers_it(d):
    a = vmm_port(d)
    d.cdeliver.notify(a)          # no upcall vector (the global callback or none): Python's
    assert counts(d) == (0, 1) and pending(d, a) and d.upcalls.calls == [0]
    vectors(d)
    guest_ack(d, 0)
    set_bit(d, SHINFO + SH_PENDING, a, False)
    d.cdeliver.hold()             # a hypercall that may change the state is running
    d.cdeliver.notify(a)
    assert counts(d) == (0, 2) and d.upcalls.calls == [0, 0]
    with d.lock:
        d.cdeliver.reload()
    other = ipi(d)                # not a VMM port: C has no business with it
    d.cdeliver.notify(other)
    assert counts(d)[1] == 3 and not pending(d, other)     # Python ignores it too
    d.evtchn.close_vmm_port(a)    # withdrawn: declined from then on
    d.cdeliver.notify(a)
    assert counts(d) == (0, 4)
    b = vmm_port(d)
    d.cdeliver.close()            # the VM is going away
    d.cdeliver.notify(b)
    assert counts(d) == (0, 5) and pending(d, b)


def test_a_rebound_port_is_delivered_to_its_new_vcpu(d):
    vectors(d)
    a = vmm_port(d)
    assert bind_vcpu(d, a, 1) == 0        # the dispatcher held C and reloaded it after
    d.cdeliver.notify(a)
    assert counts(d) == (1, 0) and d.upcalls.calls == [1] and sel(d, 1) == 1 and sel(d, 0) == 0


@pytest.mark.parametrize("nr, sub, changes", [
    (Hypercall.event_channel_op, EvtchnOp.send, False),
    (Hypercall.event_channel_op, EvtchnOp.unmask, False),
    (Hypercall.event_channel_op, EvtchnOp.bind_vcpu, True),
    (Hypercall.event_channel_op, EvtchnOp.init_control, True),
    (Hypercall.event_channel_op, EvtchnOp.set_priority, True),
    (Hypercall.event_channel_op, EvtchnOp.close, True),
    (Hypercall.vcpu_op, lib.VCPUOP_set_singleshot_timer, False),
    (Hypercall.vcpu_op, lib.VCPUOP_register_vcpu_info, True),
    (Hypercall.sched_op, 0, False),
    (Hypercall.memory_op, lib.XENMEM_add_to_physmap, True),
    (Hypercall.hvm_op, 0, True),
    (Hypercall.multicall, 0, True),
])
def test_which_hypercalls_hold_c_off(nr, sub, changes):
    assert changes_delivery(int(nr), (int(sub), 0)) is changes


def test_pollers_are_woken_by_a_c_send(d, monkeypatch):
    monkeypatch.setattr("xenkvm.xen.evtchn.poll.POLL_MAX_BLOCK_NS", 60_000_000_000)
    vectors(d)
    a = vmm_port(d, vcpu=1)
    t, result = poll_in_thread(d, [a], vcpu=1)
    assert d.cdeliver.c.pollers == 1
    d.cdeliver.notify(a)
    t.join(30)
    assert not t.is_alive() and result["rc"] == 0 and counts(d) == (1, 0)
    assert d.cdeliver.c.pollers == 0


def test_a_poller_counted_in_before_it_looks_sees_a_c_send():
    """The poller's side of the race: a send C makes after the count sees it, and the
    poller's first look (after the count, before any wait) sees a send made before."""
    d = FakeDomain()
    try:
        vectors(d)
        a = vmm_port(d)
        d.cdeliver.notify(a)
        with d.lock:
            assert d.evtchn.poll(0, [a]) == 0      # returns at once: pending
        flib.xkd_pollers(d.cdeliver.c, 1)
        guest_ack(d, 0)
        set_bit(d, SHINFO + SH_PENDING, a, False)
        kicks = list(d.evtchn.pollers._kicks)
        d.cdeliver.notify(a)                         # C sees a poller: Python wakes them
        assert d.evtchn.pollers._kicks[0] == kicks[0] + 1
        flib.xkd_pollers(d.cdeliver.c, -1)
    finally:
        d.io.stop()


# == FIFO ===========================================================================================
def test_fifo_notify_in_c_queues_links_and_readies(d):
    fifo(d)
    vectors(d)
    ports = [vmm_port(d) for _ in range(3)]
    for p in ports:
        d.cdeliver.notify(p)
    assert head(d, 0, 7) == ports[0]
    assert word(d, ports[0]) == PENDING | LINKED | ports[1]
    assert word(d, ports[1]) == PENDING | LINKED | ports[2]
    assert ready(d, 0) == 1 << 7 and d.upcalls.calls == [0] and counts(d) == (3, 0)
    assert consume(d, 0, 7) == ports
    d.mem.write(d.vcpu_info_gpa(0), b"\0")
    ipi_port = ipi(d)
    assert op(d, EvtchnOp.send, "evtchn_send", port=ipi_port)[0] == 0   # Python appends...
    d.cdeliver.notify(ports[1])                                          # ...C links after it
    assert head(d, 0, 7) == ipi_port and word(d, ipi_port) & LINK_MASK == ports[1]
    assert d.evtchn.delivery.tails[0][7] == ports[1]
    assert d.upcalls.calls == [0, 0]


def test_fifo_c_declines_a_vcpu_without_control_block(d):
    fifo(d, vcpus=(0,))
    vectors(d)
    a = vmm_port(d, vcpu=1)
    d.cdeliver.notify(a)          # Python keeps it PENDING until vCPU 1's control block comes
    assert counts(d) == (0, 1) and word(d, a) == PENDING and d.upcalls.calls == []


def guest_state(d) -> bytes:
    """Everything the guest can see of its events: shared_info's bitmaps, the vcpu_infos,
    the FIFO control blocks and the first event-array page."""
    out = bytes(d.mem.read(SHINFO, 4096))
    for v in range(len(d.vcpus)):
        out += bytes(d.mem.read(d.vcpu_info_gpa(v), 64))
        out += bytes(d.mem.read(CB + v * 0x1000, 72))
    return out + bytes(d.mem.read(0x40000, 4096))


@pytest.mark.parametrize("abi", ["2l", "fifo"])
@pytest.mark.parametrize("seed", range(6))
def test_c_and_python_leave_the_guest_the_same_state(abi, seed):
    """The same random mix of backend notifies and guest actions on two domains, one
    delivering from C and one through Python: the guest-visible state never differs."""
    rng = random.Random(seed)
    doms = [FakeDomain(), FakeDomain()]
    try:
        ports = []
        for i, dom in enumerate(doms):
            if abi == "fifo":
                fifo(dom)
            vectors(dom, VECTOR if i == 0 else 0)          # the second: C always declines
            ports.append([vmm_port(dom, vcpu=k % 2) for k in range(6)])
        assert ports[0] == ports[1]
        for _ in range(120):
            action = rng.choice(["notify"] * 5 + ["ack", "mask", "unmask", "prio", "rebind"])
            k = rng.randrange(6)
            v = rng.randrange(2)
            prio = rng.randrange(16)
            for dom, ps in zip(doms, ports):
                p = ps[k]
                if action == "notify":
                    dom.cdeliver.notify(p)
                elif action == "ack":
                    ack(dom, abi, v)
                elif action == "mask":
                    mask(dom, abi, p)
                elif action == "unmask":
                    assert unmask(dom, p) == 0
                elif action == "prio" and abi == "fifo":
                    assert op(dom, EvtchnOp.set_priority, "evtchn_set_priority", port=p, priority=prio)[0] == 0
                elif action == "rebind":
                    assert bind_vcpu(dom, p, v) == 0
            assert guest_state(doms[0]) == guest_state(doms[1]), (action, k, v)
            assert doms[0].upcalls.calls == doms[1].upcalls.calls
        assert doms[0].cdeliver.notifies > 0 and doms[0].cdeliver.fallbacks == 0
        assert doms[1].cdeliver.notifies == 0
        if abi == "fifo":
            assert doms[0].evtchn.delivery.tails == doms[1].evtchn.delivery.tails
    finally:
        for dom in doms:
            dom.io.stop()


def ack(d, abi, v):
    """The guest's upcall handler on vCPU ``v``: clear upcall_pending, take what is pending."""
    if abi == "2l":
        guest_ack(d, v)
        for port in range(64):
            if pending(d, port) and not masked(d, port):
                set_bit(d, SHINFO + SH_PENDING, port, False)
        return
    d.mem.write(d.vcpu_info_gpa(v), b"\0")
    for prio in range(16):
        if ready(d, v) >> prio & 1:
            consume(d, v, prio)


def mask(d, abi, port):
    if abi == "2l":
        set_bit(d, SHINFO + SH_MASK, port)
    else:
        d.mem.atomic_or32(word_gpa(port), MASKED)


def test_fifo_save_and_restore_keep_c_tails_and_last_queues(d):
    fifo(d)
    vectors(d)
    a, b = vmm_port(d), vmm_port(d, vcpu=1)
    d.cdeliver.notify(a)
    d.cdeliver.notify(b)
    st = d.evtchn.to_state()
    assert st["fifo"]["tails"][0][7] == a and st["fifo"]["tails"][1][7] == b
    saved = {s["port"]: s["last"] for s in st["ports"]}
    assert saved[a] == [0, 7] and saved[b] == [1, 7]
    d.evtchn.from_state(st)
    f = d.evtchn.delivery
    assert f.tails[0][7] == a and f.last_queue(b) == (1, 7)
