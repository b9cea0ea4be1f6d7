"""The vif's tx path in C (``xkn_tx_pass`` / ``xkn_tx_loop``, _netif_build.py): the guest's packets
onto the tap.

The test plays the frontend: a tx ring page in host memory holds the requests, the packet
bytes sit in guest RAM pages granted through a real GrantTable (tests/xen/evtchnfakes.py), and a
non-blocking SOCK_SEQPACKET socket stands in for the tap queue (one message a write, as the tap
takes one frame a write).  C must send what net.py's Python path sends (the same slots, sizes,
checks and ``virtio_net_hdr``: compared with netpkt.py on many headers), answer each request
(extras NETIF_RSP_NULL), wait with req_event armed for a packet not fully produced, refuse a
producer index more than a ring ahead, and hand Python every packet any check refuses, then go on
with the batch.  The worker's loop around it sleeps on the kick and events eventfds, pushes and
notifies per batch, and returns to Python only for what it cannot do.
"""
from __future__ import annotations

import errno
import os
import queue
import random
import socket
import struct
import threading

import pytest
from tests.backends.cloops import LoopRunner, NotifyRecorder, closing
from tests.backends.test_netrx import FIRST_PAGE, granted_domain
from tests.backends.test_netrx import NBUF as NPAGES

from xenkvm.backends import netpkt
from xenkvm.backends._netif_cffi import ffi, lib
from xenkvm.backends.gntcopy import BatchCopy

RING = lib.XKN_RING_SIZE
HDR = netpkt.VNET_HDR_LEN
SLOTS = lib.XEN_NETIF_NR_SLOTS_MIN
MORE, EXTRA, CSUM = lib.NETTXF_more_data, lib.NETTXF_extra_info, lib.NETTXF_csum_blank
OKAY, ERROR, NULL = lib.NETIF_RSP_OKAY, lib.NETIF_RSP_ERROR, lib.NETIF_RSP_NULL
GSO4, GSO6 = lib.XEN_NETIF_GSO_TYPE_TCPV4, lib.XEN_NETIF_GSO_TYPE_TCPV6
MAC = bytes.fromhex("feffff000001") + bytes.fromhex("00163e000001")


class Tx:
    """One tx queue: the ring page, the tap stand-in, the pass's state."""

    def __init__(self, dom, gso_ok: int = (1 << GSO4) | (1 << GSO6)):
        self.dom = dom
        self.tap, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setblocking(False)
        self.ring = ffi.new("char[]", 4096)
        self.sring = ffi.cast("struct netif_tx_sring *", self.ring)
        self.copy = BatchCopy(dom, SLOTS)
        self.reqs = ffi.new("netif_tx_request_t[]", RING)
        self.rsps = ffi.new("netif_tx_response_t[]", RING)
        self.rsp_prod = ffi.new("uint32_t *")
        self.segs = ffi.new("struct xkg_seg[]", SLOTS)
        self.buf = ffi.new("char[]", HDR + 65536)
        self.c = ffi.new("struct xkn_tx *", {
            "page": self.ring, "reqs": self.reqs, "rsps": self.rsps, "rsp_prod": self.rsp_prod,
            "segs": self.segs, "buf": self.buf, "fd": self.tap.fileno(), "port": 7, "gso_ok": gso_ok})
        self.prod = 0

    def slot(self, page: int, offset: int, size: int, flags: int = 0, ref: int | None = None) -> None:
        e = lib.xkn_tx_entry(self.ring, self.prod).req
        e.gref, e.offset, e.size, e.flags, e.id = 10 + page if ref is None else ref, offset, size, flags, self.prod
        self.prod += 1

    def extra(self, kind: int = lib.XEN_NETIF_EXTRA_TYPE_GSO, gso_type: int = GSO4, size: int = 1448,
              more: bool = False) -> None:
        slot = ffi.addressof(lib.xkn_tx_entry(self.ring, self.prod).req)
        lib.xkn_extra_gso(ffi.cast("netif_rx_response_t *", slot), size, gso_type)   # the same 8-byte overlay
        e = ffi.cast("struct netif_extra_info *", slot)
        e.type, e.flags = kind, lib.XEN_NETIF_EXTRA_FLAG_MORE if more else 0
        self.prod += 1

    def packet(self, data: bytes, page: int = 0, offset: int = 0, flags: int = 0, gso: int = 0,
               publish: bool = True) -> None:
        """``data`` in guest RAM from ``page``:``offset`` on, a slot per page it touches."""
        pieces, pos, off = [], 0, offset
        while pos < len(data):
            n = min(4096 - off, len(data) - pos)
            pieces.append((page, off, n))
            self.dom.mem.write(((FIRST_PAGE + page) << 12) + off, data[pos:pos + n])
            page, off, pos = page + 1, 0, pos + n
        for k, (pg, off, n) in enumerate(pieces):
            more = MORE if k < len(pieces) - 1 else 0
            self.slot(pg, off, len(data) if k == 0 else n, (flags | (EXTRA if gso else 0) | more) if k == 0 else more)
            if k == 0 and gso:
                self.extra(gso_type=gso)
        if publish:
            self.publish()

    def publish(self) -> None:
        self.sring.req_prod = self.prod

    def run(self) -> int:
        self.copy.snapshot.sync()
        return lib.xkn_tx_pass(self.c, self.copy.snapshot.ptr)

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out

    def answers(self, n: int) -> list[tuple[int, int]]:
        return [(self.rsps[i].id, self.rsps[i].status) for i in range(n)]


