"""2-level and FIFO delivery behind the one ``Delivery`` interface (xen/evtchn/delivery.py).

The shared rules run on both classes (parametrized); what differs is checked
per class.  Each runs on real guest memory of the fake domain, with the guest's
side (masking, consuming) done by writing its words the way a guest does.
"""
from __future__ import annotations

import inspect

import pytest

from evtchnfakes import SHINFO, FakeDomain
from xenkvm.xen.abi import Errno, ffi
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.delivery import Delivery
from xenkvm.xen.evtchn.fifo import LINKED, MASKED, PENDING, Fifo
from xenkvm.xen.evtchn.ports import PortState
from xenkvm.xen.evtchn.twolevel import TwoLevel

CB = 0x30000             # FIFO control block of vCPU v at CB + v * 0x1000
ARR = 0x40000            # FIFO event array page
SH_MASK = ffi.offsetof("struct shared_info", "evtchn_mask")


class TwoLevelGuest:
    """The guest's view of 2-level words."""

    cls = TwoLevel

    def __init__(self, d):
        self.d = d

    def mask(self, port):
        self.d.mem.test_and_set_bit(SHINFO + SH_MASK, port)


class FifoGuest:
    """The guest's view of FIFO words (control blocks on vCPUs 0 and 1, one array page)."""

    cls = Fifo

    def __init__(self, d):
        self.d = d
        for v in (0, 1):
            d.evtchn.init_control(CB + v * 0x1000 >> 12, 0, v)
        d.evtchn.expand_array(ARR >> 12)

    def word_gpa(self, port):
        return ARR + 4 * port

    def mask(self, port):
        self.d.mem.atomic_or32(self.word_gpa(port), MASKED)


@pytest.fixture(params=[TwoLevelGuest, FifoGuest], ids=["2l", "fifo"])
def abi(request):
    d = FakeDomain()
    guest = request.param(d)
    yield d, d.evtchn.delivery, guest
    d.io.stop()


def ipi(d, vcpu=0):
    with d.lock:
        return d.evtchn.alloc(PortState.IPI, vcpu)


def test_both_classes_implement_the_whole_interface():
    wanted = {n: inspect.signature(f) for n, f in vars(Delivery).items()
              if callable(f) and not n.startswith("_")}
    for cls in (TwoLevel, Fifo):
        for name, sig in wanted.items():
            assert list(inspect.signature(getattr(cls, name)).parameters) == list(sig.parameters), (cls, name)
        assert isinstance(cls.name, str) and cls.nr_channels > 4000


def test_the_abi_switch_is_the_delivery_object(abi):
    d, delivery, guest = abi
    assert isinstance(delivery, guest.cls) and d.evtchn.abi == delivery.name


def test_pending_port_raises_one_upcall(abi):
    d, delivery, _ = abi
    p = ipi(d)
    with d.lock:
        assert delivery.set_pending(p) is True
        assert delivery.set_pending(p) is False          # already pending: nothing more
    assert delivery.is_pending(p.port) and not delivery.is_masked(p.port)
    assert d.upcalls.calls == [0]


def test_clear_pending(abi):
    d, delivery, _ = abi
    p = ipi(d)
    with d.lock:
        delivery.set_pending(p)
        delivery.clear_pending(p)
    assert not delivery.is_pending(p.port)


def test_masked_port_waits_for_unmask(abi):
    d, delivery, guest = abi
    p = ipi(d, vcpu=1)
    guest.mask(p.port)
    with d.lock:
        delivery.set_pending(p)
    assert delivery.is_pending(p.port) and delivery.is_masked(p.port) and d.upcalls.calls == []
    with d.lock:
        delivery.unmask(p.port, p)
    assert not delivery.is_masked(p.port) and d.upcalls.calls == [1]


def test_ports_without_words_are_masked_and_not_pending(abi):
    _, delivery, _ = abi
    for port in (delivery.nr_channels, delivery.nr_channels + 5):
        assert delivery.is_masked(port) and not delivery.is_pending(port)


