"""The vif's batched grant copy (xenkvm/backends/gntcopy.py): C for v1, same checks, same errors.

The table is the real GrantTable of the shared fake domain (tests/xen/evtchnfakes.py),
its frame 0 mapped at F0 in guest RAM, entries written there as the guest would.  Each
case runs on a v1 table (the C path) and a v2 table (the Python path), and every
refusal must come back with the GNTST code GrantTable.copy_from/copy_to give, while the
other segments of the batch are copied.
"""
from __future__ import annotations

import struct

import pytest
from tests.xen.evtchnfakes import FakeDomain

from xenkvm.backends._netif_cffi import ffi, lib
from xenkvm.backends.gntcopy import BatchCopy
from xenkvm.xen.abi import Gntst
from xenkvm.xen.abi import lib as xlib

F0 = 0x3000
PAGES = [0x2000 + i for i in range(4)]
PERMIT, RO = xlib.GTF_permit_access, xlib.GTF_readonly
READING, WRITING = xlib.GTF_reading, xlib.GTF_writing


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


def grant(d, ref: int, flags: int, gfn: int, domid: int = 0) -> None:
    if d.gnttab.version == 1:
        d.mem.write((F0 << 12) + ref * 8, struct.pack("<HHI", flags, domid, gfn))
    else:
        d.mem.write((F0 << 12) + ref * 16, struct.pack("<HHHHQ", flags, domid, 0, 4096, gfn))


def flags(d, ref: int) -> int:
    return d.gnttab.codec.header(ref)[0] | d.gnttab.codec.busy(ref)


def test_gathers_and_scatters_like_copy_from_and_copy_to(dom):
    buf = bytearray(3 * 4096)
    ptr = ffi.from_buffer(buf)
    c = BatchCopy(dom, 18)
    c.add(10, 0, 4096, ptr)
    c.add(11, 100, 50, ptr + 4096)
    c.add(13, 4095, 1, ptr + 4146)
    assert c.run(to_guest=False) == {}
    assert buf[:4096] == b"\x40" * 4096 and buf[4096:4146] == b"\x41" * 50 and buf[4146] == 0x43
    served = [c.segs[i].status == lib.XKG_DONE for i in range(3)]
    assert served == [dom.gnttab.version == 1] * 3       # v1 in C, v2 by the Python path
    out = ffi.from_buffer(bytearray(b"\x99" * 8))
    c.add(12, 8, 8, out)
    assert c.run(to_guest=True) == {}
    assert dom.mem.read((PAGES[2] << 12) + 7, 10) == b"\x42" + b"\x99" * 8 + b"\x42"
    assert dom.gnttab.pinned == {} and all(flags(dom, 10 + i) == PERMIT for i in range(4))


@pytest.mark.parametrize("bad, status", [
    ((11, 0, 16, "ro"), Gntst.general_error),       # a write into a GTF_readonly grant
    ((700, 0, 16, None), Gntst.bad_gntref),
    ((11, 4090, 16, None), Gntst.bad_copy_arg),     # beyond the page
    ((11, 0, 16, "revoked"), Gntst.general_error),
    ((11, 0, 16, "other"), Gntst.general_error),    # granted to domain 5, not to us
    ((11, 0, 16, "nopage"), Gntst.bad_page),        # the frame is not guest memory
])
def test_a_refused_segment_has_its_error_and_the_others_are_copied(dom, bad, status):
    ref, off, n, how = bad
    if how == "ro":
        grant(dom, ref, PERMIT | RO, PAGES[1])
    elif how == "revoked":
        grant(dom, ref, 0, PAGES[1])
    elif how == "other":
        grant(dom, ref, PERMIT, PAGES[1], domid=5)
    elif how == "nopage":
        grant(dom, ref, PERMIT, 0xFFFFF)
    c = BatchCopy(dom, 4)
    data = ffi.from_buffer(bytearray(b"\xee" * 4096))
    for r, o, length in ((10, 0, 4096), (ref, off, n), (12, 0, 16)):
        c.add(r, o, length, data)
    errors = c.run(to_guest=True)
    assert list(errors) == [1] and errors[1].status == status
    assert [dom.mem.read(g << 12, 1) for g in (PAGES[0], PAGES[2])] == [b"\xee", b"\xee"]
    assert dom.mem.read(PAGES[1] << 12, 1) == b"\x41"
    assert dom.gnttab.pinned == {} and all(flags(dom, r) & (READING | WRITING) == 0 for r in (10, 12))
    if ref < 700:
        assert flags(dom, ref) & (READING | WRITING) == 0


def test_a_mapped_ref_keeps_its_pin(dom):
    """A ref held by a mapping goes the Python way: one more pin, released, the mapping's stays."""
    m = dom.gnttab.map(dom.domid, 11, False)
    c = BatchCopy(dom, 2)
    out = bytearray(32)
    ptr = ffi.from_buffer(out)
    c.add(11, 0, 16, ptr)
    c.add(10, 0, 16, ptr + 16)
    assert c.run(to_guest=False) == {}
    assert c.segs[0].status == lib.XKG_PYTHON and out == b"\x41" * 16 + b"\x40" * 16
    assert flags(dom, 11) & READING and dom.gnttab.pins.counts() == {11: (1, 0)}
    m.unmap()
    assert flags(dom, 11) == PERMIT and flags(dom, 10) == PERMIT


def test_read_only_grant_reads_but_refuses_writes(dom):
    """A read-only grant: read by C; a write falls back and Python gives the Xen error, no bits left."""
    grant(dom, 10, PERMIT | RO, PAGES[0])
    c, buf = BatchCopy(dom, 1), ffi.from_buffer(bytearray(4))
    c.add(10, 0, 4, buf)
    assert c.run(to_guest=False) == {}                 # reading a read-only grant is fine
    c.add(10, 0, 4, buf)
    assert c.run(to_guest=True)[0].status == Gntst.general_error
    assert flags(dom, 10) == PERMIT | RO


def test_a_ref_in_a_frame_added_later_is_copied_by_c_at_the_next_run(dom):
    """The snapshot follows the table: a grown table's new frame is C's at the next run."""
    c, out = BatchCopy(dom, 1), bytearray(8)
    c.add(10, 0, 8, ffi.from_buffer(out))
    assert c.run(to_guest=False) == {}               # the first sync
    assert dom.gnttab.grow(2)
    dom.gnttab.map_frame(1, F0 + 1)
    ref = 512 + 7 if dom.gnttab.version == 1 else 256 + 7
    grant(dom, ref, PERMIT, PAGES[3])
    c.add(ref, 0, 8, ffi.from_buffer(out))
    assert c.run(to_guest=False) == {} and out == b"\x43" * 8
    assert (c.segs[0].status == lib.XKG_DONE) == (dom.gnttab.version == 1)
    assert flags(dom, ref) == PERMIT