@pytest.fixture
def dom():
    yield from granted_domain()      # refs 10.. grant guest pages FIRST_PAGE.., NPAGES of them


def eth_frame(n: int, seed: int, etype: int = 0x88B5) -> bytes:
    return MAC + struct.pack("!H", etype) + bytes((seed + k) & 0xFF for k in range(n - 14))


def tcp4(payload: int, seed: int = 0) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0x4000, 64, 6, 0, bytes(4), bytes(4))
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x50, 0x18, 100, 0, 0)
    return MAC + b"\x08\x00" + ip + tcp + bytes((seed + k) & 0xFF for k in range(payload))


def test_packets_go_out_whole_with_their_header_and_answers(dom):
    tx = Tx(dom)
    small, sg, csum, big = eth_frame(60, 1), eth_frame(9000, 2), tcp4(500, 3), tcp4(20000, 4)
    tx.packet(small, page=0)
    tx.packet(sg, page=1, offset=100)                 # three slots, the first from mid-page
    tx.packet(csum, page=4, flags=CSUM)
    tx.packet(big, page=5, flags=CSUM, gso=GSO4)      # 5 slots + the GSO extra as slot 2 (request 6)
    assert tx.run() == lib.XKN_TX_AGAIN
    assert (tx.c.cons, tx.c.nrsp, tx.c.n, tx.c.packets, tx.c.gso_frames, tx.c.dropped) == (11, 11, 0, 4, 1, 0)
    assert tx.c.bytes == 60 + 9000 + len(csum) + len(big)
    assert tx.sent() == [netpkt.NO_OFFLOAD + small, netpkt.NO_OFFLOAD + sg,
                         netpkt.tx_vnet_hdr(csum[:128], True, 0, 0) + csum,
                         netpkt.tx_vnet_hdr(big[:128], True, GSO4, 1448) + big]
    got = tx.answers(11)                               # an extra's answer is NULL (netfront skips it)
    assert [s for _i, s in got] == [NULL if i == 6 else OKAY for i in range(11)]
    assert [i for i, _s in got if _s != NULL] == [i for i in range(11) if i != 6]
    assert all(dom.gnttab.codec.busy(10 + i) == 0 for i in range(NPAGES))
    assert tx.run() == lib.XKN_TX_IDLE and tx.sring.req_event == 12      # empty: the next request notifies


