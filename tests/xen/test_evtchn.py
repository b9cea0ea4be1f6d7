"""Event channels through the real Dispatcher, on real GuestMemory, with a small fake domain.

The fake domain has what ``EventChannels`` uses: guest memory, the big lock,
a started ``IoLoop``, shared_info / vcpu_info locations and an upcall recorder.
Guest structs are written straight into guest RAM (identity translation).
"""
from __future__ import annotations

import json
import logging
import random
import struct
import threading
import time

import pytest

from xenkvm.xen.abi import DOMID_SELF, Errno, EvtchnOp, EvtchnStat, Hypercall, SchedOp, ffi, handle_offset, lib
from evtchnfakes import DOMID, SHINFO, FakeDomain, hc
from xenkvm.xen.evtchn import EventChannels, EvtchnError
from xenkvm.xen.evtchn.fifo import BUSY, LINK_MASK, LINKED, MASKED, PENDING, Fifo
from xenkvm.xen.limits import DEFAULT_MAX_EVTCHN_PORT as MAX_PORT
from xenkvm.xen.limits import Limits

RAM = 16 << 20
ARG = 0x20000
PORTS_BUF = 0x21000
VINFO = 0x22000          # registered vcpu_info areas (64 bytes each)
CB = 0x30000             # FIFO control block of vCPU v at CB + v * 0x1000
ARR = 0x40000            # FIFO event array page i at ARR + i * 0x1000
SH_PENDING = ffi.offsetof("struct shared_info", "evtchn_pending")
SH_MASK = ffi.offsetof("struct shared_info", "evtchn_mask")
VI_SEL = ffi.offsetof("struct vcpu_info", "evtchn_pending_sel")
ST_U = lib.XK_OFF_evtchn_status__u


@pytest.fixture
def d():
    dom = FakeDomain()
    yield dom
    dom.io.stop()


# -- helpers ---------------------------------------------------------------------------


def op(d, cmd, ctype, *, caller=0, **fields):
    """EVTCHNOP ``cmd`` with ``struct ctype`` built from ``fields``; returns (rc, struct after)."""
    obj = ffi.new(f"struct {ctype} *")
    for k, v in fields.items():
        setattr(obj, k, v)
    size = ffi.sizeof(f"struct {ctype}")
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    rc = hc(d, Hypercall.event_channel_op, cmd, ARG, vcpu=caller)
    out = ffi.new(f"struct {ctype} *")
    ffi.memmove(out, d.mem.read(ARG, size), size)
    return rc, out


def ok(rc_out):
    rc, out = rc_out
    assert rc == 0, f"-{Errno(-rc).name}"
    return out


def unbound(d, remote=0):
    return ok(op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=DOMID_SELF, remote_dom=remote)).port


def ipi(d, target=0):
    return ok(op(d, EvtchnOp.bind_ipi, "evtchn_bind_ipi", vcpu=target)).port


def virq(d, n, target=0):
    return ok(op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=n, vcpu=target)).port


def send(d, port, vcpu=0):
    return op(d, EvtchnOp.send, "evtchn_send", caller=vcpu, port=port)[0]


def close(d, port):
    return op(d, EvtchnOp.close, "evtchn_close", port=port)[0]


def unmask(d, port):
    return op(d, EvtchnOp.unmask, "evtchn_unmask", port=port)[0]


def status(d, port, dom=DOMID_SELF):
    rc, out = op(d, EvtchnOp.status, "evtchn_status", dom=dom, port=port)
    raw = d.mem.read(ARG + ST_U, 8)
    return rc, out, raw


