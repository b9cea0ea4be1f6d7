"""The vif's rx pass in C (``xkn_rx_pass``, _netif_build.py): tap frames into posted rx buffers.

The test plays both ends: a non-blocking SOCK_SEQPACKET socket stands in for the tap queue
(one message a frame, as a tap reads), an rx ring page in host memory holds the requests a
frontend would post, and the buffers are grants of a real GrantTable (tests/xen/evtchnfakes.py)
on guest RAM pages.  The pass must answer as netif.h says (a page a slot, NETRXF_more_data
between slots, the GSO extra in slot 1, offload flags from the frame's virtio_net_hdr), drop
what the frontend cannot take, arm req_event when the buffers run out and keep the frame,
refuse a producer index more than a ring ahead, and leave to Python a frame whose grant
someone holds.  The rx thread's loop around it (``xkn_rx_loop``) sleeps on the kick eventfd
(and the tap while it has buffers), pushes once per pass and notifies through a C function,
and returns to Python only for what it cannot do.
"""
from __future__ import annotations

import errno
import os
import socket

import pytest
from tests.backends.cloops import LoopRunner, NotifyRecorder, closing
from tests.xen.evtchnfakes import FakeDomain

from xenkvm.backends import netpkt
from xenkvm.backends._netif_cffi import ffi, lib
from xenkvm.backends.gntcopy import BatchCopy
from xenkvm.xen.abi import lib as xlib

F0 = 0x3000                     #: the grant table's frame 0
FIRST_PAGE = 0x2000             #: buffer i is guest page FIRST_PAGE + i, granted as ref 10 + i
NBUF = 24
RING = lib.XKN_RING_SIZE
PERMIT = xlib.GTF_permit_access
CSUM_VALID = lib.NETRXF_csum_blank | lib.NETRXF_data_validated
MORE, EXTRA = lib.NETRXF_more_data, lib.NETRXF_extra_info


class Rx:
    """One rx queue: the ring page, the tap stand-in, the pass's state."""

    def __init__(self, dom, sg: bool = True):
        self.dom = dom
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap.setblocking(False)
        self.ring = ffi.new("char[]", 4096)
        self.sring = ffi.cast("struct netif_rx_sring *", self.ring)
        self.copy = BatchCopy(dom, lib.XEN_NETIF_NR_SLOTS_MIN)
        self.reqs = ffi.new("netif_rx_request_t[]", lib.XEN_NETIF_NR_SLOTS_MIN)
        self.rsps = ffi.new("netif_rx_response_t[]", RING)
        self.buf = ffi.new("char[]", 65536 + 64)
        self.c = ffi.new("struct xkn_rx *", {"page": self.ring, "reqs": self.reqs, "rsps": self.rsps,
                                             "segs": self.copy.segs, "buf": self.buf, "buf_size": 65536 + 64,
                                             "fd": self.tap.fileno(), "sg": sg})
        self.posted = 0

    def post(self, n: int, first_ref: int = 10) -> None:
        """The frontend posts ``n`` buffers (refs first_ref.., ids = their ring index)."""
        for i in range(n):
            e = lib.xkn_rx_entry(self.ring, self.posted)
            e.req.id, e.req.gref = self.posted, first_ref + (self.posted % NBUF)
            self.posted += 1
        self.sring.req_prod = self.posted

    def frame(self, data: bytes, flags: int = 0, gso_type: int = 0, gso_size: int = 0) -> None:
        self.peer.send(netpkt.VNET_HDR.pack(flags, gso_type, 0, gso_size, 0, 0) + data)

    def run(self) -> int:
        self.c.nrsp = 0
        self.copy.snapshot.sync()
        return lib.xkn_rx_pass(self.c, self.copy.snapshot.ptr)

    def rsp(self, i: int):
        return self.rsps[i]

    def page(self, i: int, n: int) -> bytes:
        return self.dom.mem.read((FIRST_PAGE + i) << 12, n)


def granted_domain():
    """A domain whose grant refs 10.. grant guest pages FIRST_PAGE.. (NBUF of them) to dom0."""
    d = FakeDomain(nvcpus=1, ram=64 << 20, gnttab=True)
    assert d.gnttab.set_version(1) == 0
    d.gnttab.map_frame(0, F0)
    for i in range(NBUF):
        d.mem.write((F0 << 12) + (10 + i) * 8, (PERMIT | (0 << 16)).to_bytes(4, "little")
                    + (FIRST_PAGE + i).to_bytes(4, "little"))
    yield d
    d.close()


