"""The vbd's C claims without persistent grants (xenkvm/backends/grants.py ``SegmentMapper.sync``,
``xk_gnt_claim`` in xk_grants.h): Xen's _set_status_v1 rules on a real GrantTable.

The table is the real GrantTable of the shared fake domain (tests/xen/evtchnfakes.py), its
frame 0 mapped at F0 in guest RAM, entries written there as the guest would.  A claim must
give the granted RAM page's host address and leave the entry as it found it; every entry the
rules refuse, or that someone holds pinned, must be left to the Python path (no claim, no bits
changed), and a v2 table must not be read as v1.
"""
from __future__ import annotations

import struct

import pytest
from tests.xen.evtchnfakes import FakeDomain

from xenkvm.backends._blkif_cffi import ffi, lib
from xenkvm.backends.grants import SegmentMapper
from xenkvm.xen.abi import lib as xlib

F0 = 0x3000
PAGE = 0x2000
PERMIT, RO, SUB = xlib.GTF_permit_access, xlib.GTF_readonly, xlib.GTF_sub_page
READING, WRITING = xlib.GTF_reading, xlib.GTF_writing


@pytest.fixture
def dom():
    d = FakeDomain(nvcpus=1, ram=64 << 20, gnttab=True)
    d.gnttab.map_frame(0, F0)
    d.mem.write(PAGE << 12, b"\x5a" * 4096)
    yield d
    d.close()


def grant(d, ref: int, flags: int, gfn: int, domid: int = 0) -> None:
    d.mem.write((F0 << 12) + ref * 8, struct.pack("<HHI", flags, domid, gfn))


def flags(d, ref: int) -> int:
    return d.gnttab.codec.header(ref)[0]


def claim(mapper: SegmentMapper, ref: int, writable: bool):
    """The page a claim gives (as bytes of its first 4 bytes and its address), or None."""
    mapper.sync()
    page = ffi.new("char **")
    if not lib.xk_gnt_claim_test(mapper.grants, ref, writable, page):
        return None
    return page[0]


def host_address(d, gfn: int) -> int:
    return int(ffi.cast("uintptr_t", ffi.cast("char *", d.mem.cptr(gfn << 12, 4096))))


def test_a_claim_gives_the_granted_page_and_leaves_the_entry_as_it_was(dom):
    grant(dom, 10, PERMIT, PAGE)
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    for writable in (False, True):
        page = claim(m, 10, writable)
        assert page is not None and int(ffi.cast("uintptr_t", page)) == host_address(dom, PAGE)
        assert ffi.buffer(page, 4)[:] == b"\x5a" * 4
        assert flags(dom, 10) == PERMIT             # released: no busy bit left


@pytest.mark.parametrize("entry,writable", [
    ((PERMIT, 1, PAGE), False),           # granted to another domain
    ((PERMIT | RO, 0, PAGE), True),       # the backend would write a read-only grant
    ((PERMIT | SUB, 0, PAGE), False),     # sub-page bit: refused for a map (Xen: _set_status_v1)
    ((0, 0, PAGE), False),                # GTF_invalid
    ((PERMIT | READING, 0, PAGE), False),  # someone holds it: the Python path counts pins
    ((PERMIT, 0, 0x10_0000), False),      # the frame is not guest RAM (64 MiB of it)
])
def test_refused_entries_are_left_to_python_untouched(dom, entry, writable):
    flags_, domid, gfn = entry
    grant(dom, 10, flags_, gfn, domid)
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    assert claim(m, 10, writable) is None
    assert flags(dom, 10) == flags_


def test_a_read_only_grant_is_claimed_for_reading(dom):
    grant(dom, 10, PERMIT | RO, PAGE)
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    assert claim(m, 10, False) is not None and flags(dom, 10) == PERMIT | RO


def test_a_python_pin_keeps_c_off_until_released(dom):
    grant(dom, 10, PERMIT, PAGE)
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    mapping = dom.gnttab.map(dom.domid, 10, True)
    assert claim(m, 10, False) is None
    mapping.unmap()
    assert claim(m, 10, False) is not None


def test_refs_past_the_frames_then_a_grown_table(dom):
    """A ref beyond the synced frames is not claimed; after the table grows, the next sync sees it."""
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    ref = 512 + 3                          # frame 1
    assert claim(m, ref, False) is None
    assert dom.gnttab.grow(2)
    dom.gnttab.map_frame(1, F0 + 1)
    grant(dom, ref, PERMIT, PAGE)
    assert claim(m, ref, False) is not None


def test_a_v2_table_is_never_read_as_v1(dom):
    grant(dom, 10, PERMIT, PAGE)
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=False)
    assert claim(m, 10, False) is not None
    assert dom.gnttab.set_version(2) == 0
    assert claim(m, 10, False) is None and m.grants.nr_entries == 0


def test_persistent_rings_claim_nothing(dom):
    m = SegmentMapper(dom.gnttab, dom.domid, persistent=True)
    assert m.grants == ffi.NULL
    m.sync()