def bit(d, base, nr) -> bool:
    return bool(d.mem.read(base + nr // 8, 1)[0] >> (nr % 8) & 1)


def set_bit(d, base, nr, value=True):
    b = d.mem.read(base + nr // 8, 1)[0]
    b = b | 1 << (nr % 8) if value else b & ~(1 << (nr % 8))
    d.mem.write(base + nr // 8, bytes([b]))


def pending(d, port):
    return bit(d, SHINFO + SH_PENDING, port)


def masked(d, port):
    return bit(d, SHINFO + SH_MASK, port)


def vi(d, v):
    return d.vcpu_info_gpa(v)


def sel(d, v):
    return d.mem.read_u64(vi(d, v) + VI_SEL)


def upcall_pending(d, v):
    return d.mem.read(vi(d, v), 1)[0]


def guest_ack(d, v):
    """What the guest's upcall handler does first (2-level): clear upcall, take sel."""
    d.mem.write(vi(d, v), b"\0")
    s = sel(d, v)
    d.mem.write_u64(vi(d, v) + VI_SEL, 0)
    return s


# == 2-level ====================================================================================
def test_ports_are_lowest_free_and_port0_reserved(d):
    ports = [unbound(d) for _ in range(4)]
    assert ports == [1, 2, 3, 4]
    assert close(d, 2) == 0
    assert unbound(d) == 2
    assert close(d, 0) == -Errno.EINVAL           # reserved
    assert close(d, 100) == -Errno.EINVAL         # free
    assert close(d, 1 << 31) == -Errno.EINVAL
    assert send(d, 0) == -Errno.EINVAL
    rc, out, _ = status(d, 0)
    assert rc == 0 and out.status == EvtchnStat.closed


def test_ipi_send_to_self_sets_pending_sel_and_upcall(d):
    port = ipi(d)
    assert not pending(d, port)
    assert send(d, port) == 0
    assert pending(d, port)
    assert sel(d, 0) == 1 << (port // 64)
    assert upcall_pending(d, 0) == 1
    assert d.upcalls.calls == [0]
    # Already pending: no second upcall.
    assert send(d, port) == 0
    assert d.upcalls.calls == [0]
    # A port in another selector word.
    for _ in range(70):
        last = ipi(d)
    guest_ack(d, 0)
    assert send(d, last) == 0
    assert sel(d, 0) == 1 << (last // 64)
    assert d.upcalls.calls == [0, 0]


def test_masked_port_is_delivered_on_unmask(d):
    port = ipi(d)
    set_bit(d, SHINFO + SH_MASK, port)
    assert send(d, port) == 0
    assert pending(d, port) and sel(d, 0) == 0 and upcall_pending(d, 0) == 0
    assert d.upcalls.calls == []
    assert unmask(d, port) == 0
    assert not masked(d, port)
    assert sel(d, 0) == 1 << (port // 64) and upcall_pending(d, 0) == 1
    assert d.upcalls.calls == [0]
    # Unmask of a non-pending port: nothing to deliver.
    p2 = ipi(d)
    set_bit(d, SHINFO + SH_MASK, p2)
    assert unmask(d, p2) == 0 and d.upcalls.calls == [0]
    assert unmask(d, MAX_PORT + 1) == -Errno.EINVAL   # past the domain's limit (Xen: port_is_valid)
    assert unmask(d, MAX_PORT) == 0               # valid port number, even if free


def test_ipi_to_vcpu1(d):
    port = ipi(d, target=1)
    assert send(d, port, vcpu=0) == 0
    assert sel(d, 1) == 1 << (port // 64) and upcall_pending(d, 1) == 1
    assert sel(d, 0) == 0 and upcall_pending(d, 0) == 0
    assert d.upcalls.calls == [1]
    assert op(d, EvtchnOp.bind_ipi, "evtchn_bind_ipi", vcpu=2)[0] == -Errno.ENOENT
    assert op(d, EvtchnOp.bind_ipi, "evtchn_bind_ipi", vcpu=0xFFFFFFFF)[0] == -Errno.ENOENT


def test_virq_binding_rules_and_delivery(d):
    t0 = virq(d, lib.VIRQ_TIMER, 0)
    t1 = virq(d, lib.VIRQ_TIMER, 1)
    dbg1 = virq(d, lib.VIRQ_DEBUG, 1)
    assert len({t0, t1, dbg1}) == 3
    rc, _ = op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=lib.VIRQ_TIMER, vcpu=1)
    assert rc == -Errno.EEXIST
    # Global VIRQs bind on vCPU 0 only.
    assert op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=lib.VIRQ_CONSOLE, vcpu=1)[0] == -Errno.EINVAL
    con = virq(d, lib.VIRQ_CONSOLE, 0)
    assert op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=lib.VIRQ_CONSOLE, vcpu=0)[0] == -Errno.EEXIST
    assert op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=lib.NR_VIRQS, vcpu=0)[0] == -Errno.EINVAL
    assert op(d, EvtchnOp.bind_virq, "evtchn_bind_virq", virq=lib.VIRQ_TIMER, vcpu=5)[0] == -Errno.ENOENT
    # Delivery goes to the bound vCPU.
    assert d.evtchn.raise_virq(lib.VIRQ_TIMER, 1) is True
    assert pending(d, t1) and not pending(d, t0) and d.upcalls.calls == [1]
    assert d.evtchn.raise_virq(lib.VIRQ_CONSOLE, 1) is True     # global: vCPU argument ignored
    assert pending(d, con) and d.upcalls.calls == [1, 0]
    assert d.evtchn.raise_virq(lib.VIRQ_DOM_EXC, 0) is False
    assert send(d, t0) == -Errno.EINVAL          # cannot send on a VIRQ port
    rc, out, raw = status(d, t1)
    assert rc == 0 and out.status == EvtchnStat.virq and out.vcpu == 1
    assert struct.unpack_from("<I", raw)[0] == lib.VIRQ_TIMER
    # Close frees the VIRQ for rebinding.
    assert close(d, t1) == 0
    assert d.evtchn.raise_virq(lib.VIRQ_TIMER, 1) is False
    assert virq(d, lib.VIRQ_TIMER, 1) == t1


def test_interdomain_loopback(d):
    p = unbound(d, remote=DOMID_SELF)
    rc, out, raw = status(d, p)
    assert out.status == EvtchnStat.unbound and struct.unpack_from("<H", raw)[0] == DOMID
    assert send(d, p) == 0 and not pending(d, p)     # unbound: dropped
    loc = ok(op(d, EvtchnOp.bind_interdomain, "evtchn_bind_interdomain", remote_dom=DOMID, remote_port=p)).local_port
    # Xen marks the new local end pending (notifications to the unbound end may have been lost).
    assert pending(d, loc)
    set_bit(d, SHINFO + SH_PENDING, loc, False)
    assert send(d, loc) == 0 and pending(d, p) and not pending(d, loc)
    assert send(d, p) == 0 and pending(d, loc)
    _, out, raw = status(d, loc)
    assert out.status == EvtchnStat.interdomain
    assert struct.unpack_from("<H", raw)[0] == DOMID
    assert struct.unpack_from("<I", raw, ffi.offsetof("xk_evtchn_interdomain_status", "port"))[0] == p
    # Already bound: a second bind fails; so do self-binds and unknown ports/domains.
    bind = lambda rd, rp: op(d, EvtchnOp.bind_interdomain, "evtchn_bind_interdomain", remote_dom=rd, remote_port=rp)[0]
    assert bind(DOMID_SELF, p) == -Errno.EINVAL
    assert bind(DOMID_SELF, d.evtchn.nr_channels()) == -Errno.EINVAL
    assert bind(DOMID_SELF, 4000) == -Errno.EINVAL
    assert bind(7, 1) == -Errno.ESRCH
    assert bind(0, 1) == -Errno.EINVAL
    vmm_only = unbound(d, remote=0)
    assert bind(DOMID_SELF, vmm_only) == -Errno.EINVAL   # unbound to domain 0, not to us
    # Closing one end leaves the other unbound to us, and re-bindable.
    assert close(d, loc) == 0
    _, out, raw = status(d, p)
    assert out.status == EvtchnStat.unbound and struct.unpack_from("<H", raw)[0] == DOMID
    loc2 = ok(op(d, EvtchnOp.bind_interdomain, "evtchn_bind_interdomain", remote_dom=DOMID_SELF, remote_port=p)).local_port
    set_bit(d, SHINFO + SH_PENDING, loc2, False)
    assert send(d, p) == 0 and pending(d, loc2)


def test_vmm_port_runs_on_notify_on_the_io_thread(d):
    seen = []
    done = threading.Event()

    def on_notify():
        seen.append(threading.current_thread().name)
        done.set()

    port = d.evtchn.alloc_vmm_port(on_notify)
    st = d.evtchn.status(port)
    assert st["state"] == "interdomain" and st["remote_dom"] == 0 and st["vmm"]
    _, out, raw = status(d, port)
    assert out.status == EvtchnStat.interdomain and struct.unpack_from("<H", raw)[0] == 0
    assert send(d, port) == 0
    assert done.wait(10)
    assert seen == ["test-io"]
    # Sends before the I/O thread runs are coalesced into one call.
    done.clear()
    with d.lock:   # hold the I/O thread's callback off
        for _ in range(50):
            assert d.evtchn.send(port) == 0
    assert done.wait(10)
    assert d.io.wait_idle()          # nothing more queued for the I/O thread
    assert len(seen) == 2
    # VMM -> guest.
    d.evtchn.notify(port)
    assert pending(d, port) and d.upcalls.calls == [0]
    d.evtchn.notify(12345)      # not a VMM port: ignored
    with pytest.raises(EvtchnError):
        d.evtchn.alloc_vmm_port(on_notify, vcpu=9)


def test_vmm_backend_binds_a_guest_allocated_port(d):
    calls, closed = [], threading.Event()
    port = unbound(d, remote=0)
    assert d.evtchn.status(port)["state"] == "unbound"
    assert d.evtchn.bind_vmm_to_guest_port(port, lambda: calls.append(1), on_close=closed.set) == port
    assert d.io.wait_idle()
    assert calls == [1]          # the binder's end is notified once, as in Xen
    with pytest.raises(EvtchnError):
        d.evtchn.bind_vmm_to_guest_port(port, lambda: None)
    loop = unbound(d, remote=DOMID_SELF)
    with pytest.raises(EvtchnError):
        d.evtchn.bind_vmm_to_guest_port(loop, lambda: None)
    with pytest.raises(EvtchnError):
        d.evtchn.bind_vmm_to_guest_port(999, lambda: None)
    assert send(d, port) == 0
    assert d.io.wait_idle()
    assert calls == [1, 1]
    # The guest closes: the service hears about it, later notifies are ignored.
    assert close(d, port) == 0
    assert closed.wait(10)
    d.evtchn.notify(port)
    assert not pending(d, port)


def test_direct_vmm_end_is_called_in_the_senders_thread(d):
    """A backend's kick bound ``direct`` runs inside the guest's EVTCHNOP_send, not on the I/O thread."""
    threads = []
    port = unbound(d, remote=0)
    d.evtchn.bind_vmm_to_guest_port(port, lambda: threads.append(threading.get_ident()), direct=True)
    assert threads == [threading.get_ident()]     # the binder's notify, at once
    assert send(d, port) == 0
    assert send(d, port) == 0
    assert threads == [threading.get_ident()] * 3  # each send, before the hypercall returns
    assert d.io.wait_idle() and len(threads) == 3  # and nothing queued on the I/O thread


def test_vmm_close_leaves_guest_port_unbound(d):
    port = d.evtchn.alloc_vmm_port(lambda: None)
    d.evtchn.close_vmm_port(port)
    st = d.evtchn.status(port)
    assert st["state"] == "unbound" and st["remote_dom"] == 0
    assert send(d, port) == 0            # dropped
    d.evtchn.bind_vmm_to_guest_port(port, lambda: None)   # and a backend may bind it again
    assert d.evtchn.status(port)["state"] == "interdomain"


def test_status_checks(d):
    port = ipi(d, 1)
    rc, out, _ = status(d, port)
    assert rc == 0 and out.status == EvtchnStat.ipi and out.vcpu == 1
    assert status(d, port, dom=DOMID)[0] == 0
    assert status(d, port, dom=0)[0] == -Errno.EPERM
    assert status(d, port, dom=5)[0] == -Errno.ESRCH
    assert status(d, MAX_PORT + 1)[0] == -Errno.EINVAL
    assert status(d, MAX_PORT)[1].status == EvtchnStat.closed
    assert d.evtchn.status(MAX_PORT) is None
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.status, 1 << 45) == -Errno.EFAULT
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.status, RAM - 4) == -Errno.EFAULT


def test_bind_vcpu(d):
    bind = lambda port, v: op(d, EvtchnOp.bind_vcpu, "evtchn_bind_vcpu", port=port, vcpu=v)[0]
    p = unbound(d, remote=0)
    assert bind(p, 1) == 0 and d.evtchn.status(p)["vcpu"] == 1
    assert bind(p, 2) == -Errno.ENOENT
    assert bind(ipi(d), 1) == -Errno.EINVAL
    assert bind(virq(d, lib.VIRQ_TIMER), 1) == -Errno.EINVAL
    con = virq(d, lib.VIRQ_CONSOLE)
    assert bind(con, 1) == 0
    assert d.evtchn.raise_virq(lib.VIRQ_CONSOLE, 0) and d.upcalls.calls == [1]
    assert bind(77, 0) == -Errno.EINVAL
    # A pending, unmasked port moved to another vCPU is delivered there.
    vp = d.evtchn.alloc_vmm_port(lambda: None)
    set_bit(d, SHINFO + SH_MASK, vp)
    d.evtchn.notify(vp)
    set_bit(d, SHINFO + SH_MASK, vp, False)
    assert bind(vp, 1) == 0
    assert sel(d, 1) & 1 << (vp // 64)


def test_guest_reset_closes_everything_and_tells_vmm_services(d):
    closed = threading.Event()
    vp = d.evtchn.alloc_vmm_port(lambda: None, on_close=closed.set)
    p = unbound(d, remote=DOMID_SELF)
    ok(op(d, EvtchnOp.bind_interdomain, "evtchn_bind_interdomain", remote_dom=DOMID, remote_port=p))
    virq(d, lib.VIRQ_TIMER, 1)
    assert op(d, EvtchnOp.reset, "evtchn_reset", dom=9)[0] == -Errno.ESRCH
    assert op(d, EvtchnOp.reset, "evtchn_reset", dom=DOMID_SELF)[0] == 0
    assert d.evtchn.ports == {} and d.evtchn.virqs == {}
    assert closed.wait(10)
    assert d.evtchn.status(vp) is None
    assert unbound(d) == 1
    d.evtchn.reset()
    assert d.evtchn.ports == {}


def test_events_before_shared_info_and_vcpu_info_are_delivered_later():
    d = FakeDomain(nvcpus=40, shinfo=False)
    try:
        port = d.evtchn.alloc_vmm_port(lambda: None)
        d.evtchn.notify(port)            # no shared_info yet: remembered
        assert d.upcalls.calls == []
        assert d.evtchn.status(port)["pending"]
        d.shinfo.gpa = SHINFO            # guest maps shared_info (zeroed page)
        d.evtchn.resend_pending(0)       # ... and registers vcpu_info
        assert pending(d, port) and sel(d, 0) == 1 << (port // 64) and upcall_pending(d, 0)
        assert d.upcalls.calls == [0]

        # vCPU 33 is beyond the legacy shared_info slots: no vcpu_info until it registers one.
        p33 = ipi(d, 33)
        assert send(d, p33) == 0
        assert pending(d, p33) and d.upcalls.calls == [0]
        d.vcpus[33].vcpu_info_gpa = VINFO
        d.evtchn.resend_pending(33)
        assert d.mem.read_u64(VINFO + VI_SEL) == 1 << (p33 // 64)
        assert d.mem.read(VINFO, 1)[0] == 1
        assert d.upcalls.calls == [0, 33]
        d.evtchn.resend_pending(99)      # not a vCPU: ignored
        assert d.upcalls.calls == [0, 33]
    finally:
        d.io.stop()


def test_upcall_pending_without_vector_is_raised_again_on_resend(d):
    port = ipi(d, 1)
    assert send(d, port) == 0
    assert d.upcalls.calls == [1]        # suppose the lead could not deliver it (no vector yet)
    d.evtchn.resend_pending(1)
    assert d.upcalls.calls == [1, 1]


def test_port_exhaustion(d):
    d.evtchn.max_port = 40
    ports = [unbound(d) for _ in range(40)]
    assert ports[-1] == 40
    assert op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=DOMID_SELF, remote_dom=0)[0] == -Errno.ENOSPC
    with pytest.raises(EvtchnError):
        d.evtchn.alloc_vmm_port(lambda: None)
    assert close(d, 17) == 0
    assert unbound(d) == 17


def test_default_port_limit_is_xens_domu_default(d):
    """libxl gives a domU 1023 event channels: port 1024 is -ENOSPC in both ABIs, and the
    guest can go on (close one, allocate again) afterwards."""
    alloc = lambda: op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=DOMID_SELF, remote_dom=0)
    ports = [unbound(d) for _ in range(MAX_PORT)]
    assert ports[-1] == MAX_PORT == 1023
    assert alloc()[0] == -Errno.ENOSPC
    assert len(d.evtchn.ports) == MAX_PORT
    assert close(d, 500) == 0 and unbound(d) == 500
    assert alloc()[0] == -Errno.ENOSPC
    fifo(d)
    assert alloc()[0] == -Errno.ENOSPC       # FIFO's 2^17 ports do not lift the domain's limit


def test_port_limit_comes_from_the_domains_limits():
    dom = FakeDomain.__new__(FakeDomain)
    dom.mem, dom.lock, dom.vcpus = None, threading.RLock(), [None]
    dom.limits = Limits(max_evtchn_port=63)
    assert EventChannels(dom).max_port == 63 and EventChannels(dom).nr_channels() == 64


def test_alloc_unbound_checks(d):
    assert op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=3, remote_dom=0)[0] == -Errno.ESRCH
    assert op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=0, remote_dom=0)[0] == -Errno.EPERM
    assert op(d, EvtchnOp.alloc_unbound, "evtchn_alloc_unbound", dom=DOMID, remote_dom=0)[0] == 0
    # An unreadable struct allocates nothing.
    before = dict(d.evtchn.ports)
    d.mem.write(RAM - 4, b"\0" * 4)
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.alloc_unbound, RAM - 4) == -Errno.EFAULT
    assert d.evtchn.ports.keys() == before.keys()