@pytest.fixture
def dom():
    yield from granted_domain()


def frame(n: int, seed: int) -> bytes:
    return bytes((seed + k) & 0xFF for k in range(n))


def test_frames_land_a_slot_each_with_their_offload_flags(dom):
    rx = Rx(dom)
    rx.post(4)
    a, b = frame(60, 1), frame(1514, 2)
    rx.frame(a, flags=netpkt.F_NEEDS_CSUM)
    rx.frame(b, flags=netpkt.F_DATA_VALID)
    rx.frame(frame(100, 3))
    assert rx.run() == lib.XKN_RX_TAP_EMPTY
    assert (rx.c.nrsp, rx.c.cons, rx.c.packets, rx.c.bytes, rx.c.dropped) == (3, 3, 3, 1674, 0)
    got = [(rx.rsp(i).id, rx.rsp(i).offset, rx.rsp(i).status, rx.rsp(i).flags) for i in range(3)]
    assert got == [(0, 0, 60, CSUM_VALID), (1, 0, 1514, lib.NETRXF_data_validated), (2, 0, 100, 0)]
    assert rx.page(0, 60) == a and rx.page(1, 1514) == b and rx.page(2, 100) == frame(100, 3)
    assert all(dom.gnttab.codec.busy(10 + i) == 0 for i in range(3))