def test_no_upcall_without_vcpu_info_until_resend(abi):
    d, delivery, _ = abi
    d.vcpus[1].vcpu_info_gpa = 0x7FF_0000 | 4         # misaligned: not usable
    p = ipi(d, vcpu=1)
    with d.lock:
        delivery.set_pending(p)
    assert d.upcalls.calls == []
    d.vcpus[1].vcpu_info_gpa = 0x22000
    with d.lock:
        assert delivery.resend(1) is True
    assert delivery.is_pending(p.port)


def test_set_pending_reports_newly_pending_for_pollers(abi):
    d, delivery, guest = abi
    p = ipi(d)
    guest.mask(p.port)
    with d.lock:
        assert delivery.set_pending(p) is True and delivery.set_pending(p) is False


# -- what differs -----------------------------------------------------------------------------
def test_2l_keeps_events_sent_before_shared_info_and_has_no_fifo_ops():
    d = FakeDomain(shinfo=False)
    try:
        delivery = d.evtchn.delivery
        p = ipi(d)
        with d.lock:
            assert delivery.set_pending(p) is False and p.saved_pending
        d.shinfo.gpa = SHINFO
        assert delivery.is_pending(p.port) and not p.saved_pending and d.upcalls.calls == [0]
        for call, errno in ((lambda: delivery.expand_array(ARR >> 12), Errno.EOPNOTSUPP),
                            (lambda: delivery.set_priority(p, 3), Errno.ENOSYS)):
            with pytest.raises(HypercallError) as e:
                call()
            assert e.value.errno == errno
        assert delivery.guest_frames() == set() and delivery.to_state() is None and not delivery.is_busy(p.port)
    finally:
        d.io.stop()


def test_2l_rebind_delivers_to_the_new_vcpu():
    d = FakeDomain()
    try:
        p = ipi(d, vcpu=0)
        d.mem.write_u64(SHINFO + ffi.offsetof("struct shared_info", "evtchn_pending"), 1 << p.port)
        with d.lock:
            p.vcpu = 1
            d.evtchn.delivery.rebind(p)
        assert d.upcalls.calls == [1]
    finally:
        d.io.stop()


def test_fifo_words_queues_and_state():
    d = FakeDomain()
    try:
        guest = FifoGuest(d)
        f = d.evtchn.delivery
        a, b = ipi(d), ipi(d)
        with d.lock:
            f.set_pending(a)
            f.set_pending(b)
        # a heads queue 7 of vCPU 0 and links to b; both LINKED, so neither port can be reused.
        assert d.mem.read_u32(CB + 8 + 4 * 7) == a.port
        assert d.mem.read_u32(guest.word_gpa(a.port)) == PENDING | LINKED | b.port
        assert f.is_busy(a.port) and f.is_busy(b.port)
        assert f.guest_frames() == {CB >> 12, (CB >> 12) + 1, ARR >> 12}
        with pytest.raises(HypercallError):
            f.set_priority(a, 16)
        f.set_priority(a, 3)
        assert a.priority == 3
        again = Fifo.from_state(d, d.evtchn.table, d.evtchn.signal, f.to_state())
        assert again.to_state() == f.to_state() and again.word(a.port) == f.word(a.port)
        # A port past the array is remembered and raised when its page arrives.
        far = d.evtchn.table.alloc(PortState.IPI, 0, Fifo.nr_channels, f.is_busy)
        far_port = 1500
        d.evtchn.table.ports.pop(far.port)
        far.port = far_port
        d.evtchn.table.ports[far_port] = far
        assert f.is_masked(far_port) and not f.is_pending(far_port)
        with d.lock:
            f.set_pending(far)
        assert far.saved_pending
        f.expand_array((ARR >> 12) + 1)
        assert not far.saved_pending and f.is_pending(far_port)
    finally:
        d.io.stop()
