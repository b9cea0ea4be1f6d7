"""The v1/v2 entry codecs and the frames' atomics, unit by unit (parametrized where shared).

Each codec runs over real Frames on a real GuestMemory, with its frames either
in VMM memory or mapped into the guest (RAM page or a page in the hole), since
the busy bits are set by different means in each case.
"""
from __future__ import annotations

import struct

import pytest

from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.abi import Gntst, lib
from xenkvm.xen.gnttab.entries import (BUSY, V1_SIZE, V2_SIZE, EntryCodecV1, EntryCodecV2, Target,
                                       codec_for)
from xenkvm.xen.gnttab.errors import GrantError
from xenkvm.xen.gnttab.frames import Frame, Frames

PERMIT, RO, READING, WRITING = lib.GTF_permit_access, lib.GTF_readonly, lib.GTF_reading, lib.GTF_writing
SUB, TRANS = lib.GTF_sub_page, lib.GTF_transitive
RAM_GPFN, HOLE_GPFN = 0x300, 0xF0000
DOM = 0


def setup(version: int, where: str):
    mem = GuestMemory(8 << 20)
    frames = Frames(mem, max_hole_slots=8)
    codec = codec_for(version, frames)
    frames.grow(1, codec.status_frames_for(1))
    if where != "vmm":
        base = RAM_GPFN if where == "ram" else HOLE_GPFN
        frames.place(0, base, False)
        for i in range(len(frames.status)):
            frames.place(i, base + 1 + i, True)
    return mem, codec


def raw_v1(codec, ref, flags, domid, gfn):
    frame, off = codec.locate(ref)
    struct.pack_into("<HHI", frame.buf, off, flags, domid, gfn)


def raw_v2(codec, ref, flags, domid, tail: bytes):
    frame, off = codec.locate(ref)
    frame.buf[off:off + 16] = struct.pack("<HH", flags, domid) + tail


PLACES = ["vmm", "ram", "hole"]


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("version", [1, 2])
def test_write_describe_and_busy_round_trip(version, where):
    mem, codec = setup(version, where)
    assert codec.version == version and codec.per_frame == 4096 // (V1_SIZE if version == 1 else V2_SIZE)
    codec.write(9, PERMIT | RO, 5, 0x1234)
    assert codec.header(9) == (PERMIT | RO, 5) and codec.target(9) == Target(0x1234)
    assert codec.describe(9)["frame"] == 0x1234 and codec.busy(9) == 0
    codec.set_status(9, 5, True, False, False, 0)
    assert codec.busy(9) == READING
    with pytest.raises(GrantError) as e:                   # write pin of a read-only grant
        codec.set_status(9, 5, False, False, True, 0)
    assert e.value.status == Gntst.general_error and codec.busy(9) == READING
    codec.clear_busy(9, BUSY)
    assert codec.busy(9) == 0 and codec.header(9) == (PERMIT | RO, 5)
    codec.write(10, PERMIT | READING | WRITING, 0, 7)     # busy bits go where the version keeps them
    assert codec.busy(10) == BUSY and codec.header(10)[0] & ~BUSY == PERMIT
    if where != "vmm":                                     # the guest sees it all in its pages
        gpa = ((RAM_GPFN if where == "ram" else HOLE_GPFN) << 12) + 9 * codec.entry_size
        assert struct.unpack("<HH", mem.read(gpa, 4)) == (PERMIT | RO, 5)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("flags, domid, mapping, ok", [
    (PERMIT, DOM, False, True),
    (PERMIT, 3, False, False),              # granted to another domain
    (0, DOM, False, False),                 # not granted
    (PERMIT | SUB, DOM, True, False),       # a map counts GTF_sub_page into the type check
    (PERMIT | SUB, DOM, False, True),       # a copy does not
])
def test_set_status_checks_type_and_domid(version, flags, domid, mapping, ok):
    _, codec = setup(version, "ram")
    if version == 1:
        raw_v1(codec, 12, flags, domid, 0x55)
    else:
        raw_v2(codec, 12, flags, domid, struct.pack("<HHQ", 0, 4096, 0x55))
    if ok:
        codec.set_status(12, DOM, False, mapping, False, 0)
        assert codec.busy(12) == BUSY
    else:
        with pytest.raises(GrantError) as e:
            codec.set_status(12, DOM, False, mapping, False, 0)
        assert e.value.status == Gntst.general_error and codec.busy(12) == 0


