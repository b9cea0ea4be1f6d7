"""Guest-ring transport: framing over the 1 KiB rings, wrap-around, hostile indices."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest

from xenkvm.xenstore import ring as ringmod
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.perms import Perm
from xenkvm.xenstore.protocol import (HEADER, FrameDecoder, RingError, XsType, encode)

U32 = struct.Struct("<I")


class Guest:
    """The guest side of a xenstore ring page."""

    def __init__(self, page) -> None:
        self.page = memoryview(page).cast("B") if not isinstance(page, memoryview) else page
        self.decoder = FrameDecoder()
        self.kicks = 0

    def get(self, off: int) -> int:
        return U32.unpack_from(self.page, off)[0]

    def set(self, off: int, value: int) -> None:
        U32.pack_into(self.page, off, value & 0xFFFFFFFF)

    def notify(self) -> None:
        self.kicks += 1

    def send(self, data: bytes) -> int:
        """Write as much as fits into the request ring; returns bytes written."""
        cons, prod = self.get(ringmod.REQ_CONS), self.get(ringmod.REQ_PROD)
        space = 1024 - ((prod - cons) & 0xFFFFFFFF)
        data = data[:space]
        for i, byte in enumerate(data):     # guest side: byte loop is fine in tests
            self.page[(prod + i) & 1023] = byte
        self.set(ringmod.REQ_PROD, prod + len(data))
        return len(data)

    def recv(self) -> list:
        """Consume everything in the response ring; return complete frames."""
        cons, prod = self.get(ringmod.RSP_CONS), self.get(ringmod.RSP_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        data = bytes(self.page[1024 + ((cons + i) & 1023)] for i in range(n))
        self.set(ringmod.RSP_CONS, cons + n)
        self.decoder.feed(data)
        out = []
        while (msg := self.decoder.next()) is not None:
            out.append(msg)
        return out


def attach(core, domid, page=None):
    page = bytearray(4096) if page is None else page
    guest = Guest(page)
    ring = core.attach_ring(domid, page, guest.notify)
    return guest, ring


def roundtrip(guest, ring, type_, payload, tx=0, req_id=1):
    frame = encode(type_, req_id, tx, payload)
    sent = 0
    msgs = []
    while sent < len(frame):
        sent += guest.send(frame[sent:])
        ring.kick()
        msgs += guest.recv()
    for _ in range(10):
        if msgs:
            break
        ring.kick()
        msgs += guest.recv()
    return msgs


@pytest.fixture
def core():
    c = Xenstored()
    c.write_path("/local/domain/1", "", perms=(Perm(0, 1),))
    c.write_path("/local/domain/1/name", "guest")
    return c


def test_features_advertised_on_attach(core):
    guest, _ = attach(core, 1)
    assert guest.get(ringmod.SERVER_FEATURES) == 3
    assert guest.get(ringmod.CONNECTION) == 0


def test_request_reply_and_notify(core):
    guest, ring = attach(core, 1)
    msgs = roundtrip(guest, ring, XsType.READ, b"name\0")
    assert [(m.type, m.payload) for m in msgs] == [(XsType.READ, b"guest")]
    assert guest.kicks > 0
    assert ring.conn.privileged is False


def test_numpy_page_and_wrapping_indices(core):
    page = np.zeros(4096, dtype=np.uint8)
    guest = Guest(memoryview(page))
    start = 0xFFFFFFFF - 5          # free-running indices about to wrap 2^32
    for off in (ringmod.REQ_CONS, ringmod.REQ_PROD, ringmod.RSP_CONS, ringmod.RSP_PROD):
        guest.set(off, start)
    ring = core.attach_ring(1, page, guest.notify)
    for i in range(40):             # many messages: every byte offset gets wrapped
        value = f"v{i}" * (i % 7 + 1)
        assert roundtrip(guest, ring, XsType.WRITE, f"k{i}\0{value}".encode())[0].type == \
            XsType.WRITE
        msg = roundtrip(guest, ring, XsType.READ, f"k{i}\0".encode())[0]
        assert msg.payload == value.encode()
    assert guest.get(ringmod.REQ_CONS) < start      # wrapped past 2^32


def test_partial_messages_byte_by_byte(core):
    guest, ring = attach(core, 1)
    frame = encode(XsType.READ, 9, 0, b"name\0")
    for byte in frame[:-1]:
        guest.send(bytes([byte]))
        ring.kick()
        assert guest.recv() == []
    guest.send(frame[-1:])
    ring.kick()
    [msg] = guest.recv()
    assert (msg.type, msg.req_id, msg.payload) == (XsType.READ, 9, b"guest")


def test_reply_larger_than_ring(core):
    big = b"x" * 3000
    core.write_path("/local/domain/1/big", big)
    guest, ring = attach(core, 1)
    msgs = roundtrip(guest, ring, XsType.READ, b"big\0")
    for _ in range(5):
        if msgs:
            break
        ring.kick()
        msgs = guest.recv()
    assert msgs and msgs[0].payload == big


def test_watch_event_reaches_ring_with_notify(core):
    guest, ring = attach(core, 1)
    roundtrip(guest, ring, XsType.WATCH, b"name\0tok\0")
    guest.recv()
    kicks = guest.kicks
    core.write_path("/local/domain/1/name", "renamed")
    assert guest.kicks > kicks
    [event] = guest.recv()
    assert (event.type, event.payload) == (XsType.WATCH_EVENT, b"name\0tok\0")


def test_impossible_indices_break_only_that_ring(core):
    core.write_path("/local/domain/2", "", perms=(Perm(0, 2),))
    guest, ring = attach(core, 1)
    other, other_ring = attach(core, 2)
    guest.set(ringmod.REQ_PROD, guest.get(ringmod.REQ_CONS) + 5000)
    ring.kick()
    assert ring.broken == RingError.RINGIDX
    assert guest.get(ringmod.ERROR) == RingError.RINGIDX
    snapshot = bytes(guest.page)
    guest.set(ringmod.REQ_PROD, 0)           # whatever the guest does now...
    snapshot = bytes(guest.page)
    ring.kick()
    core.write_path("/local/domain/1/name", "x")
    assert bytes(guest.page) == snapshot     # ...we no longer touch its page
    assert roundtrip(other, other_ring, XsType.READ, b"/local/domain/2\0")[0].type == \
        XsType.READ


def test_impossible_response_indices(core):
    guest, ring = attach(core, 1)
    guest.set(ringmod.RSP_CONS, guest.get(ringmod.RSP_PROD) + 2000)
    guest.send(encode(XsType.READ, 1, 0, b"name\0"))
    ring.kick()
    assert ring.broken == RingError.RINGIDX


def test_oversized_header_is_protocol_error(core):
    guest, ring = attach(core, 1)
    guest.send(HEADER.pack(XsType.READ, 1, 0, 4097))
    ring.kick()
    assert ring.broken == RingError.PROTO
    assert guest.get(ringmod.ERROR) == RingError.PROTO


def test_reconnect_resets_connection(core):
    guest, ring = attach(core, 1)
    roundtrip(guest, ring, XsType.WATCH, b"name\0tok\0")
    guest.recv()
    guest.send(HEADER.pack(XsType.READ, 1, 0, 100))   # a partial request
    ring.kick()
    guest.set(ringmod.CONNECTION, 1)
    kicks = guest.kicks
    ring.kick()
    assert guest.get(ringmod.CONNECTION) == 0
    assert guest.kicks == kicks + 1
    assert [guest.get(o) for o in (2048, 2052, 2056, 2060)] == [0, 0, 0, 0]
    assert not ring.conn.watches
    guest.decoder.reset()
    assert roundtrip(guest, ring, XsType.READ, b"name\0")[0].payload == b"guest"


def test_reconnect_recovers_broken_ring(core):
    guest, ring = attach(core, 1)
    guest.set(ringmod.REQ_PROD, 99999)
    ring.kick()
    assert ring.broken
    guest.set(ringmod.CONNECTION, 1)
    ring.kick()
    assert ring.broken is None and guest.get(ringmod.ERROR) == 0
    assert roundtrip(guest, ring, XsType.READ, b"name\0")[0].payload == b"guest"


def test_outstanding_quota_pauses_reading(core):
    core.write_path("/local/domain/1/v", b"y" * 200)
    guest, ring = attach(core, 1)
    frame = encode(XsType.READ, 1, 0, b"v\0")
    for _ in range(40):                         # never consume responses
        guest.send(frame)
        ring.kick()
    held = ring.conn.out.replies
    assert held <= core.quotas.outstanding
    cons = guest.get(ringmod.REQ_CONS)
    assert cons < guest.get(ringmod.REQ_PROD)   # requests left unread in the ring
    total = []
    for _ in range(100):
        total += guest.recv()
        ring.kick()
        if guest.get(ringmod.REQ_CONS) == guest.get(ringmod.REQ_PROD) and \
                not ring.conn.out:
            total += guest.recv()
            break
    sent = guest.get(ringmod.REQ_PROD) // len(frame)
    assert len(total) == sent


def test_dom0_ring_is_privileged(core):
    guest, ring = attach(core, 0)
    assert ring.conn.privileged
    assert roundtrip(guest, ring, XsType.INTRODUCE, b"7\x000\x001\0")[0].payload == b"OK\0"


def test_page_must_be_4096_writable():
    core = Xenstored()
    with pytest.raises(ValueError):
        core.attach_ring(1, bytearray(100), lambda: None)
    with pytest.raises(ValueError):
        core.attach_ring(1, bytes(4096), lambda: None)


def test_release_detaches_ring(core):
    guest, ring = attach(core, 1)
    core.release_domain(1)
    assert ring.conn.closed
    guest.send(encode(XsType.READ, 1, 0, b"name\0"))
    before = bytes(guest.page)
    ring.kick()
    assert bytes(guest.page) == before


def test_ring_mapper_on_introduce(core):
    pages = {}

    def mapper(domid, gfn, port):
        pages[domid] = bytearray(4096)
        return pages[domid], lambda: None

    core.ring_mapper = mapper
    dom0_page = bytearray(4096)
    g0 = Guest(dom0_page)
    r0 = core.attach_ring(0, dom0_page, g0.notify)
    assert roundtrip(g0, r0, XsType.INTRODUCE, b"3\x00123\x009\0")[0].payload == b"OK\0"
    assert 3 in pages and core.domains.get(3).conn is not None


def test_kick_from_other_thread_via_server(core, tmp_path):
    from xenkvm.xenstore.server import XenstoreServer
    server = XenstoreServer(core, str(tmp_path / "sock"))
    server.start()
    try:
        page = bytearray(4096)
        done = threading.Event()
        guest = Guest(page)
        ring = server.add_ring(1, page, done.set)
        guest.send(encode(XsType.READ, 1, 0, b"name\0"))
        done.clear()
        server.schedule(ring)
        assert done.wait(5)
        assert guest.recv()[0].payload == b"guest"
    finally:
        server.stop()
