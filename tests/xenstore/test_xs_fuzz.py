"""Fuzz targets (hypothesis, bounded): the wire parser, the dispatcher and the ring consumer.

Scale up locally with ``XS_FUZZ_EXAMPLES=20000 python3 -m pytest tests/xenstore/test_xs_fuzz.py``.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenkvm.xenstore import ring as ringmod
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.perms import Perm
from xenkvm.xenstore.protocol import (HEADER, PAYLOAD_MAX, FrameDecoder, Message,
                                      ProtocolError, XsError, XsType, encode)

EXAMPLES = int(os.environ.get("XS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ERROR_NAMES = {e.wire for e in XsError}

paths = st.sampled_from(["/", "/a", "/a/b", "a", "a/b", "/local/domain/5/x", "@releaseDomain",
                         "/a//b", "/a/", "", "/tool", "/local/domain/5"])
strings = st.one_of(paths, st.text(max_size=8), st.sampled_from(["T", "F", "0", "5", "r5", "b0"]))
payloads = st.one_of(
    st.lists(strings, max_size=4).map(lambda xs: b"".join(x.encode("utf-8", "replace") + b"\0"
                                                          for x in xs)),
    st.binary(max_size=64),
    st.tuples(paths, st.binary(max_size=16)).map(lambda t: t[0].encode() + b"\0" + t[1]),
)
messages = st.builds(Message, st.one_of(st.integers(0, 26), st.sampled_from([0xFFFF, 2**32 - 1])),
                     st.integers(0, 2**32 - 1), st.one_of(st.just(0), st.integers(0, 3)),
                     payloads)


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_wire_parser_random_streams(data, cuts):
    """Arbitrary bytes in arbitrary chunks: messages or ProtocolError, nothing else."""
    decoder = FrameDecoder()
    pos, seen = 0, 0
    try:
        for cut in cuts * (len(data) // max(1, sum(cuts)) + 1):
            decoder.feed(data[pos:pos + cut])
            pos += cut
            while (msg := decoder.next()) is not None:
                assert len(msg.payload) <= PAYLOAD_MAX
                seen += 16 + len(msg.payload)
            if pos >= len(data):
                break
    except ProtocolError:
        return
    assert seen + decoder.buffered() == len(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2**32 - 1), st.binary(max_size=40)),
                max_size=10),
       st.integers(1, 50))
def test_wire_parser_roundtrip(frames, chunk):
    stream = b"".join(encode(t, r, 0, p) for t, r, p in frames)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        decoder.feed(stream[i:i + chunk])
        while (msg := decoder.next()) is not None:
            out.append((msg.type, msg.req_id, msg.payload))
    assert out == frames


@FUZZ
@given(st.lists(st.tuples(st.booleans(), messages), max_size=25))
def test_dispatcher_random_requests(requests):
    """Every request gets exactly one well-formed reply; the tree stays consistent."""
    core = Xenstored()
    core.write_path("/local/domain/5", "", perms=(Perm(0, 5),))
    core.introduce_domain(5)
    conns = [core.connect(0), core.connect(5, kind="ring")]
    for privileged, msg in requests:
        conn = conns[0 if privileged else 1]
        with core.lock:
            core.handle(conn, msg)
        data = conn.out.chunk(1 << 20)
        conn.out.advance(len(data))
        decoder = FrameDecoder()
        decoder.feed(data)
        replies = []
        while (reply := decoder.next()) is not None:
            if reply.type != XsType.WATCH_EVENT:
                replies.append(reply)
        assert len(replies) == 1
        [reply] = replies
        assert reply.req_id == msg.req_id and reply.tx_id == msg.tx_id
        assert reply.type in (msg.type, XsType.ERROR)
        if reply.type == XsType.ERROR:
            assert reply.payload in ERROR_NAMES and reply.payload != b"EIO\0"
    assert core.store.check() == []


RING_OFFSETS = st.sampled_from([ringmod.REQ_CONS, ringmod.REQ_PROD, ringmod.RSP_CONS,
                                ringmod.RSP_PROD, ringmod.CONNECTION])


@FUZZ
@given(st.binary(min_size=0, max_size=1024), st.lists(
    st.one_of(st.tuples(st.just("idx"), RING_OFFSETS, st.integers(0, 2**32 - 1)),
              st.tuples(st.just("data"), st.integers(0, 1023), st.binary(max_size=64)),
              st.tuples(st.just("kick"), st.just(0), st.just(b""))),
    max_size=30))
def test_ring_consumer_hostile_guest(req_bytes, actions):
    """Random ring contents and indices: no exception escapes, the request area
    is never written by us, and the daemon keeps serving other domains."""
    core = Xenstored()
    core.write_path("/local/domain/1", "", perms=(Perm(0, 1),))
    page = bytearray(4096)
    page[:len(req_bytes)] = req_bytes
    ring = core.attach_ring(1, page, lambda: None)
    for kind, where, what in actions:
        if kind == "idx":
            struct.pack_into("<I", page, where, what)
        elif kind == "data":
            end = min(1024, where + len(what))
            page[where:end] = what[:end - where]
        else:
            before = bytes(page[:1024])
            ring.kick()
            assert bytes(page[:1024]) == before
    ring.kick()
    other = bytearray(4096)
    core.write_path("/local/domain/2", "", perms=(Perm(0, 2),))
    ring2 = core.attach_ring(2, other, lambda: None)
    other[:21] = HEADER.pack(XsType.READ, 7, 0, 5) + b"name\0"
    struct.pack_into("<I", other, ringmod.REQ_PROD, 21)
    ring2.kick()
    rsp_len = struct.unpack_from("<I", other, ringmod.RSP_PROD)[0]
    reply = HEADER.unpack_from(other, 1024)
    assert rsp_len == 16 + reply[3] and reply[1] == 7
    assert core.store.check() == []