# == SCHEDOP_poll =================================================================================
def poll(d, ports, timeout=0, vcpu=0, nr=None):
    d.mem.write(PORTS_BUF, struct.pack(f"<{len(ports)}I", *ports))
    sp = ffi.new("struct sched_poll *")
    sp.nr_ports = len(ports) if nr is None else nr
    sp.timeout = timeout
    raw = bytearray(ffi.buffer(sp))
    struct.pack_into("<Q", raw, handle_offset("sched_poll", "ports"), PORTS_BUF)
    d.mem.write(ARG + 0x800, bytes(raw))
    return hc(d, Hypercall.sched_op, SchedOp.poll, ARG + 0x800, vcpu=vcpu)


def test_poll_returns_at_once_for_pending_and_checks_input(d, monkeypatch):
    # SCHEDOP_poll blocks the vCPU thread on the real clock (evtchn/poll.py): "at once" below
    # means "well before a 60 s block", generous bounds only.
    monkeypatch.setattr("xenkvm.xen.evtchn.poll.POLL_MAX_BLOCK_NS", 60_000_000_000)
    port = ipi(d)
    assert send(d, port) == 0
    t0 = time.monotonic()
    assert poll(d, [port]) == 0
    assert poll(d, [MAX_PORT, port]) == 0
    assert time.monotonic() - t0 < 30
    assert poll(d, [port] * 129) == -Errno.EINVAL
    assert poll(d, [MAX_PORT + 1]) == -Errno.EINVAL
    assert poll(d, [1], nr=1 << 20) == -Errno.EINVAL
    buf = bytearray(24)
    struct.pack_into("<Q", buf, handle_offset("sched_poll", "ports"), 1 << 45)
    struct.pack_into("<I", buf, ffi.offsetof("struct sched_poll", "nr_ports"), 2)
    d.mem.write(ARG + 0x800, bytes(buf))
    assert hc(d, Hypercall.sched_op, SchedOp.poll, ARG + 0x800) == -Errno.EFAULT
    # A timeout already past returns at once.
    other = ipi(d)
    t0 = time.monotonic()
    assert poll(d, [other], timeout=1) == 0
    assert time.monotonic() - t0 < 30
    # Without a timeout the vCPU thread blocks at most POLL_MAX_BLOCK_NS per call (never less:
    # the wait loops on the monotonic clock until the block has passed).
    monkeypatch.setattr("xenkvm.xen.evtchn.poll.POLL_MAX_BLOCK_NS", 30_000_000)
    t0 = time.monotonic_ns()
    assert poll(d, [other]) == 0
    assert 30_000_000 <= time.monotonic_ns() - t0 < 30_000_000_000