def random_head(rng: random.Random) -> bytes:
    """An Ethernet frame's first bytes the way a hostile or odd frontend may build them."""
    h = MAC
    for _ in range(rng.choice((0, 0, 1, 2))):
        h += struct.pack("!HH", rng.choice((0x8100, 0x88A8)), rng.randrange(4096))
    etype = rng.choice((0x0800,) * 4 + (0x86DD,) * 3 + (0x0806, rng.randrange(65536)))
    h += struct.pack("!H", etype)
    proto = rng.choice((6,) * 5 + (17,) * 3 + (1, rng.randrange(256)))
    if etype == 0x0800:
        ihl = rng.choice((5,) * 6 + (6, 15, 4, rng.randrange(16)))
        version = rng.choice((4,) * 9 + (6,))
        frag = rng.choice((0, 0, 0x4000, 0x4000, 0x4000, 0x2000, 1))
        h += struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, 0, 0, frag, 64, proto, 0, bytes(4), bytes(4))
        h += bytes(rng.randrange(256) for _ in range(max(0, ihl * 4 - 20)))
    elif etype == 0x86DD:
        exts = [rng.choice((0, 43, 60)) for _ in range(rng.choice((0, 0, 1, 3)))]
        nxt = exts[0] if exts else proto
        h += struct.pack("!IHBB16s16s", 0x60000000, 0, nxt, 64, bytes(16), bytes(16))
        for k, _ in enumerate(exts):
            after = exts[k + 1] if k + 1 < len(exts) else proto
            n = rng.choice((0, 1, 2))
            h += bytes([after, n]) + bytes(6 + 8 * n)
    if proto == 6:
        doff = rng.choice((5,) * 6 + (8, 15, 3))
        h += struct.pack("!HHIIBBHHH", 1, 2, 0, 0, doff << 4, 0x18, 100, 0, 0) + bytes(max(0, doff * 4 - 20))
    elif proto == 17:
        h += struct.pack("!HHHH", 1, 2, 8, 0)
    return h[:rng.choice((len(h),) * 5 + (rng.randrange(len(h) + 1),))]


def test_the_header_is_netpkt_s_or_the_packet_is_pythons(dom):
    """C's virtio_net_hdr against netpkt.tx_vnet_hdr (the reference) on 600 random heads,
    padded or truncated: where Python finds the offload headers C sends the same header, where it
    does not C hands the packet over."""
    rng = random.Random(1234)
    for k in range(600):
        head = random_head(rng)
        data = head + bytes(rng.choice((0, 0, 40, 300))) if len(head) >= 14 else eth_frame(60, k)
        gso = rng.choice((0, GSO4, GSO6))
        csum = CSUM if gso or rng.random() < 0.8 else 0
        tx = Tx(dom)
        tx.packet(data, page=0, flags=csum, gso=gso)
        want = netpkt.tx_vnet_hdr(data[:128], bool(csum), gso, 1448)
        got = tx.run()
        if want is None:
            assert got == lib.XKN_TX_PYTHON and tx.c.at == 0 and tx.sent() == [], data.hex()
        else:
            assert got == lib.XKN_TX_AGAIN and tx.sent() == [want + data], data.hex()


def test_a_packet_not_fully_produced_waits_with_req_event_armed(dom):
    tx = Tx(dom)
    tx.packet(eth_frame(80, 1), page=0)
    data = eth_frame(6000, 2)
    tx.packet(data, page=1, publish=False)
    tx.sring.req_prod = tx.prod - 1                   # its last slot is not published yet
    assert tx.run() == lib.XKN_TX_IDLE
    assert (tx.c.cons, tx.c.nrsp, tx.sring.req_event) == (1, 1, 3) and len(tx.sent()) == 1
    tx.publish()
    assert tx.run() == lib.XKN_TX_AGAIN and (tx.c.cons, tx.c.nrsp) == (3, 2)
    assert tx.sent() == [netpkt.NO_OFFLOAD + data]


def hostile(tx: Tx, why: str) -> int:
    """Queue one bad packet the way ``why`` says; returns how many requests it takes."""
    if why == "ungranted ref":
        tx.slot(0, 0, 142, ref=500)
    elif why == "slot crosses its page":
        tx.slot(0, 4000, 142)
    elif why == "runt":
        tx.slot(0, 0, 10)
    elif why == "nineteen slots":
        for k in range(19):
            tx.slot(k, 0, 19 * 100 if k == 0 else 100, MORE if k < 18 else 0)
        return 19
    elif why == "slots exceed the size":
        tx.slot(0, 0, 100, MORE)
        tx.slot(1, 0, 200)
        return 2
    elif why == "unknown extra":
        tx.slot(0, 0, 142, EXTRA)
        tx.extra(kind=lib.XEN_NETIF_EXTRA_TYPE_MAX)
        return 2
    elif why == "GSO type not negotiated":
        tx.c.gso_ok = 1 << GSO4
        tx.dom.mem.write(FIRST_PAGE << 12, tcp4(100))
        tx.slot(0, 0, len(tcp4(100)), EXTRA | CSUM)
        tx.extra(gso_type=GSO6)
        return 2
    elif why == "offload without a TCP/UDP header":
        tx.dom.mem.write(FIRST_PAGE << 12, eth_frame(142, 0, etype=0x0806))
        tx.slot(0, 0, 142, CSUM)
    return 1