def test_v1_has_no_transitive_and_v2_follows_for_copies_only():
    _, c1 = setup(1, "ram")
    raw_v1(c1, 3, TRANS, DOM, 0)
    with pytest.raises(GrantError):
        c1.set_status(3, DOM, True, False, False, 0)
    _, c2 = setup(2, "ram")
    raw_v2(c2, 3, TRANS, DOM, struct.pack("<HHI4x", 1, 0, 20))
    c2.set_status(3, DOM, True, False, False, 0)
    assert c2.target(3) == Target(0, trans=(1, 20))
    c2.clear_busy(3, BUSY)
    with pytest.raises(GrantError):
        c2.set_status(3, DOM, True, True, False, 0)
    raw_v2(c2, 4, PERMIT | SUB, DOM, struct.pack("<HHQ", 100, 200, 0x66))
    assert c2.target(4) == Target(0x66, 100, 200)
    assert c2.describe(4) == {"flags": PERMIT | SUB, "domid": DOM, "status": 0, "page_off": 100,
                              "length": 200, "frame": 0x66}


@pytest.mark.parametrize("where", PLACES)
def test_v1_cmpxchg_keeps_domid_and_retries_a_few_times(where, monkeypatch):
    mem, codec = setup(1, where)
    raw_v1(codec, 1, PERMIT, DOM, 0x10)
    tries = []
    real = Frame.cmpxchg32

    def racy(frame, off, expected, desired):
        tries.append(expected)
        if len(tries) < 3:                                 # the guest flips GTF_readonly... back
            return False, expected
        return real(frame, off, expected, desired)
    monkeypatch.setattr(Frame, "cmpxchg32", racy)
    codec.set_status(1, DOM, False, False, False, 0)
    assert len(tries) == 3 and codec.header(1) == (PERMIT | BUSY, DOM)
    codec.clear_busy(1, BUSY)
    monkeypatch.setattr(Frame, "cmpxchg32", lambda f, o, e, d: (False, e))
    with pytest.raises(GrantError, match="unstable"):
        codec.set_status(1, DOM, True, False, False, 0)
    assert codec.header(1) == (PERMIT, DOM)


@pytest.mark.parametrize("where", PLACES)
def test_v2_revoke_between_check_and_status_is_undone(where, monkeypatch):
    mem, codec = setup(2, where)
    raw_v2(codec, 5, PERMIT, DOM, struct.pack("<IQ", 0, 0x20))
    real = Frame.or32

    def revoking(frame, off, bits):
        raw_v2(codec, 5, 0, DOM, struct.pack("<IQ", 0, 0x20))   # the guest ends the grant
        return real(frame, off, bits)
    monkeypatch.setattr(Frame, "or32", revoking)
    with pytest.raises(GrantError, match="changed"):
        codec.set_status(5, DOM, False, False, False, 0)
    assert codec.busy(5) == 0


def test_v2_read_only_under_a_write_pin_keeps_writing_of_other_writers():
    _, codec = setup(2, "ram")
    raw_v2(codec, 6, PERMIT, DOM, struct.pack("<IQ", 0, 0x20))
    codec.set_status(6, DOM, False, False, False, 0)
    raw_v2(codec, 6, PERMIT | RO, DOM, struct.pack("<IQ", 0, 0x20))
    with pytest.raises(GrantError):                        # a pinned writer still holds it
        codec.set_status(6, DOM, False, False, True, 1)
    assert codec.busy(6) == BUSY


def test_keep_for_a_version_switch():
    _, c1 = setup(1, "vmm")
    raw_v1(c1, 2, PERMIT | READING, 0, 0x99)
    assert c1.keep(2) == (PERMIT | READING, 0, 0x99)
    _, c2 = setup(2, "vmm")
    c2.write(1, PERMIT | WRITING | READING, 0, 0x42)
    assert c2.keep(1) == (PERMIT | BUSY, 0, 0x42)
    c2.write(2, PERMIT, 0, 1 << 32)                        # v1's frame field is 32 bits
    raw_v2(c2, 3, TRANS, 0, struct.pack("<HHI4x", 1, 0, 20))
    raw_v2(c2, 4, 0, 0, bytes(12))
    assert c2.keep(2) is None and c2.keep(3) is None and c2.keep(4) == (0, 0, 0)


def test_codecs_are_siblings_behind_one_interface():
    assert {codec_for(v, Frames(GuestMemory(4 << 20), 1)).__class__ for v in (1, 2)} == {EntryCodecV1, EntryCodecV2}
    assert EntryCodecV1(Frames(GuestMemory(4 << 20), 1)).status_frames_for(64) == 0
    assert EntryCodecV2(Frames(GuestMemory(4 << 20), 1)).status_frames_for(64) == 8


@pytest.mark.parametrize("where", ["vmm", "ram"])
def test_frame_atomics(where):
    mem = GuestMemory(4 << 20)
    frame = Frame(mem)
    if where == "ram":
        frame.attach(0x10, mem.page(0x10))
    assert frame.cmpxchg32(8, 1, 2) == (False, 0)
    assert frame.cmpxchg32(8, 0, 0xFFFF_0001) == (True, 0)
    assert frame.or32(8, 0x10) == 0xFFFF_0001 and frame.and32(8, ~1) == 0xFFFF_0011
    assert frame.load32(8) == 0xFFFF_0010
    if where == "ram":
        assert mem.read_u32((0x10 << 12) + 8) == 0xFFFF_0010