def poll_in_thread(d, ports, vcpu):
    """Start a vCPU thread in SCHEDOP_poll; returns (thread, result) once it is blocked there."""
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", poll(d, ports, vcpu=vcpu)))
    t.start()
    deadline = time.monotonic() + 30
    while d.evtchn.pollers.waiting == 0 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert d.evtchn.pollers.waiting == 1 and t.is_alive(), result
    return t, result


def test_poll_wakes_on_an_upcall_for_the_vcpu(d, monkeypatch):
    """A new upcall to the polling vCPU (any port) wakes it, as in Xen."""
    monkeypatch.setattr("xenkvm.xen.evtchn.poll.POLL_MAX_BLOCK_NS", 60_000_000_000)
    other = ipi(d)
    vp = d.evtchn.alloc_vmm_port(lambda: None)
    guest_ack(d, 0)
    t, result = poll_in_thread(d, [other], vcpu=0)
    d.evtchn.notify(vp)
    t.join(30)
    assert not t.is_alive() and result["rc"] == 0     # woken, not the 60 s block


def test_poll_wakes_on_event_and_releases_the_big_lock(d, monkeypatch):
    monkeypatch.setattr("xenkvm.xen.evtchn.poll.POLL_MAX_BLOCK_NS", 60_000_000_000)
    port = d.evtchn.alloc_vmm_port(lambda: None, vcpu=1)
    t, result = poll_in_thread(d, [port], vcpu=1)
    # The I/O thread can take the big lock while the vCPU polls.
    got = d.lock.acquire(timeout=10)
    assert got
    d.lock.release()
    assert t.is_alive() and "rc" not in result
    d.evtchn.notify(port)
    t.join(30)
    assert not t.is_alive() and result["rc"] == 0     # the event, not the 60 s block, woke it


