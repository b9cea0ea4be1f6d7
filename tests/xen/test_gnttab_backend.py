"""The backend API's batched copy (copy_batch) and the sub-op table of ops, v1 and v2.

The table is the real GrantTable of the shared fake domain, its frame 0
mapped at F0 in guest RAM, entries written there as the guest would.
"""
from __future__ import annotations

import struct

import pytest

from xenkvm.xen.abi import DOMID_SELF, GnttabOp, Gntst, Hypercall, XenStruct, ffi, lib
from xenkvm.xen.gnttab import GrantError, ops
from evtchnfakes import FakeDomain

DOMID = 1
F0 = 0x3000
PAGES = [0x2000 + i for i in range(4)]
PERMIT, RO = lib.GTF_permit_access, lib.GTF_readonly
READING, WRITING, SUB = lib.GTF_reading, lib.GTF_writing, lib.GTF_sub_page


@pytest.fixture(params=[1, 2])
def dom(request):
    d = FakeDomain(nvcpus=1, ram=64 << 20, gnttab=True)
    assert d.gnttab.set_version(request.param) == 0
    d.gnttab.map_frame(0, F0)
    for i, gfn in enumerate(PAGES):
        grant(d, 10 + i, PERMIT, gfn)
        d.mem.write(gfn << 12, bytes([0x40 + i]) * 4096)
    yield d
    d.close()


def grant(d, ref: int, flags: int, gfn: int, page_off: int = 0, length: int = 4096) -> None:
    if d.gnttab.version == 1:
        d.mem.write((F0 << 12) + ref * 8, struct.pack("<HHI", flags, 0, gfn))
    else:
        d.mem.write((F0 << 12) + ref * 16, struct.pack("<HHHHQ", flags, 0, page_off, length, gfn))


def busy(d, ref: int) -> int:
    return d.gnttab.codec.busy(ref)


def test_copy_batch_from_guest_into_host_buffers(dom):
    bufs = [bytearray(4096) for _ in PAGES]
    segs = [(10 + i, 0, memoryview(b)) for i, b in enumerate(bufs)]
    assert dom.gnttab.copy_batch(DOMID, segs, to_guest=False) == 4 * 4096
    assert [b[0] for b in bufs] == [0x40, 0x41, 0x42, 0x43] and bufs[3] == bytes([0x43]) * 4096
    small = bytearray(8)
    assert dom.gnttab.copy_batch(DOMID, [(11, 4088, small)], to_guest=False) == 8
    assert small == bytes([0x41]) * 8
    assert dom.gnttab.pinned == {} and all(busy(dom, 10 + i) == 0 for i in range(4))


def test_copy_batch_to_guest(dom):
    data = memoryview(bytes(range(256)) * 16)
    segs = [(10, 0, data), (12, 512, data[:512]), (13, 4095, data[:1])]
    assert dom.gnttab.copy_batch(DOMID, segs, to_guest=True) == 4096 + 512 + 1
    assert dom.mem.read(PAGES[0] << 12, 4096) == bytes(data)
    assert dom.mem.read((PAGES[2] << 12) + 512, 512) == bytes(data[:512])
    assert dom.mem.read((PAGES[2] << 12) + 511, 1) == b"\x42"
    assert dom.mem.read((PAGES[3] << 12) + 4095, 1) == b"\x00"
    assert dom.gnttab.pinned == {} and busy(dom, 10) == 0


@pytest.mark.parametrize("bad, status", [
    ((11, 0, 4096, "ro"), Gntst.general_error),       # read-only grant in a write batch
    ((700, 0, 16, None), Gntst.bad_gntref),
    ((11, 4090, 16, None), Gntst.bad_copy_arg),      # beyond the page
    ((11, 0, 16, "revoked"), Gntst.general_error),
])
def test_copy_batch_refused_segment_moves_nothing(dom, bad, status):
    ref, off, n, how = bad
    if how == "ro":
        grant(dom, ref, PERMIT | RO, PAGES[1])
    elif how == "revoked":
        grant(dom, ref, 0, PAGES[1])
    segs = [(10, 0, b"\xee" * 4096), (ref, off, b"\xee" * n), (12, 0, b"\xee" * 16)]
    with pytest.raises(GrantError) as e:
        dom.gnttab.copy_batch(DOMID, segs, to_guest=True)
    assert e.value.status == status
    assert [dom.mem.read(g << 12, 1) for g in PAGES[:3]] == [b"\x40", b"\x41", b"\x42"]
    assert dom.gnttab.pinned == {} and busy(dom, 10) == 0 and busy(dom, 12) == 0


def test_copy_batch_other_domain_and_sub_page(dom):
    with pytest.raises(GrantError) as e:
        dom.gnttab.copy_batch(DOMID + 1, [(10, 0, bytearray(4))], to_guest=False)
    assert e.value.status == Gntst.bad_domain
    if dom.gnttab.version == 1:
        return
    grant(dom, 14, PERMIT | SUB, PAGES[0], 100, 50)
    out = bytearray(50)
    assert dom.gnttab.copy_batch(DOMID, [(14, 100, out)], to_guest=False) == 50
    with pytest.raises(GrantError) as e:
        dom.gnttab.copy_batch(DOMID, [(14, 100, bytearray(51))], to_guest=False)
    assert e.value.status == Gntst.general_error and dom.gnttab.pinned == {}


def test_copy_batch_needs_writable_buffers_from_guest(dom):
    with pytest.raises(TypeError):
        dom.gnttab.copy_batch(DOMID, [(10, 0, b"\0" * 4)], to_guest=False)
    assert dom.gnttab.pinned == {} and busy(dom, 10) == 0


def test_subops_table_covers_registered_ops(dom):
    """The sub-op -> handler table (for the central hypercall table) is what register() puts on
    the dispatcher: every GNTTABOP we answer, each handler callable as (table, call, uop)."""
    assert set(ops.SUBOPS) == {GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.set_version,
                               GnttabOp.get_version, GnttabOp.get_status_frames, GnttabOp.copy,
                               GnttabOp.map_grant_ref, GnttabOp.unmap_grant_ref}
    assert set(dom.dispatcher.subop_tables[Hypercall.grant_table_op]) == set(ops.SUBOPS)
    st = XenStruct("struct gnttab_query_size")
    q = ffi.new("struct gnttab_query_size *")
    q.dom = DOMID_SELF
    dom.mem.write(0x10000, st.to_bytes(q))

    class Vcpu:
        id = 0

        def translate(self, gva):
            return gva
    r = dom.dispatcher.dispatch(Vcpu(), Hypercall.grant_table_op, (GnttabOp.query_size, 0x10000, 1, 0, 0, 0))
    out = st.from_bytes(dom.mem.read(0x10000, st.size))
    assert r == 0 and (out.status, out.nr_frames) == (Gntst.okay, 1)


def test_decode_copy_reads_both_sides():
    st = XenStruct("struct gnttab_copy")
    raw = bytearray(st.size)
    for base, (u, dom, off) in ((ops.COPY_SRC, (0x1_0000_0007, 5, 12)), (ops.COPY_DST, (0x1234, DOMID_SELF, 99))):
        struct.pack_into("<QHH", raw, base, u, dom, off)
    struct.pack_into("<HH", raw, st.offset("len"), 77, lib.GNTCOPY_source_gref)
    op = ops.decode_copy(bytes(raw))
    assert op.length == 77
    assert op.src == ops.CopySide(True, 7, 5, 12)                     # a ref: the union's low 32 bits
    assert op.dst == ops.CopySide(False, 0x1234, DOMID_SELF, 99)       # a gmfn: all 64
