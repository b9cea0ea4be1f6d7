"""XENMEM reservation calls (ballooning), called as a guest would: real domain, real RAM.

Each extent call returns the number of extents done (Xen's rule: never an
error), so every bad-input case is checked through that count and through the
domain's accounting and the guest pages themselves.
"""
from __future__ import annotations

import ctypes
import struct

import pytest

from xenkvm.xen.abi import DOMID_SELF, Errno, Hypercall, MemOp, ffi, lib
from xenkvm.xen.gnttab import INVALID_GFN

pytestmark = pytest.mark.kvm
BUF = 0x10_0000          # the xen_memory_reservation
LIST = 0x10_1000         # its extent list
PAGES = (32 << 20) >> 12  # the fixture's RAM
X, Y, Z = 0x400, 0x401, 0x402   # RAM frames the tests balloon
DOMID = 0                 # XenConfig's default domid is patched in the fixture below


def reservation(mem, gfns, order=0, nr=None, domid=DOMID_SELF, flags=0, handle=LIST) -> None:
    req = ffi.new("struct xen_memory_reservation *")
    req.nr_extents = len(gfns) if nr is None else nr
    req.extent_order, req.mem_flags, req.domid = order, flags, domid
    data = bytearray(ffi.buffer(req))
    struct.pack_into("<Q", data, _handle_off(), handle)
    mem.write(BUF, bytes(data))
    if gfns:
        mem.write(LIST, struct.pack(f"<{len(gfns)}Q", *gfns))


def _handle_off() -> int:
    from xenkvm.xen.abi import handle_offset
    return handle_offset("xen_memory_reservation", "extent_start")


@pytest.fixture
def op(hcall, xen_machine):
    """op(MemOp, gfns, **reservation fields) -> the hypercall's result."""
    def run(cmd, gfns=(), start=0, arg=BUF, **kw) -> int:
        reservation(xen_machine.mem, list(gfns), **kw)
        return hcall(Hypercall.memory_op, int(cmd) | start << 6, arg)
    return run


def counts(hcall, mem, domid=DOMID_SELF) -> tuple[int, int]:
    mem.write(BUF, struct.pack("<H", domid))
    return (hcall(Hypercall.memory_op, MemOp.current_reservation, BUF),
            hcall(Hypercall.memory_op, MemOp.maximum_reservation, BUF))


def resident_pages(mem, gpa: int, length: int) -> int:
    """How many of the host pages behind guest RAM [gpa, gpa+length) are resident (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = length >> 12
    vec = (ctypes.c_ubyte * pages)()
    addr = mem.host_address(gpa, length)
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec)


def test_counts_and_their_errors(hcall, xen_machine):
    mem = xen_machine.mem
    assert counts(hcall, mem) == (PAGES, PAGES)
    assert counts(hcall, mem, xen_machine.xen.domid) == (PAGES, PAGES)
    assert counts(hcall, mem, 0) == (-Errno.EPERM, -Errno.EPERM)       # dom0 exists: XSM says no
    assert counts(hcall, mem, 7) == (-Errno.ESRCH, -Errno.ESRCH)
    assert hcall(Hypercall.memory_op, MemOp.current_reservation, 1 << 50) == -Errno.EFAULT
    assert hcall(Hypercall.memory_op, MemOp.maximum_reservation | 1 << 6, BUF) == -Errno.EINVAL


def test_balloon_out_and_back_releases_and_zeroes(op, hcall, xen_machine):
    """The given-back frames leave the host: checked page by page with mincore(2), not by the
    mapping's RSS, which other pages can raise meanwhile (with transparent huge pages, as in
    the rig's L1 where THP is "always", one write to a block not yet resident adds 2 MiB)."""
    mem = xen_machine.mem
    base = 0x800                                  # 4 MiB of RAM at 8 MiB
    mem.fill(base << 12, 1024 << 12, 0xA5)        # the guest uses it: resident on the host
    assert resident_pages(mem, base << 12, 1024 << 12) == 1024
    assert op(MemOp.decrease_reservation, range(base, base + 1024)) == 1024
    assert resident_pages(mem, base << 12, 1024 << 12) == 0    # really given back to the host
    assert counts(hcall, mem) == (PAGES - 1024, PAGES)
    assert not xen_machine.xen.reservation.is_populated(base)
    assert op(MemOp.populate_physmap, range(base, base + 1024, 512), order=9) == 2
    assert counts(hcall, mem) == (PAGES, PAGES)
    assert mem.read(base << 12, 1024 << 12) == bytes(1024 << 12)   # repopulated pages read as zero


def test_decrease_partial_progress(op, hcall, xen_machine):
    mem = xen_machine.mem
    res = xen_machine.xen.reservation
    outside = PAGES + 5                               # past the end of RAM
    assert op(MemOp.decrease_reservation, [X, outside, Y]) == 1
    assert not res.is_populated(X) and res.is_populated(Y)
    assert op(MemOp.decrease_reservation, [X]) == 0   # not populated any more
    assert op(MemOp.decrease_reservation, [Y, Y]) == 1
    assert op(MemOp.decrease_reservation, [0xC0000]) == 0   # the IOAPIC/special-page hole
    # an extent failing half way: its earlier pages are gone, the extent is not counted
    assert op(MemOp.decrease_reservation, [0x600, 0x800], order=1, nr=2) == 2
    mem.write(LIST, struct.pack("<Q", PAGES - 1))      # last frame of RAM, order 1 runs past it
    assert op(MemOp.decrease_reservation, [PAGES - 1], order=1) == 0
    assert not res.is_populated(PAGES - 1)
    assert counts(hcall, mem)[0] == PAGES - 2 - 4 - 1