@pytest.mark.parametrize("why", ["ungranted ref", "slot crosses its page", "runt", "nineteen slots",
                                 "slots exceed the size", "unknown extra", "GSO type not negotiated",
                                 "offload without a TCP/UDP header"])
def test_what_c_refuses_is_python_s_and_the_batch_goes_on(dom, why):
    tx = Tx(dom)
    good = eth_frame(70, 1)
    tx.packet(good, page=20)
    n = hostile(tx, why)
    after = eth_frame(90, 2)
    tx.packet(after, page=21)
    assert tx.run() == lib.XKN_TX_PYTHON and (tx.c.at, tx.c.n, tx.c.cons) == (1, n + 2, 0)
    assert tx.sent() == [netpkt.NO_OFFLOAD + good]
    for k in range(1, 1 + n):                         # what Python does: answer it (ERROR), move on
        tx.rsps[k].id, tx.rsps[k].status = k, ERROR
    tx.c.at += n
    assert tx.run() == lib.XKN_TX_AGAIN and (tx.c.cons, tx.c.nrsp) == (n + 2, n + 2)
    assert tx.sent() == [netpkt.NO_OFFLOAD + after]
    assert [s for _i, s in tx.answers(n + 2)] == [OKAY] + [ERROR] * n + [OKAY]


def test_a_producer_more_than_a_ring_ahead_is_refused(dom):
    tx = Tx(dom)
    tx.packet(eth_frame(60, 1))
    tx.sring.req_prod = RING + 5
    assert tx.run() == lib.XKN_TX_BAD_INDEX
    assert (tx.c.cons, tx.c.nrsp, tx.c.n, tx.sring.req_event) == (0, 0, 0, 1) and tx.sent() == []


def test_a_failed_tap_write_drops_and_counts_the_packet(dom):
    tx = Tx(dom)
    tx.peer.close()                                   # the host side is gone
    tx.packet(eth_frame(60, 1))
    assert tx.run() == lib.XKN_TX_AGAIN
    assert (tx.c.packets, tx.c.dropped, tx.c.drop_errno) == (0, 1, errno.EPIPE)
    assert tx.answers(1) == [(0, OKAY)]               # answered as sent: a NIC drops without telling


# -- the worker's loop in C (xkn_tx_loop) ---------------------------------------------------------
class Loop(LoopRunner):
    """An ``xkn_tx_loop`` over :class:`Tx` queues: the kick and events eventfds, and a thread to
    run it in when it is to sleep."""

    def __init__(self, txs: list[Tx], notify_fn=None):
        super().__init__()
        self.txs = txs
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.q = ffi.new("struct xkn_tx[]", len(txs))
        for k, tx in enumerate(txs):
            self.q[k] = tx.c[0]
            self.q[k].pending = 1
        txs[0].copy.snapshot.sync()
        self.c = ffi.new("struct xkn_tx_loop *", {"q": self.q, "nq": len(txs), "g": txs[0].copy.snapshot.ptr,
                                                  "kick_fd": self.kick, "ctl_fd": self.ctl,
                                                  "batch_at": 1.25, "other_below": 1.05, "average": 1.0})
        if notify_fn is not None:
            self.c.notify_fn, self.c.notify_ctx = ffi.cast("void *", notify_fn), ffi.cast("void *", 0x77)

    def run(self) -> int:
        return lib.xkn_tx_loop(self.c)

    def event(self) -> int:
        os.eventfd_write(self.ctl, 1)
        code = self.returned()
        os.eventfd_read(self.ctl)
        return code

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.ctl)


@pytest.fixture
def loops():
    yield from closing(Loop)