def test_a_gso_frame_spans_pages_with_its_extra_in_slot_1(dom):
    rx = Rx(dom)
    rx.post(3)
    data = frame(5000, 7)
    rx.frame(data, flags=netpkt.F_NEEDS_CSUM, gso_type=netpkt.GSO_TCPV4, gso_size=1448)
    assert rx.run() == lib.XKN_RX_TAP_EMPTY
    assert (rx.c.nrsp, rx.c.cons, rx.c.gso_frames) == (3, 3, 1)
    first, last = rx.rsp(0), rx.rsp(2)
    assert (first.id, first.status, first.flags) == (0, 4096, CSUM_VALID | EXTRA | MORE)
    gso = ffi.new("struct xkn_gso *")          # read the slot as an extra, as the tx path reads one
    kind = lib.xkn_tx_gso(ffi.cast("netif_tx_request_t *", ffi.addressof(rx.rsps, 1)), gso)
    assert (kind, gso.type, gso.size) == (lib.XEN_NETIF_EXTRA_TYPE_GSO, lib.XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    assert (last.id, last.status, last.flags) == (2, 5000 - 4096, 0)
    assert rx.page(0, 4096) == data[:4096] and rx.page(2, 904) == data[4096:]   # buffer 1 held the extra


@pytest.mark.parametrize("why", ["no sg", "udp gso"])
def test_a_frame_the_frontend_cannot_take_is_dropped_and_the_next_delivered(dom, why):
    rx = Rx(dom, sg=why != "no sg")
    rx.post(NBUF)
    if why == "no sg":
        rx.frame(frame(5000, 1))
    else:
        rx.frame(frame(3000, 1), gso_type=3, gso_size=1400)          # VIRTIO_NET_HDR_GSO_UDP
    rx.frame(frame(64, 9))
    rx.run()
    assert (rx.c.dropped, rx.c.packets, rx.c.nrsp) == (1, 1, 1)
    assert rx.rsp(0).status == 64 and rx.page(0, 64) == frame(64, 9)


def test_no_buffers_arms_req_event_and_keeps_the_frame(dom):
    rx = Rx(dom)
    rx.post(1)
    rx.frame(frame(80, 1))
    rx.frame(frame(90, 2))
    assert rx.run() == lib.XKN_RX_NO_BUFFERS
    assert (rx.c.nrsp, rx.c.cons, rx.sring.req_event) == (1, 1, 2)
    assert rx.c.len == 90 + netpkt.VNET_HDR_LEN                     # read, waiting for a buffer
    rx.post(1)
    assert rx.run() == lib.XKN_RX_TAP_EMPTY
    assert (rx.c.nrsp, rx.c.cons, rx.rsp(0).id, rx.rsp(0).status) == (1, 2, 1, 90)
    assert rx.page(1, 90) == frame(90, 2)


def test_a_producer_more_than_a_ring_ahead_is_refused(dom):
    rx = Rx(dom)
    rx.sring.req_prod = RING + 1
    rx.frame(frame(60, 1))
    assert rx.run() == lib.XKN_RX_BAD_INDEX
    assert (rx.c.nrsp, rx.c.cons, rx.c.packets) == (0, 0, 0)


def test_a_whole_ring_of_responses_ends_the_pass(dom):
    rx = Rx(dom)
    rx.post(RING)
    for k in range(RING):
        rx.frame(frame(40, k))
    assert rx.run() == lib.XKN_RX_RING_FULL
    full = rx.c.nrsp
    assert full + lib.XEN_NETIF_NR_SLOTS_MIN + 1 > RING and rx.c.cons == full
    rx.copy.snapshot.sync()
    rx.c.nrsp = 0
    assert lib.xkn_rx_pass(rx.c, rx.copy.snapshot.ptr) == lib.XKN_RX_TAP_EMPTY
    assert rx.c.cons == RING


def test_a_grant_someone_holds_is_left_to_python(dom):
    rx = Rx(dom)
    rx.post(2)
    m = dom.gnttab.map(dom.domid, 11, False)          # buffer 1's grant, held by a mapping
    rx.frame(frame(50, 1))
    rx.frame(frame(70, 2))
    assert rx.run() == lib.XKN_RX_COPY_LEFT
    assert (rx.c.at, rx.c.nsegs, rx.c.gso, rx.c.cons) == (1, 1, 0, 2)
    assert rx.copy.segs[0].status == lib.XKG_PYTHON and rx.copy.segs[0].ref == 11
    assert rx.copy._python_path(1, True) == {}
    assert rx.page(1, 70) == frame(70, 2) and rx.page(0, 50) == frame(50, 1)
    m.unmap()


# -- the rx thread's loop in C (xkn_rx_loop) --------------------------------------------------
class Loop(LoopRunner):
    """An ``xkn_rx_loop`` over an :class:`Rx` queue: its wake eventfd, its private rsp_prod, and
    a thread to run it in when it is to sleep."""

    def __init__(self, rx: Rx, notify_fn=None):
        super().__init__()
        self.rx = rx
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.rsp_prod = ffi.new("uint32_t *")
        rx.copy.snapshot.sync()
        self.c = ffi.new("struct xkn_rx_loop *", {"c": rx.c, "g": rx.copy.snapshot.ptr, "rsp_prod": self.rsp_prod,
                                                  "wake_fd": self.wake, "port": 9})
        if notify_fn is not None:
            self.c.notify_fn, self.c.notify_ctx = ffi.cast("void *", notify_fn), ffi.cast("void *", 0x77)

    def run(self) -> int:
        return lib.xkn_rx_loop(self.c)

    def stop(self) -> int:
        self.c.stop = 1
        os.eventfd_write(self.wake, 1)
        return self.returned()

    def close(self) -> None:
        os.close(self.wake)


@pytest.fixture
def loops():
    yield from closing(Loop)


def want_notify(rx: Rx) -> None:
    """The frontend asks for a notify at the next response (rsp_event = rsp_cons + 1)."""
    rx.sring.rsp_event = rx.sring.rsp_prod + 1


def test_the_loop_serves_pushes_and_hands_python_the_notify_it_cannot_do(dom, loops):
    rx = Rx(dom)
    lp = loops(rx)
    rx.post(4)
    want_notify(rx)
    rx.frame(frame(60, 1))
    rx.frame(frame(70, 2))
    assert lp.run() == lib.XKN_LOOP_NOTIFY          # no notify_fn: Python's (-1)
    assert (lp.c.notify_r, rx.sring.rsp_prod, lp.rsp_prod[0], rx.c.cons, rx.c.nrsp) == (-1, 2, 2, 2, 0)
    assert [lib.xkn_rx_entry(rx.ring, i).rsp.status for i in range(2)] == [60, 70]
    assert rx.page(1, 70) == frame(70, 2)
    lp.start()                                      # nothing left: it sleeps on the kick and the tap
    assert lp.asleep()
    rx.frame(frame(80, 3))                          # a frame wakes it; no notify asked: it sleeps again
    assert lp.asleep() and rx.sring.rsp_prod == 3 and rx.page(2, 80) == frame(80, 3)
    assert lp.c.wakeups >= 1
    assert lp.stop() == lib.XKN_LOOP_STOP


def test_without_buffers_only_a_kick_wakes_it(dom, loops):
    rx = Rx(dom)
    lp = loops(rx)
    rx.frame(frame(90, 1))
    lp.start()
    assert lp.asleep() and rx.c.len == 90 + netpkt.VNET_HDR_LEN and rx.sring.req_event == 1
    rx.frame(frame(91, 2))                          # the tap is not watched now
    assert lp.asleep() and lp.c.wakeups == 0
    rx.post(2)
    want_notify(rx)
    os.eventfd_write(lp.wake, 1)                    # the frontend's kick
    assert lp.returned() == lib.XKN_LOOP_NOTIFY and rx.sring.rsp_prod == 2
    assert rx.page(0, 90) == frame(90, 1) and rx.page(1, 91) == frame(91, 2)


def test_notifies_go_to_the_c_delivery_function(dom, loops):
    rec = NotifyRecorder(ffi)
    rx = Rx(dom)
    lp = loops(rx, rec.fn)
    rx.post(4)
    want_notify(rx)
    rx.frame(frame(40, 1))
    lp.start()
    assert lp.asleep()                              # notified in C: no return to Python
    assert rec.calls == [(0x77, 9)] and lp.c.c_notifies == 1 and lp.c.notified_ns > 0
    rec.answer = 0x105                              # C delivery leaves a part to Python
    want_notify(rx)
    rx.frame(frame(41, 2))
    assert lp.returned() == lib.XKN_LOOP_NOTIFY and lp.c.notify_r == 0x105 and lp.c.c_notifies == 1


def test_what_the_pass_leaves_comes_back_unpushed_or_pushed(dom, loops):
    rx = Rx(dom)
    lp = loops(rx)
    rx.post(2)
    m = dom.gnttab.map(dom.domid, 11, False)        # buffer 1's grant, held: its copy is Python's
    rx.frame(frame(50, 1))
    rx.frame(frame(70, 2))
    assert lp.run() == lib.XKN_LOOP_PASS and lp.c.code == lib.XKN_RX_COPY_LEFT
    assert rx.c.nrsp == 2 and rx.sring.rsp_prod == 0          # Python finishes the frame, then C pushes
    m.unmap()
    want_notify(rx)
    lp.c.stop = 1                                              # a park right then: pushed before it stops
    assert lp.run() == lib.XKN_LOOP_NOTIFY and rx.sring.rsp_prod == 2 and rx.c.nrsp == 0
    assert lp.run() == lib.XKN_LOOP_STOP
    lp.c.stop = 0
    rx.sring.req_prod = rx.c.cons + RING + 1                   # a producer index far ahead
    rx.frame(frame(60, 3))
    assert lp.run() == lib.XKN_LOOP_PASS and lp.c.code == lib.XKN_RX_BAD_INDEX
    assert rx.sring.rsp_prod == 2 and lp.c.notify_r == -2      # nothing new to push: no notify owed


def test_a_refused_ring_is_looked_at_again_only_after_a_kick(dom, loops):
    """A producer index far ahead ends in Python once; the next call sleeps on the kick alone
    (a hostile frontend must not make the thread spin), then serves a sane ring again."""
    rx = Rx(dom)
    lp = loops(rx)
    rx.sring.req_prod = RING + 5
    rx.frame(frame(60, 1))
    assert lp.run() == lib.XKN_LOOP_PASS and lp.c.code == lib.XKN_RX_BAD_INDEX and lp.c.wait_kick == 1
    lp.start()
    rx.frame(frame(61, 2))                          # frames do not wake it, and no pass is made
    assert lp.asleep() and lp.c.wakeups == 0
    rx.sring.req_prod = 0
    rx.post(2)
    want_notify(rx)
    os.eventfd_write(lp.wake, 1)
    assert lp.returned() == lib.XKN_LOOP_NOTIFY and rx.sring.rsp_prod == 2 and lp.c.wait_kick == 0
    assert rx.page(0, 60) == frame(60, 1) and rx.page(1, 61) == frame(61, 2)


def test_a_closed_wake_fd_is_an_error_not_a_spin(dom):
    rx = Rx(dom)
    lp = Loop(rx)
    os.close(lp.wake)
    assert lp.run() == lib.XKN_LOOP_ERROR and lp.c.err == errno.EBADF