def test_decrease_bad_arguments_do_nothing(op, hcall, xen_machine):
    mem = xen_machine.mem
    res = xen_machine.xen.reservation
    assert op(MemOp.decrease_reservation, [X], order=10) == 0           # above the domU max order
    assert op(MemOp.decrease_reservation, [X], nr=(0xFFFFFFFF >> 6) + 1) == 0   # too many extents
    assert op(MemOp.decrease_reservation, [X], domid=0) == 0            # not itself: XSM
    assert op(MemOp.decrease_reservation, [X], domid=5) == 0            # no such domain
    assert op(MemOp.decrease_reservation, [X], handle=1 << 50) == 0     # unreadable list
    assert op(MemOp.decrease_reservation, [X], arg=1 << 50) == 0        # unreadable struct
    assert op(MemOp.decrease_reservation, [X], start=1) == 1            # start at/after nr_extents
    assert res.is_populated(X) and counts(hcall, mem)[0] == PAGES
    # the continuation encoding: start extent 1 skips the first entry
    assert op(MemOp.decrease_reservation, [X, Y], start=1) == 2
    assert res.is_populated(X) and not res.is_populated(Y)
    assert op(MemOp.decrease_reservation, [X], domid=xen_machine.xen.domid) == 1


def test_extent_list_running_out_of_guest_memory(op, hcall, xen_machine):
    mem = xen_machine.mem
    end = PAGES << 12
    mem.write(end - 16, struct.pack("<QQ", X, Y))     # two entries, then the end of RAM
    assert op(MemOp.decrease_reservation, [], nr=3, handle=end - 16) == 2
    assert counts(hcall, mem)[0] == PAGES - 2


def test_populate_accounting_and_limits(op, hcall, xen_machine):
    mem = xen_machine.mem
    res = xen_machine.xen.reservation
    assert op(MemOp.populate_physmap, [Z]) == 0                 # at max_pages: over-allocation
    assert op(MemOp.decrease_reservation, [X, Y]) == 2
    assert op(MemOp.populate_physmap, [PAGES + 1]) == 0          # outside RAM
    assert op(MemOp.populate_physmap, [X], order=10) == 0
    assert op(MemOp.populate_physmap, [X], flags=lib.XENMEMF_populate_on_demand) == 0
    assert op(MemOp.populate_physmap, [X], flags=12) == 0        # address_bits <= PAGE_SHIFT
    assert op(MemOp.populate_physmap, [X], flags=lib.XENMEMF_exact_node_request | 1 << 8) == 0
    assert op(MemOp.populate_physmap, [X], domid=0) == 0
    assert not res.is_populated(X)
    # Z is populated: Xen maps a new page there and the old one stays owned, unmapped
    mem.fill(Z << 12, 4096, 0x5A)
    assert op(MemOp.populate_physmap, [X, Z, Y]) == 2            # the third would pass max_pages
    assert res.populated_pages == PAGES - 1 and res.unmapped_pages == 1
    assert counts(hcall, mem) == (PAGES, PAGES)
    assert mem.read(Z << 12, 4096) == bytes(4096)
    assert not res.is_populated(Y)


def test_increase_reservation_allocates_unmapped_pages(op, hcall, xen_machine):
    mem = xen_machine.mem
    assert op(MemOp.increase_reservation, [], nr=1, handle=0) == 0   # at max_pages already
    assert op(MemOp.decrease_reservation, range(0x700, 0x704)) == 4
    assert op(MemOp.increase_reservation, [], nr=10, handle=0) == 4
    assert op(MemOp.increase_reservation, [], nr=1, order=10, handle=0) == 0
    assert counts(hcall, mem) == (PAGES, PAGES)
    assert xen_machine.xen.reservation.unmapped_pages == 4


def test_xen_structures_cannot_be_ballooned_away(op, hcall, xen_machine):
    mem = xen_machine.mem
    res = xen_machine.xen.reservation
    shinfo = 0x200
    req = ffi.new("struct xen_add_to_physmap *")
    req.domid, req.space, req.idx, req.gpfn = DOMID_SELF, lib.XENMAPSPACE_shared_info, 0, shinfo
    mem.write(BUF, bytes(ffi.buffer(req)))
    assert hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF) == 0
    assert op(MemOp.decrease_reservation, [X, shinfo, Y]) == 1
    assert res.is_populated(shinfo) and res.is_populated(Y)
    assert op(MemOp.populate_physmap, [shinfo]) == 0     # nor replaced by a fresh page
    assert xen_machine.xen.shinfo.gpa == shinfo << 12
    # a grant frame mapped over a RAM frame is unmapped (its content kept), then the page goes
    gnttab = xen_machine.xen.gnttab
    frame = 0x300
    req.space, req.idx, req.gpfn = lib.XENMAPSPACE_grant_table, 0, frame
    mem.write(BUF, bytes(ffi.buffer(req)))
    assert hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF) == 0
    mem.write((frame << 12) + 8 * 9, struct.pack("<HHI", 1, 0, 0x1234))   # grant ref 9
    assert op(MemOp.decrease_reservation, [frame]) == 1
    assert gnttab.frame_gfn(0) == INVALID_GFN and not res.is_populated(frame)
    assert bytes(gnttab.frames[0].buf[72:80]) == struct.pack("<HHI", 1, 0, 0x1234)