def test_the_loop_serves_every_queue_pushes_and_returns_on_an_event(dom, loops):
    a, b = Tx(dom), Tx(dom)
    lp = loops([a, b])
    a.packet(eth_frame(60, 1), page=0)
    b.packet(eth_frame(61, 2), page=1)
    a.sring.rsp_event = b.sring.rsp_event = 1          # both frontends ask for a notify
    assert lp.run() == lib.XKN_LOOP_NOTIFY and lp.c.at == 0 and lp.c.notify_r == -1   # no notify_fn
    assert lp.run() == lib.XKN_LOOP_NOTIFY and lp.c.at == 1
    assert a.sring.rsp_prod == 1 and b.sring.rsp_prod == 1 and a.rsp_prod[0] == 1
    assert lib.xkn_tx_entry(a.ring, 0).rsp.status == OKAY
    assert a.sent() == [netpkt.NO_OFFLOAD + eth_frame(60, 1)] and b.sent() == [netpkt.NO_OFFLOAD + eth_frame(61, 2)]
    lp.start()
    assert lp.asleep()                                  # idle, no kick: asleep (req_event armed)
    a.packet(eth_frame(62, 3), page=2)                  # no notify asked this time
    os.eventfd_write(lp.kick, 1)
    assert lp.asleep() and a.sring.rsp_prod == 2 and lp.c.wakeups == 1 and lp.c.woke_ns > 0
    assert lp.event() == lib.XKN_LOOP_EVENT and lp.q[0].cons == 2 and lp.q[0].n == 0


def test_notifies_go_to_the_c_delivery_function(dom, loops):
    rec = NotifyRecorder(ffi)
    tx = Tx(dom)
    lp = loops([tx], rec.fn)
    tx.packet(eth_frame(60, 1))
    tx.sring.rsp_event = 1
    lp.start()
    assert lp.asleep() and rec.calls == [(0x77, 7)] and lp.c.c_notifies == 1 and lp.c.notified_ns > 0
    rec.answer = 0x105                                   # C delivery leaves a part to Python
    tx.packet(eth_frame(61, 2), page=1)
    tx.sring.rsp_event = 2
    os.eventfd_write(lp.kick, 1)
    assert lp.returned() == lib.XKN_LOOP_NOTIFY and lp.c.notify_r == 0x105 and lp.c.c_notifies == 1


def test_python_s_packet_comes_back_and_the_batch_resumes_in_c(dom, loops):
    tx = Tx(dom)
    lp = loops([tx])
    tx.packet(eth_frame(70, 1), page=20)
    tx.slot(0, 0, 142, ref=500)                          # ungranted
    tx.packet(eth_frame(90, 2), page=21)
    assert lp.run() == lib.XKN_LOOP_PASS and lp.c.code == lib.XKN_TX_PYTHON and lp.q[0].at == 1
    assert tx.sring.rsp_prod == 0                         # nothing pushed mid-batch
    lp.q[0].rsps[1].id, lp.q[0].rsps[1].status = 1, ERROR
    lp.q[0].at += 1
    lp.start()
    assert lp.asleep() and tx.sring.rsp_prod == 3
    assert [lib.xkn_tx_entry(tx.ring, i).rsp.status for i in range(3)] == [OKAY, ERROR, OKAY]


def test_a_refused_ring_waits_for_a_kick_and_other_queues_go_on(dom, loops):
    bad, good = Tx(dom), Tx(dom)
    lp = loops([bad, good])
    bad.sring.req_prod = RING + 5
    good.packet(eth_frame(60, 1))
    assert lp.run() == lib.XKN_LOOP_PASS and lp.c.code == lib.XKN_TX_BAD_INDEX and lp.c.at == 0
    assert lp.q[0].wait_kick == 1
    lp.start()
    assert lp.asleep() and good.sring.rsp_prod == 1       # the other queue was served
    bad.sring.req_prod = 0
    bad.packet(eth_frame(61, 2))
    os.eventfd_write(lp.kick, 1)
    assert lp.asleep() and bad.sring.rsp_prod == 1 and lp.q[0].wait_kick == 0


def test_a_report_is_due_only_once_idle_past_its_time(dom, loops):
    tx = Tx(dom)
    lp = loops([tx])
    tx.packet(eth_frame(60, 1))
    lp.c.report_ns = 1                                    # long past
    assert lp.run() == lib.XKN_LOOP_REPORT and tx.sring.rsp_prod == 1   # served first
    lp.c.report_ns = 0
    lp.start()
    assert lp.asleep()