# == FIFO =========================================================================================
def init_control(d, v, gfn=None, offset=0):
    gfn = (CB + v * 0x1000) >> 12 if gfn is None else gfn
    return op(d, EvtchnOp.init_control, "evtchn_init_control", control_gfn=gfn, offset=offset, vcpu=v)


def expand(d, gfn):
    return op(d, EvtchnOp.expand_array, "evtchn_expand_array", array_gfn=gfn)[0]


def fifo(d, pages=1, vcpus=(0, 1)):
    for v in vcpus:
        out = ok(init_control(d, v))
        assert out.link_bits == 17
    for i in range(pages):
        assert expand(d, (ARR >> 12) + i) == 0


def word_gpa(port):
    return ARR + (port // 1024) * 0x1000 + (port % 1024) * 4


def word(d, port):
    return d.mem.read_u32(word_gpa(port))


def head(d, v, prio):
    return d.mem.read_u32(CB + v * 0x1000 + 8 + 4 * prio)


def ready(d, v):
    return d.mem.read_u32(CB + v * 0x1000)


def consume(d, v, prio):
    """The guest side (like Linux's consume_one_event): walk from head, unlink, take pending ports."""
    got = []
    port = head(d, v, prio)
    while port:
        w = word(d, port)
        nxt = w & LINK_MASK
        d.mem.write_u32(word_gpa(port), w & (PENDING | MASKED) & ~PENDING)
        if w & PENDING and not w & MASKED:
            got.append(port)
        port = nxt
    d.mem.write_u32(CB + v * 0x1000, ready(d, v) & ~(1 << prio))
    return got


def test_fifo_init_control_checks(d):
    assert init_control(d, 2)[0] == -Errno.ENOENT
    assert init_control(d, 0, offset=4)[0] == -Errno.EINVAL
    assert init_control(d, 0, offset=4096 - 64)[0] == -Errno.EINVAL
    assert init_control(d, 0, gfn=RAM >> 12)[0] == -Errno.EINVAL
    assert init_control(d, 0, gfn=(1 << 64) - 1)[0] == -Errno.EINVAL
    special = d.mem.add_region(0xFEB0_0000, 0x1000, "special")
    assert init_control(d, 0, gfn=special.gpa >> 12)[0] == -Errno.EINVAL
    assert d.evtchn.abi == "2l"
    assert expand(d, ARR >> 12) == -Errno.EOPNOTSUPP
    assert op(d, EvtchnOp.set_priority, "evtchn_set_priority", port=1, priority=3)[0] == -Errno.ENOSYS
    ok(init_control(d, 0, offset=4096 - 72))
    assert d.evtchn.abi == "fifo"
    assert init_control(d, 0)[0] == -Errno.EINVAL         # already initialised
    assert expand(d, RAM >> 12) == -Errno.EINVAL
    assert expand(d, special.gpa >> 12) == -Errno.EINVAL
    for i in range(128):
        assert expand(d, (ARR >> 12) + i) == 0
    assert expand(d, (ARR >> 12) + 128) == -Errno.ENOSPC


def test_fifo_queue_order_head_link_ready(d):
    fifo(d)
    ports = [ipi(d) for _ in range(3)]
    for p in ports:
        assert send(d, p) == 0
    assert head(d, 0, 7) == ports[0]
    assert word(d, ports[0]) == PENDING | LINKED | ports[1]
    assert word(d, ports[1]) == PENDING | LINKED | ports[2]
    assert word(d, ports[2]) == PENDING | LINKED
    assert ready(d, 0) == 1 << 7
    assert upcall_pending(d, 0) == 1 and d.upcalls.calls == [0]       # one upcall for the queue
    assert send(d, ports[1]) == 0 and word(d, ports[1]) == PENDING | LINKED | ports[2]  # no relink
    assert consume(d, 0, 7) == ports
    # Queue consumed: the next event starts a new queue (head rewritten, READY again).
    d.mem.write(vi(d, 0), b"\0")
    assert send(d, ports[2]) == 0
    assert head(d, 0, 7) == ports[2] and ready(d, 0) == 1 << 7 and d.upcalls.calls == [0, 0]
    assert consume(d, 0, 7) == [ports[2]]


def test_fifo_priorities_and_vcpus(d):
    fifo(d)
    lo, hi, other = ipi(d), ipi(d), ipi(d, 1)
    assert op(d, EvtchnOp.set_priority, "evtchn_set_priority", port=hi, priority=2)[0] == 0
    assert op(d, EvtchnOp.set_priority, "evtchn_set_priority", port=hi, priority=16)[0] == -Errno.EINVAL
    assert op(d, EvtchnOp.set_priority, "evtchn_set_priority", port=1 << 20, priority=1)[0] == -Errno.EINVAL
    for p in (lo, hi, other):
        assert send(d, p) == 0
    assert head(d, 0, 7) == lo and head(d, 0, 2) == hi and head(d, 1, 7) == other
    assert ready(d, 0) == 1 << 7 | 1 << 2 and ready(d, 1) == 1 << 7
    assert sorted(d.upcalls.calls) == [0, 1]
    assert consume(d, 0, 2) == [hi] and consume(d, 0, 7) == [lo] and consume(d, 1, 7) == [other]
    assert d.evtchn.status(hi)["priority"] == 2


def test_fifo_masked_event_is_queued_by_unmask(d):
    fifo(d)
    p = ipi(d)
    d.mem.write_u32(word_gpa(p), MASKED)
    assert send(d, p) == 0
    assert word(d, p) == PENDING | MASKED and head(d, 0, 7) == 0 and d.upcalls.calls == []
    assert unmask(d, p) == 0
    assert word(d, p) == PENDING | LINKED and head(d, 0, 7) == p and d.upcalls.calls == [0]
    # Unmask of a non-pending port only clears MASKED.
    q = ipi(d)
    d.mem.write_u32(word_gpa(q), MASKED)
    assert unmask(d, q) == 0 and word(d, q) == 0


def test_fifo_link_skips_an_unlinked_tail(d):
    fifo(d)
    a, b = ipi(d), ipi(d)
    assert send(d, a) == 0
    # The guest consumed a but has not yet read b: a's LINKED is clear, so b starts a new queue.
    d.mem.write_u32(word_gpa(a), 0)
    assert send(d, b) == 0
    assert head(d, 0, 7) == b and word(d, a) == 0
    # BUSY set by us on a tail is cleared by a successful link.
    c = ipi(d)
    d.mem.write_u32(word_gpa(b), word(d, b) | BUSY)
    assert send(d, c) == 0
    assert word(d, b) == PENDING | LINKED | c


def test_switch_to_fifo_keeps_ports_and_pending_events(d):
    early = ipi(d)
    vmm = d.evtchn.alloc_vmm_port(lambda: None)
    set_bit(d, SHINFO + SH_MASK, early)
    assert send(d, early) == 0 and pending(d, early)
    ok(init_control(d, 0))
    ok(init_control(d, 1))
    d.evtchn.notify(vmm)            # no event-array page yet: remembered
    assert d.evtchn.status(vmm)["pending"]
    assert expand(d, ARR >> 12) == 0
    # Both were queued once their words existed (a fresh page is unmasked).
    assert consume(d, 0, 7) == [early, vmm]
    assert d.evtchn.status(early)["state"] == "ipi"


def test_fifo_ports_beyond_the_array_wait_for_their_page(d):
    d.evtchn.max_port = 4095   # more than the default limit: ports past the first array page
    fifo(d, pages=1)
    ports = [unbound(d) for _ in range(1100)]
    p = ports[-1]
    assert p >= 1024
    vp = d.evtchn.alloc_vmm_port(lambda: None)
    assert vp == 1101
    d.evtchn.notify(vp)
    assert head(d, 0, 7) == 0
    assert expand(d, (ARR >> 12) + 1) == 0
    assert head(d, 0, 7) == vp and word(d, vp) == PENDING | LINKED


def test_fifo_vcpu_without_control_block_gets_events_on_init(d):
    ok(init_control(d, 0))
    assert expand(d, ARR >> 12) == 0
    p = ipi(d, 1)
    assert send(d, p) == 0
    assert word(d, p) == PENDING and d.upcalls.calls == []
    ok(init_control(d, 1))
    assert head(d, 1, 7) == p and ready(d, 1) == 1 << 7 and d.upcalls.calls == [1]


def test_fifo_linked_port_is_not_reused_until_unlinked(d):
    fifo(d)
    a = ipi(d)
    assert send(d, a) == 0
    assert close(d, a) == 0
    assert word(d, a) == LINKED            # close clears PENDING only; the guest unlinks
    b = unbound(d)
    assert b != a
    consume(d, 0, 7)
    assert close(d, b) == 0
    assert unbound(d) == a


def test_fifo_resend_and_reset(d):
    fifo(d)
    p = ipi(d)
    assert send(d, p) == 0
    d.evtchn.resend_pending(0)
    assert d.upcalls.calls == [0, 0]
    assert op(d, EvtchnOp.reset, "evtchn_reset", dom=DOMID_SELF)[0] == 0
    assert d.evtchn.abi == "2l" and d.evtchn.ports == {}
    ok(init_control(d, 0))                 # FIFO may be set up again
    assert d.evtchn.abi == "fifo"


# == save / restore ===============================================================================
def test_state_round_trip(d):
    fifo(d)
    lo = unbound(d, remote=DOMID_SELF)
    ok(op(d, EvtchnOp.bind_interdomain, "evtchn_bind_interdomain", remote_dom=DOMID_SELF, remote_port=lo))
    t = virq(d, lib.VIRQ_TIMER, 1)
    hits = []
    vp = d.evtchn.alloc_vmm_port(lambda: hits.append("old"))
    state = json.loads(json.dumps(d.evtchn.to_state()))
    before = {p: d.evtchn.status(p) for p in d.evtchn.ports}

    fresh = EventChannels(d)
    fresh.from_state(state)
    d.evtchn = fresh
    assert {p: fresh.status(p) for p in fresh.ports} == before
    assert fresh.abi == "fifo"
    assert fresh.raise_virq(lib.VIRQ_TIMER, 1) and head(d, 1, 7) == t
    # Guest sends while the VMM service has not re-attached are owed to it.
    assert send(d, vp) == 0
    got = threading.Event()
    fresh.bind_vmm_to_guest_port(vp, got.set)
    assert got.wait(10) and hits == []


# == hostile input ================================================================================
def test_random_hostile_calls_never_break_the_vmm(d, caplog):
    rng = random.Random(1234)
    caplog.set_level(logging.ERROR)
    ops = list(EvtchnOp) + [14, 15, 99, 1 << 31]
    interesting = [0, 1, 2, 3, 7, 15, 16, 17, 31, 63, 64, 1023, 1024, 4095, 4096, 0x7FF0, 0xFFFF,
                   (1 << 31), (1 << 32) - 1, (RAM >> 12) - 1, RAM >> 12, (CB >> 12), (ARR >> 12)]

    def rand_word():
        return rng.choice(interesting) if rng.random() < 0.7 else rng.getrandbits(32)

    allowed = {0} | {-int(e) for e in Errno}
    for i in range(3000):
        cmd = rng.choice(ops)
        if rng.random() < 0.05:
            arg = rng.choice([0, 1 << 45, RAM - 2, (1 << 64) - 1])
        else:
            arg = ARG
            d.mem.write(ARG, b"".join(struct.pack("<I", rand_word()) for _ in range(8)))
        if rng.random() < 0.02:
            rc = poll(d, [rand_word() % 5000 for _ in range(rng.randrange(4))], timeout=1)
        else:
            rc = hc(d, Hypercall.event_channel_op, cmd, arg, vcpu=rng.randrange(2))
        assert rc in allowed, (i, cmd, rc)
        if rng.random() < 0.05:
            d.evtchn.notify(rng.randrange(200))
            d.evtchn.raise_virq(rng.randrange(30), rng.randrange(3))
            d.evtchn.resend_pending(rng.randrange(3))
        if rng.random() < 0.002:
            d.evtchn.guest_reset()
    assert not [r for r in caplog.records if "inside the VMM" in r.getMessage()]
    # The table is still consistent.
    for (v, n), port in d.evtchn.virqs.items():
        p = d.evtchn.ports[port]
        assert p.state == EvtchnStat.virq and p.virq == n
    for p in d.evtchn.ports.values():
        if p.state == EvtchnStat.interdomain and p.vmm is None:
            assert d.evtchn.ports[p.remote_port].remote_port == p.port
        assert d.valid_vcpu(p.vcpu)


def test_fifo_unit_link_gives_up_on_a_guest_that_keeps_changing_the_tail(d):
    fifo(d)
    f = d.evtchn.delivery
    assert isinstance(f, Fifo)
    a = ipi(d)
    assert send(d, a) == 0
    # A word that is LINKED is linked on the first try.
    assert f._link(a, 5) is True and word(d, a) & LINK_MASK == 5
    d.mem.write_u32(word_gpa(a), 0)
    assert f._link(a, 6) is False and word(d, a) == 0