def test_a_closed_kick_fd_is_an_error_not_a_spin(dom):
    lp = Loop([Tx(dom)])
    os.close(lp.kick)
    lp.q[0].pending = 0
    assert lp.run() == lib.XKN_LOOP_ERROR and lp.c.err == errno.EBADF
    os.close(lp.ctl)


# -- tx completion coalescing (hold_ns: the vif's txcoalesce) ------------------------------------
def test_held_responses_are_in_the_ring_but_published_only_when_due(dom, loops):
    """A NIC's tx interrupt coalescing: the packet leaves at once, its answer is written into the
    ring at once, but rsp_prod moves (and the frontend hears) only when due or at an event."""
    tx = Tx(dom)
    lp = loops([tx])
    lp.c.hold_ns = 3600 * 10**9                          # never due by time in this test
    tx.packet(eth_frame(60, 1))
    tx.sring.rsp_event = 1
    lp.start()
    assert lp.asleep() and tx.sent() == [netpkt.NO_OFFLOAD + eth_frame(60, 1)]
    assert tx.sring.rsp_prod == 0 and tx.rsp_prod[0] == 1 and lp.q[0].held == 1
    assert lib.xkn_tx_entry(tx.ring, 0).rsp.status == OKAY
    os.eventfd_write(lp.ctl, 1)                           # an event: everything published first
    assert lp.returned() == lib.XKN_LOOP_NOTIFY and tx.sring.rsp_prod == 1 and lp.q[0].held == 0
    assert lp.run() == lib.XKN_LOOP_EVENT


def test_held_responses_are_published_when_their_time_comes_without_a_kick(dom, loops):
    tx = Tx(dom)
    lp = loops([tx])
    lp.c.hold_ns = 2 * 10**6
    tx.packet(eth_frame(60, 1))
    lp.start()
    for _ in range(1000):                                  # generous: a real-time wait of 2 ms
        if tx.sring.rsp_prod == 1:
            break
        threading.Event().wait(0.01)
    assert tx.sring.rsp_prod == 1 and lp.c.wakeups == 0 and lp.c.publishes == 1
    assert lp.asleep()


def test_half_a_ring_of_held_responses_is_published_at_once(dom, loops):
    tx = Tx(dom)
    lp = loops([tx])
    lp.c.hold_ns = 3600 * 10**9
    for k in range(RING // 2 + 2):
        tx.packet(eth_frame(60, k), publish=False)
    tx.publish()
    lp.start()
    assert lp.asleep() and tx.sring.rsp_prod == RING // 2 + 2 and len(tx.sent()) == RING // 2 + 2


def test_the_worker_turns_sched_batch_while_kicks_find_several_packets(dom, loops):
    """xk_policy.h in the tx loop (as the vbd's): SCHED_BATCH once kick wake-ups average 1.25 ring
    requests or more, SCHED_OTHER again below 1.05, applied to the loop's own thread.  Without it
    a kick made the worker preempt the vCPU that kicked: one packet a kick, an interrupt-window
    exit for each notify."""
    tx = Tx(dom)
    lp = loops([tx])
    lp.q[0].pending = 0
    seen: queue.Queue = queue.Queue()

    def worker():
        for _ in range(2):                          # a phase ends with an event
            assert lp.run() == lib.XKN_LOOP_EVENT
            os.eventfd_read(lp.ctl)
            seen.put((lp.c.batch, os.sched_getscheduler(0)))

    def phase(kicks: int, per_kick: int) -> tuple[int, int]:
        for _ in range(kicks):
            for i in range(per_kick):
                tx.packet(eth_frame(60, i), page=i % 4, publish=False)
            tx.publish()
            os.eventfd_write(lp.kick, 1)
            for _ in range(3000):                   # the loop serves it (generous real-time bound)
                if tx.sring.rsp_prod == tx.prod:
                    break
                threading.Event().wait(0.01)
        os.eventfd_write(lp.ctl, 1)
        return seen.get(timeout=30)

    threading.Thread(target=worker, daemon=True).start()
    assert phase(4, 8) == (1, os.SCHED_BATCH)
    assert phase(24, 1) == (0, os.SCHED_OTHER)
    assert lp.c.switches == 2 and lp.c.wakeups == 28 and len(tx.sent()) == 56
