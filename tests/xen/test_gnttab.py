"""Grant tables v1/v2: hypercalls through the real dispatcher, frames in GuestMemory, the backend API.

The guest side is simulated: a fake vCPU whose page tables are the identity,
so hypercall structs and grant entries are written straight into GuestMemory
at the gpa the guest would use.
"""
from __future__ import annotations

import json
import logging
import random
import struct

import pytest

from xenkvm.machine.memory import GuestMemory
from xenkvm.xen import gnttab as gt
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.gnttab import ops as gops
from xenkvm.xen.gnttab.frames import Frame
from xenkvm.xen.abi import DOMID_SELF, Errno, GnttabOp, Gntst, Hypercall, XenStruct, ffi, handle_offset, lib
from xenkvm.xen.gnttab import GrantError
from xenkvm.xen.limits import Limits
from evtchnfakes import FakeDomain as SharedFakeDomain

DOMID = 1
RAM = 64 << 20
SCRATCH = 0x10000          #: hypercall structs
LIST = 0x20000             #: frame lists
F0 = 0x3000                #: gpfn where the guest maps grant frame 0 (in RAM)
HOLE = 0xF0000             #: a gpfn in the MMIO hole (outside RAM)
DATA = 0x2000              #: gpfn of a page the guest grants
DATA2 = 0x2001
PERMIT, RO, READING, WRITING = lib.GTF_permit_access, lib.GTF_readonly, lib.GTF_reading, lib.GTF_writing
SUB, TRANS = lib.GTF_sub_page, lib.GTF_transitive
MASK64 = (1 << 64) - 1


class FakeVcpu:
    id = 0

    def translate(self, gva: int):
        return gva if gva < 1 << 40 else None


_DOMAINS: list[SharedFakeDomain] = []


def FakeDomain(mem: GuestMemory | None = None, params: dict | None = None,
               limits: Limits | None = None) -> SharedFakeDomain:  # noqa: N802
    """The shared fake domain (evtchnfakes) with one vCPU and the real grant table."""
    d = SharedFakeDomain(nvcpus=1, ram=RAM, mem=mem, params=params, gnttab=True, limits=limits)
    _DOMAINS.append(d)
    return d


@pytest.fixture(autouse=True)
def close_domains():
    yield
    while _DOMAINS:
        _DOMAINS.pop().close()


@pytest.fixture(autouse=True)
def no_vmm_bugs(caplog):
    """Every hypercall must end in a result, never in a VMM exception (logged, then -EINVAL)."""
    caplog.set_level(logging.DEBUG, logger="xenkvm")
    yield
    bugs = [r for r in caplog.records if "inside the VMM" in r.getMessage()]
    assert not bugs, bugs[0].getMessage()


@pytest.fixture
def dom():
    return FakeDomain()


def hc(d: FakeDomain, cmd: int, gva: int = SCRATCH, count: int = 1) -> int:
    r = d.dispatcher.dispatch(FakeVcpu(), Hypercall.grant_table_op, (cmd, gva, count, 0, 0, 0))
    return r - (1 << 64) if r >> 63 else r


def put(d: FakeDomain, ctype: str, gpa: int = SCRATCH, **fields) -> XenStruct:
    st = XenStruct(ctype)
    obj = ffi.new(f"{ctype} *")
    for k, v in fields.items():
        setattr(obj, k, v)
    d.mem.write(gpa, st.to_bytes(obj))
    return st


def get(d: FakeDomain, ctype: str, gpa: int = SCRATCH):
    st = XenStruct(ctype)
    return st.from_bytes(d.mem.read(gpa, st.size))


def query(d: FakeDomain, dom: int = DOMID_SELF):
    put(d, "struct gnttab_query_size", dom=dom)
    assert hc(d, GnttabOp.query_size) == 0
    return get(d, "struct gnttab_query_size")


def set_version(d: FakeDomain, version: int) -> tuple[int, int]:
    put(d, "struct gnttab_set_version", version=version)
    r = hc(d, GnttabOp.set_version)
    return r, get(d, "struct gnttab_set_version").version


def get_version(d: FakeDomain, dom: int = DOMID_SELF) -> tuple[int, int]:
    put(d, "struct gnttab_get_version", dom=dom)
    r = hc(d, GnttabOp.get_version)
    return r, get(d, "struct gnttab_get_version").version


def frame_list(d: FakeDomain, op: str, nr: int, dom: int = DOMID_SELF, lst: int = LIST):
    ctype = {"setup": "struct gnttab_setup_table", "status": "struct gnttab_get_status_frames"}[op]
    st = put(d, ctype, dom=dom, nr_frames=nr)
    handle = gt.SETUP_LIST if op == "setup" else gt.STATUS_LIST
    d.mem.write_u64(SCRATCH + handle, lst)
    d.mem.write(LIST, b"\xaa" * 8 * 8)
    r = hc(d, GnttabOp.setup_table if op == "setup" else GnttabOp.get_status_frames)
    status = struct.unpack_from("<h", d.mem.read(SCRATCH + st.offset("status"), 2))[0]
    frames = [d.mem.read_u64(LIST + 8 * i) for i in range(min(nr, 8))]
    return r, status, frames


# -- guest-side entry writers (the guest's own view of frame 0 at F0) -------------------
def v1(d, ref, flags, domid=0, frame=DATA, base=F0):
    d.mem.pack(struct.Struct("<HHI"), (base << 12) + ref % 512 * 8, flags, domid, frame)


def v1_flags(d, ref, base=F0) -> int:
    return d.mem.unpack(struct.Struct("<H"), (base << 12) + ref % 512 * 8)[0]


def v2_full(d, ref, flags, domid=0, frame=DATA, base=F0):
    gpa = (base << 12) + ref % 256 * 16
    d.mem.write(gpa, struct.pack("<HHIQ", flags, domid, 0, frame))


def v2_sub(d, ref, flags, domid, frame, page_off, length, base=F0):
    d.mem.write((base << 12) + ref % 256 * 16, struct.pack("<HHHHQ", flags | SUB, domid, page_off, length, frame))


def v2_trans(d, ref, flags, domid, trans_domid, gref, base=F0):
    d.mem.write((base << 12) + ref % 256 * 16, struct.pack("<HHHHI4x", flags | TRANS, domid, trans_domid, 0, gref))


def v2_status(d, ref) -> int:
    return d.gnttab.entry(ref)["status"]


def mapped(d: FakeDomain, version: int = 1) -> FakeDomain:
    if version == 2:
        assert set_version(d, 2) == (0, 2)
    d.gnttab.map_frame(0, F0)
    return d


# -- sizes and versions ---------------------------------------------------------------
def test_query_size_and_domains(dom):
    q = query(dom)
    assert (q.nr_frames, q.max_nr_frames, q.status) == (1, 64, Gntst.okay)
    q = query(dom, DOMID)
    assert q.status == Gntst.okay
    assert query(dom, 7).status == Gntst.bad_domain
    assert query(dom, 0).status == Gntst.permission_denied
    assert hc(dom, GnttabOp.query_size, count=2) == -Errno.EINVAL
    assert hc(dom, GnttabOp.query_size, count=0) == -Errno.EINVAL
    assert hc(dom, GnttabOp.query_size, gva=RAM - 4) == -Errno.EFAULT
    assert hc(dom, GnttabOp.query_size, gva=1 << 45) == -Errno.EFAULT


def test_versions(dom):
    assert get_version(dom) == (0, 1)
    assert set_version(dom, 1) == (0, 1)
    assert set_version(dom, 3) == (-Errno.EINVAL, 1)
    assert set_version(dom, 0) == (-Errno.EINVAL, 1)
    assert set_version(dom, 2) == (0, 2)
    assert get_version(dom) == (0, 2)
    assert get_version(dom, 9)[0] == -Errno.ESRCH
    assert get_version(dom, 0)[0] == -Errno.EPERM
    assert set_version(dom, 1) == (0, 1)
    assert hc(dom, GnttabOp.set_version, count=2) == -Errno.EINVAL


def test_v2_disabled_gives_enosys():
    d = FakeDomain()
    d.gnttab.max_version = 1
    assert set_version(d, 2) == (-Errno.ENOSYS, 1)


def test_unimplemented_subops_and_opaque_bits(dom):
    assert hc(dom, GnttabOp.transfer) == -Errno.ENOSYS
    assert hc(dom, GnttabOp.swap_grant_ref) == -Errno.ENOSYS
    assert hc(dom, 1 << 20 | GnttabOp.query_size) == -Errno.ENOSYS


# -- frames in the physmap ----------------------------------------------------------------
def test_map_frame_in_ram_keeps_content_and_is_live():
    d = FakeDomain(params={lib.HVM_PARAM_STORE_PFN: 0xFEB00, lib.HVM_PARAM_CONSOLE_PFN: 0xFEB01})
    # The toolstack-reserved entries are there before the guest maps the frame.
    assert d.gnttab.entry(1) == {"flags": PERMIT, "domid": 0, "frame": 0xFEB00}
    assert d.gnttab.entry(0)["frame"] == 0xFEB01
    d.mem.write(F0 << 12, b"\x55" * 4096)
    d.gnttab.map_frame(0, F0)
    assert struct.unpack_from("<HHI", d.mem.read((F0 << 12) + 8, 8)) == (PERMIT, 0, 0xFEB00)
    assert d.mem.read((F0 << 12) + 64, 8) == bytes(8)     # the RAM page now holds the frame
    v1(d, 9, PERMIT, 0, DATA)                               # a guest write is the table
    assert d.gnttab.entry(9) == {"flags": PERMIT, "domid": 0, "frame": DATA}


def test_map_frame_outside_ram_adds_a_region(dom):
    dom.gnttab.map_frame(0, HOLE)
    assert dom.mem.contains(HOLE << 12, 4096)
    region = [r for r in dom.mem.regions if r.gpa == HOLE << 12][0]
    assert not region.ram and region.name.startswith("grant")
    v1(dom, 12, PERMIT, 0, DATA, base=HOLE)
    assert dom.gnttab.entry(12)["frame"] == DATA
    # Highest index first, as Linux does on expand: the table grows to it at once.
    dom.gnttab.map_frame(3, HOLE + 3)
    assert query(dom).nr_frames == 4
    dom.gnttab.map_frame(2, HOLE + 2)
    assert query(dom).nr_frames == 4


def test_remap_moves_content(dom):
    dom.gnttab.map_frame(0, HOLE)
    v1(dom, 10, PERMIT, 0, DATA, base=HOLE)
    dom.gnttab.map_frame(0, F0)                      # hole -> RAM
    assert dom.gnttab.entry(10)["frame"] == DATA
    assert struct.unpack_from("<HHI", dom.mem.read((F0 << 12) + 80, 8)) == (PERMIT, 0, DATA)
    v1(dom, 11, PERMIT, 0, DATA2, base=F0)
    dom.gnttab.map_frame(0, HOLE)                    # back into the (reused) hole page
    assert dom.gnttab.entry(11)["frame"] == DATA2
    assert len([r for r in dom.mem.regions if r.gpa == HOLE << 12]) == 1
    v1(dom, 11, 0, base=F0)                          # the old page is no longer the table
    assert dom.gnttab.entry(11)["flags"] == PERMIT
    dom.gnttab.map_frame(0, HOLE)                    # same place again: nothing changes
    assert dom.gnttab.entry(11)["frame"] == DATA2


def test_map_frame_over_another_frame_unmaps_it(dom):
    dom.gnttab.map_frame(0, F0)
    dom.gnttab.map_frame(1, F0 + 1)
    v1(dom, 512 + 5, PERMIT, 0, DATA2, base=F0 + 1)       # ref 517 lives in frame 1
    dom.gnttab.map_frame(0, F0 + 1)                        # frame 0 replaces frame 1 there
    assert dom.gnttab.frame_gfn(1) == gt.INVALID_GFN
    assert dom.gnttab.frame_gfn(0) == F0 + 1
    assert dom.gnttab.entry(517)["frame"] == DATA2         # frame 1 kept its content in the VMM
    dom.gnttab.map_frame(1, F0 + 7)
    assert struct.unpack_from("<HHI", dom.mem.read(((F0 + 7) << 12) + 40, 8)) == (PERMIT, 0, DATA2)


def test_map_frame_refusals(dom):
    for idx in (64, 1 << 31, 1 << 63, gt.STATUS_IDX):   # status frames need v2
        with pytest.raises(HypercallError) as e:
            dom.gnttab.map_frame(idx, F0)
        assert e.value.errno == Errno.EINVAL
    dom.mem.add_region(0xFEB00000, 4096, "xen-special-pages")
    for gpfn in (0xFEB00, -1, 1 << 60, 0xFEE00):          # someone else's region; nonsense; LAPIC
        with pytest.raises(HypercallError):
            dom.gnttab.map_frame(0, gpfn)
    assert query(dom).nr_frames == 1
    dom.gnttab.map_frame(63, HOLE + 63)
    assert query(dom).nr_frames == 64


def test_setup_table(dom):
    dom.gnttab.map_frame(1, F0 + 1)
    r, status, frames = frame_list(dom, "setup", 3)
    assert (r, status) == (0, Gntst.okay)
    assert frames == [gt.INVALID_GFN, F0 + 1, gt.INVALID_GFN]
    assert query(dom).nr_frames == 3
    assert frame_list(dom, "setup", 65)[:2] == (0, Gntst.general_error)
    assert frame_list(dom, "setup", 1, dom=5)[:2] == (0, Gntst.bad_domain)
    assert frame_list(dom, "setup", 2, lst=RAM - 8)[:2] == (0, Gntst.bad_virt_addr)
    assert frame_list(dom, "setup", 0)[:2] == (0, Gntst.okay)
    assert hc(dom, GnttabOp.setup_table, count=2) == -Errno.EINVAL
    assert hc(dom, GnttabOp.setup_table, gva=1 << 41) == -Errno.EFAULT


# -- version 2 -------------------------------------------------------------------------
def test_v2_status_frames(dom):
    assert frame_list(dom, "status", 1)[:2] == (0, Gntst.general_error)   # v1 has none
    assert frame_list(dom, "status", 0)[:2] == (0, Gntst.okay)
    assert set_version(dom, 2) == (0, 2)
    assert frame_list(dom, "status", 1) == (0, Gntst.okay, [gt.INVALID_GFN])
    assert frame_list(dom, "status", 2)[1] == Gntst.general_error
    dom.gnttab.map_frame(0 | gt.STATUS_IDX, HOLE + 100)
    dom.gnttab.map_frame(0, F0)
    assert frame_list(dom, "status", 1) == (0, Gntst.okay, [HOLE + 100])
    # Status frame 1 covers refs 2048..4095: frames up to 16 exist then.
    dom.gnttab.map_frame(1 | gt.STATUS_IDX, F0 + 50)
    assert query(dom).nr_frames == 16
    assert frame_list(dom, "status", 2) == (0, Gntst.okay, [HOLE + 100, F0 + 50])
    with pytest.raises(HypercallError):
        dom.gnttab.map_frame(8 | gt.STATUS_IDX, F0 + 51)      # 64 frames need 8 status frames
    # The status word of an entry is what the guest reads at the status frame.
    v2_full(dom, 20, PERMIT, 0, DATA)
    with dom.gnttab.map(DOMID, 20, True):
        assert dom.mem.read_u32(HOLE + 100 << 12 | 40) & 0xFFFF == READING | WRITING
        assert dom.gnttab.entry(20)["flags"] == PERMIT        # not in the header in v2
    assert dom.mem.read_u32(HOLE + 100 << 12 | 40) == 0
    # Back to v1: status frames leave the guest.
    assert set_version(dom, 1) == (0, 1)
    assert frame_list(dom, "status", 0)[:2] == (0, Gntst.okay)
    with pytest.raises(HypercallError):
        dom.gnttab.map_frame(0 | gt.STATUS_IDX, HOLE + 100)


def test_set_version_clears_all_but_reserved(dom):
    mapped(dom)
    v1(dom, 1, PERMIT | RO, 0, DATA2)
    v1(dom, 7, PERMIT, 3, 0x1234)
    v1(dom, 9, PERMIT, 0, DATA)
    with dom.gnttab.map(DOMID, 1, False):
        assert set_version(dom, 2) == (0, 2)                 # reserved refs may stay pinned
        e = dom.gnttab.entry(1)
        assert (e["flags"], e["domid"], e["frame"], e["status"]) == (PERMIT | RO, 0, DATA2, READING)
    assert v2_status(dom, 1) == 0                            # unpin cleared the v2 status word
    assert dom.gnttab.entry(7)["frame"] == 0x1234
    assert dom.gnttab.entry(9)["flags"] == 0                 # ordinary grants are gone
    assert dom.mem.read((F0 << 12) + 8 * 16, 4096 - 8 * 16) == bytes(4096 - 8 * 16)
    v2_full(dom, 9, PERMIT, 0, DATA)
    assert set_version(dom, 1) == (0, 1)
    assert dom.gnttab.entry(1) == {"flags": PERMIT | RO, "domid": 0, "frame": DATA2}
    assert dom.gnttab.entry(9)["flags"] == 0


def test_set_version_busy_and_erange(dom):
    mapped(dom)
    v1(dom, 10, PERMIT, 0, DATA)
    m = dom.gnttab.map(DOMID, 10, True)
    assert set_version(dom, 2) == (-Errno.EBUSY, 1)
    m.unmap()
    assert set_version(dom, 2) == (0, 2)
    v2_full(dom, 3, PERMIT, 0, 1 << 33)                      # v1 frames are 32-bit
    assert set_version(dom, 1) == (-Errno.ERANGE, 2)
    v2_trans(dom, 3, 0, 0, DOMID, 9)
    assert set_version(dom, 1) == (-Errno.ERANGE, 2)
    v2_full(dom, 3, 0)
    assert set_version(dom, 1) == (0, 1)


# -- backend API: v1 -----------------------------------------------------------------
def test_backend_copy_v1(dom):
    mapped(dom)
    dom.mem.write(DATA << 12, bytes(range(256)) * 16)
    v1(dom, 10, PERMIT, 0, DATA)
    t = dom.gnttab
    assert t.copy_from(DOMID, 10, 0, 4096) == bytes(range(256)) * 16
    assert t.copy_from(DOMID, 10, 4000, 96) == (bytes(range(256)) * 16)[4000:]
    t.copy_to(DOMID, 10, 100, b"hello")
    assert dom.mem.read((DATA << 12) + 100, 5) == b"hello"
    t.copy_to(DOMID, 10, 0, bytearray(4096))
    assert v1_flags(dom, 10) == PERMIT                        # reading/writing cleared after
    assert t.pinned == {}
    assert t.copy_from(DOMID, 10, 4096, 0) == b""


@pytest.mark.parametrize("setup, call, status", [
    (lambda d: None, lambda t: t.copy_from(DOMID, 10, 0, 8), Gntst.general_error),            # invalid entry
    (lambda d: v1(d, 10, PERMIT, 5), lambda t: t.copy_from(DOMID, 10, 0, 8), Gntst.general_error),  # other domid
    (lambda d: v1(d, 10, PERMIT | RO), lambda t: t.copy_to(DOMID, 10, 0, b"x"), Gntst.general_error),
    (lambda d: v1(d, 10, lib.GTF_accept_transfer), lambda t: t.copy_from(DOMID, 10, 0, 8), Gntst.general_error),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(DOMID, 512, 0, 8), Gntst.bad_gntref),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(DOMID, -1, 0, 8), Gntst.bad_gntref),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(DOMID, 1 << 40, 0, 8), Gntst.bad_gntref),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(7, 10, 0, 8), Gntst.bad_domain),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(DOMID, 10, 4090, 8), Gntst.bad_copy_arg),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_from(DOMID, 10, -1, 8), Gntst.bad_copy_arg),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.copy_to(DOMID, 10, 1, bytes(4096)), Gntst.bad_copy_arg),
    (lambda d: v1(d, 10, PERMIT, 0, 0xFEE00), lambda t: t.copy_from(DOMID, 10, 0, 8), Gntst.bad_page),
    (lambda d: v1(d, 10, PERMIT, 0, 0xFFFFFFFF), lambda t: t.copy_to(DOMID, 10, 0, b"x"), Gntst.bad_page),
    (lambda d: v1(d, 10, PERMIT | RO), lambda t: t.map(DOMID, 10, True), Gntst.general_error),
    (lambda d: v1(d, 10, PERMIT), lambda t: t.map(DOMID, 10, True, backend=3), Gntst.general_error),
])
def test_backend_refusals_v1(dom, setup, call, status):
    mapped(dom)
    setup(dom)
    before = v1_flags(dom, 10)
    with pytest.raises(GrantError) as e:
        call(dom.gnttab)
    assert e.value.status == status
    assert v1_flags(dom, 10) == before                       # no flag left behind
    assert dom.gnttab.pinned == {}


def test_backend_map_flags_v1(dom):
    mapped(dom)
    v1(dom, 10, PERMIT, 0, DATA)
    t = dom.gnttab
    w = t.map(DOMID, 10, True)
    assert v1_flags(dom, 10) == PERMIT | READING | WRITING
    w.view[0:4] = b"abcd"
    assert dom.mem.read(DATA << 12, 4) == b"abcd"
    r = t.map(DOMID, 10, False)
    with pytest.raises(TypeError):
        r.view[0] = 1
    assert bytes(r.view[:4]) == b"abcd"
    w.unmap()
    assert v1_flags(dom, 10) == PERMIT | READING              # a reader remains
    w.unmap()                                                 # double unmap is harmless
    assert v1_flags(dom, 10) == PERMIT | READING
    assert t.pinned == {10: (1, 0)}
    with r:
        pass
    assert v1_flags(dom, 10) == PERMIT
    assert not r.mapped and t.pinned == {}
    with pytest.raises(ValueError):
        r.view[0]                                             # the view is released


def test_pinned_entry_uses_the_pinned_frame(dom):
    """As Xen's active entries: while pinned, the entry is not re-validated or re-read."""
    mapped(dom)
    v1(dom, 10, PERMIT, 0, DATA)
    with dom.gnttab.map(DOMID, 10, False) as m:
        dom.mem.pack(struct.Struct("<HHI"), (F0 << 12) + 80, PERMIT | READING, 0, DATA2)
        with dom.gnttab.map(DOMID, 10, False) as m2:
            assert m2.gfn == DATA == m.gfn
        # A revoked (invalid) entry still pinned: a further read pin is allowed, a write pin is not if RO.
        dom.mem.pack(struct.Struct("<H"), (F0 << 12) + 80, RO | READING)
        assert dom.gnttab.copy_from(DOMID, 10, 0, 4) == bytes(4)
        with pytest.raises(GrantError):
            dom.gnttab.copy_to(DOMID, 10, 0, b"x")
    assert v1_flags(dom, 10) == RO


def test_unstable_entry_gives_up(dom, monkeypatch):
    mapped(dom)
    v1(dom, 10, PERMIT, 0, DATA)
    calls = []

    def flipping(frame, off, expected, desired):
        calls.append(1)
        return False, expected ^ 0x8000       # the guest keeps changing an unrelated bit
    monkeypatch.setattr(Frame, "cmpxchg32", flipping)
    with pytest.raises(GrantError) as e:
        dom.gnttab.copy_from(DOMID, 10, 0, 4)
    assert e.value.status == Gntst.general_error and len(calls) == 5


def test_map_refs_all_or_nothing(dom):
    mapped(dom)
    v1(dom, 10, PERMIT, 0, DATA)
    v1(dom, 11, PERMIT | RO, 0, DATA2)
    with pytest.raises(GrantError):
        dom.gnttab.map_refs(DOMID, [10, 11], True)
    assert dom.gnttab.pinned == {} and v1_flags(dom, 10) == PERMIT
    ms = dom.gnttab.map_refs(DOMID, [10, 11], False)
    assert [m.gfn for m in ms] == [DATA, DATA2]
    for m in ms:
        m.unmap()


# -- backend API: v2 -----------------------------------------------------------------
def test_backend_v2_full_and_sub_page(dom):
    mapped(dom, 2)
    t = dom.gnttab
    dom.mem.write(DATA << 12, bytes(range(256)) * 16)
    v2_full(dom, 10, PERMIT, 0, DATA)
    assert t.copy_from(DOMID, 10, 8, 8) == bytes(range(8, 16))
    t.copy_to(DOMID, 10, 0, b"zz")
    assert v2_status(dom, 10) == 0
    with pytest.raises(GrantError) as e:
        t.copy_from(DOMID, 256, 0, 1)                        # one frame of v2 = 256 entries
    assert e.value.status == Gntst.bad_gntref
    v2_sub(dom, 11, PERMIT, 0, DATA, 1024, 512)
    assert t.copy_from(DOMID, 11, 1024, 512) == (bytes(range(256)) * 16)[1024:1536]
    t.copy_to(DOMID, 11, 1100, b"sub")
    for off, n in ((1023, 1), (1535, 2), (0, 4096), (2000, 1)):
        with pytest.raises(GrantError) as e:
            t.copy_from(DOMID, 11, off, n)
        assert e.value.status == Gntst.general_error
    with pytest.raises(GrantError) as e:
        t.map(DOMID, 11, False)                              # sub-page grants cannot be mapped
    assert e.value.status == Gntst.general_error
    assert v2_status(dom, 11) == 0 and t.pinned == {}
    v2_full(dom, 12, PERMIT | RO, 0, DATA2)
    with pytest.raises(GrantError):
        t.copy_to(DOMID, 12, 0, b"x")
    assert v2_status(dom, 12) == 0
    with t.map(DOMID, 12, False) as m:
        assert v2_status(dom, 12) == READING and m.gfn == DATA2
        # The odd neighbour shares the status word: untouched.
        assert v2_status(dom, 13) == 0
        with t.map(DOMID, 10, True):
            assert v2_status(dom, 10) == READING | WRITING
        assert v2_status(dom, 10) == 0
    assert v2_status(dom, 12) == 0


def test_backend_v2_transitive(dom):
    mapped(dom, 2)
    t = dom.gnttab
    dom.mem.write(DATA << 12, b"T" * 4096)
    v2_sub(dom, 20, PERMIT, DOMID, DATA, 256, 256)          # granted to the guest itself...
    v2_trans(dom, 21, 0, 0, DOMID, 20)                       # ...and passed on to the backend
    assert t.copy_from(DOMID, 21, 256, 16) == b"T" * 16
    with pytest.raises(GrantError):
        t.copy_from(DOMID, 21, 0, 16)                        # the inner sub-page bounds hold
    with pytest.raises(GrantError):
        t.map(DOMID, 21, False)                              # never mapped
    v2_trans(dom, 22, 0, 0, DOMID, 21)                       # nested: refused
    v2_trans(dom, 23, 0, 0, 5, 20)                           # another domain: refused
    v2_trans(dom, 24, 0, 0, DOMID, 9999)                     # bad inner ref
    for ref, status in ((22, Gntst.general_error), (23, Gntst.general_error), (24, Gntst.bad_gntref)):
        with pytest.raises(GrantError) as e:
            t.copy_from(DOMID, ref, 256, 1)
        assert e.value.status == status
    assert all(v2_status(dom, r) == 0 for r in (20, 21, 22, 23, 24))
    v2_trans(dom, 25, RO, 0, DOMID, 20)                      # the outer read-only flag holds
    with pytest.raises(GrantError):
        t.copy_to(DOMID, 25, 256, b"x")
    t.copy_to(DOMID, 21, 300, b"ok")
    assert dom.mem.read((DATA << 12) + 300, 2) == b"ok"
    assert t.pinned == {}


# -- guest-side copy, map, unmap -------------------------------------------------------
def copy_op(src, dst, length, flags=0):
    """One struct gnttab_copy as bytes; src/dst are (ref_or_gmfn, domid, offset)."""
    raw = bytearray(gops.COPY.size)
    for base, (u, domid, off) in ((gops.COPY_SRC, src), (gops.COPY_DST, dst)):
        struct.pack_into("<Q", raw, base + lib.XK_OFF_gnttab_copy_ptr__u, u)
        struct.pack_into("<HH", raw, base + lib.XK_OFF_gnttab_copy_ptr__domid, domid, off)
    struct.pack_into("<HHh", raw, gops.COPY.offset("len"), length, flags, 0x7777)
    return bytes(raw)


def run_copies(d, ops, gva=SCRATCH) -> tuple[int, list[int]]:
    d.mem.write(gva, b"".join(ops))
    r = hc(d, GnttabOp.copy, gva, len(ops))
    return r, [struct.unpack_from("<h", d.mem.read(gva + i * gops.COPY.size + gops.COPY.offset("status"), 2))[0]
               for i in range(len(ops))]


def test_guest_copy(dom):
    mapped(dom)
    S, G = lib.GNTCOPY_source_gref, lib.GNTCOPY_dest_gref
    dom.mem.write(DATA << 12, b"A" * 4096)
    dom.mem.write(DATA2 << 12, b"B" * 4096)
    v1(dom, 10, PERMIT, DOMID, DATA)                 # the guest grants to itself
    v1(dom, 11, PERMIT | RO, DOMID, DATA2)
    v1(dom, 12, PERMIT, 0, DATA2)                    # granted to dom0, not to the guest
    ops = [
        copy_op((10, DOMID_SELF, 0), (DATA2, DOMID_SELF, 8), 4, S),          # gref -> gmfn
        copy_op((DATA2, DOMID_SELF, 0), (10, DOMID, 100), 2, G),             # gmfn -> gref (own id)
        copy_op((11, DOMID_SELF, 0), (10, DOMID_SELF, 200), 3, S | G),       # gref -> gref
        copy_op((10, DOMID_SELF, 0), (11, DOMID_SELF, 0), 1, S | G),         # read-only dest
        copy_op((12, DOMID_SELF, 0), (DATA, DOMID_SELF, 0), 1, S),           # not granted to us
        copy_op((DATA, 0, 0), (DATA2, DOMID_SELF, 0), 1),                    # gmfn of another domain
        copy_op((10, 4, 0), (DATA2, DOMID_SELF, 0), 1, S),                   # unknown domain
        copy_op((10, DOMID_SELF, 4000), (DATA2, DOMID_SELF, 0), 100, S),     # crosses the page
        copy_op((DATA, DOMID_SELF, 0), (DATA2, DOMID_SELF, 4095), 2),
        copy_op((600, DOMID_SELF, 0), (DATA2, DOMID_SELF, 0), 1, S),         # bad ref
        copy_op((0xFEE00, DOMID_SELF, 0), (DATA2, DOMID_SELF, 0), 1),        # not memory
        copy_op((DATA, DOMID_SELF, 0), (DATA2, DOMID_SELF, 0), 0xFFFF),
        copy_op((DATA, DOMID_SELF, 0), (DATA2, DOMID_SELF, 0), 0),
    ]
    r, statuses = run_copies(dom, ops)
    assert r == 0
    assert statuses == [Gntst.okay, Gntst.okay, Gntst.okay, Gntst.general_error, Gntst.general_error,
                        Gntst.permission_denied, Gntst.bad_domain, Gntst.bad_copy_arg, Gntst.bad_copy_arg,
                        Gntst.bad_gntref, Gntst.bad_page, Gntst.bad_copy_arg, Gntst.okay]
    assert dom.mem.read((DATA2 << 12) + 8, 4) == b"AAAA"
    assert dom.mem.read((DATA << 12) + 100, 2) == b"BB"
    assert dom.mem.read((DATA << 12) + 200, 3) == b"BBB"
    assert v1_flags(dom, 10) == PERMIT and v1_flags(dom, 11) == PERMIT | RO
    assert dom.gnttab.pinned == {}


def test_guest_copy_v2_sub_page(dom):
    mapped(dom, 2)
    S = lib.GNTCOPY_source_gref
    dom.mem.write(DATA << 12, bytes(range(256)) * 16)
    v2_sub(dom, 10, PERMIT, DOMID, DATA, 16, 16)
    r, st = run_copies(dom, [copy_op((10, DOMID_SELF, 16), (DATA2, DOMID_SELF, 0), 16, S),
                             copy_op((10, DOMID_SELF, 15), (DATA2, DOMID_SELF, 0), 16, S)])
    assert (r, st) == (0, [Gntst.okay, Gntst.general_error])
    assert dom.mem.read(DATA2 << 12, 16) == bytes(range(16, 32))


def test_guest_copy_hostile_batches(dom):
    mapped(dom)
    assert hc(dom, GnttabOp.copy, SCRATCH, 0) == 0
    assert hc(dom, GnttabOp.copy, SCRATCH, 0xFFFFFFFF) == -Errno.EINVAL
    assert hc(dom, GnttabOp.copy, SCRATCH, 1 << 31) == -Errno.EINVAL
    assert hc(dom, GnttabOp.copy, SCRATCH, gops.MAX_BATCH + 1) == -Errno.EINVAL
    assert hc(dom, GnttabOp.copy, 1 << 42, 1) == -Errno.EFAULT
    # A batch running off the end of RAM: the ops before the fault are done, then -EFAULT.
    dom.mem.write(DATA << 12, b"Q" * 8)
    op = copy_op((DATA, DOMID_SELF, 0), (DATA2, DOMID_SELF, 0), 8)
    dom.mem.write(RAM - gops.COPY.size, op)
    assert hc(dom, GnttabOp.copy, RAM - gops.COPY.size, 2) == -Errno.EFAULT
    assert dom.mem.read(DATA2 << 12, 8) == b"Q" * 8
    assert struct.unpack_from("<h", dom.mem.read(RAM - gops.COPY.size + gops.COPY.offset("status"), 2))[0] == 0


def test_guest_map_and_unmap(dom):
    mapped(dom)
    v1(dom, 10, PERMIT, DOMID, DATA)
    HOST, DEV = lib.GNTMAP_host_map, lib.GNTMAP_device_map
    st = XenStruct("struct gnttab_map_grant_ref")
    cases = [(0, DOMID, 10, Gntst.bad_gntref), (HOST | DEV, DOMID, 10, Gntst.general_error),
             (HOST, 9, 10, Gntst.bad_domain), (HOST, DOMID_SELF, 10, Gntst.bad_domain),
             (HOST, DOMID, 1 << 20, Gntst.bad_gntref), (HOST, DOMID, 10, Gntst.general_error)]
    for i, (flags, domid, ref, _) in enumerate(cases):
        put(dom, "struct gnttab_map_grant_ref", SCRATCH + i * st.size, flags=flags, dom=domid, ref=ref,
            host_addr=0x5000 << 12, handle=0x1234)
    assert hc(dom, GnttabOp.map_grant_ref, SCRATCH, len(cases)) == 0
    for i, (*_, status) in enumerate(cases):
        op = get(dom, "struct gnttab_map_grant_ref", SCRATCH + i * st.size)
        assert op.status == status and op.handle == 0x1234
    assert v1_flags(dom, 10) == PERMIT
    put(dom, "struct gnttab_unmap_grant_ref", handle=0)
    assert hc(dom, GnttabOp.unmap_grant_ref) == 0
    assert get(dom, "struct gnttab_unmap_grant_ref").status == Gntst.bad_handle
    assert hc(dom, GnttabOp.map_grant_ref, SCRATCH, -1 & MASK64) == -Errno.EINVAL
    assert hc(dom, GnttabOp.unmap_grant_ref, 1 << 44, 1) == -Errno.EFAULT


def test_random_ops_never_break_the_vmm(dom):
    """Random bytes as every op's struct: a result for the guest, never a VMM exception."""
    mapped(dom)
    rng = random.Random(1234)
    ops = [GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.set_version, GnttabOp.get_version,
           GnttabOp.get_status_frames, GnttabOp.copy, GnttabOp.map_grant_ref, GnttabOp.unmap_grant_ref]
    for i in range(600):
        dom.mem.write(SCRATCH, rng.randbytes(64 * 40))
        for k in range(0, 512):        # random grant entries too, some granted to dom0 / self
            if rng.random() < 0.1:
                v1(dom, k, rng.choice([PERMIT, PERMIT | RO, SUB | PERMIT, TRANS, 0]),
                   rng.choice([0, DOMID, 7]), rng.choice([DATA, DATA2, 0xFEE00, 0xFFFFFFFF]))
        if rng.random() < 0.3:         # a frame list somewhere, maybe nowhere
            dom.mem.write_u64(SCRATCH + gt.SETUP_LIST, rng.choice([LIST, RAM - 8, 1 << 50]))
        r = hc(dom, rng.choice(ops), SCRATCH, rng.choice([0, 1, 1, 1, 2, 7, 64]))
        assert r in (0, -Errno.EINVAL, -Errno.EFAULT, -Errno.ENOSYS, -Errno.EBUSY, -Errno.ERANGE,
                     -Errno.ESRCH, -Errno.EPERM)
        if rng.random() < 0.2:
            try:
                with dom.gnttab.map(DOMID, rng.randrange(600), rng.random() < 0.5):
                    pass
            except GrantError:
                pass
    assert dom.gnttab.pinned == {}


# -- save / restore ------------------------------------------------------------------
def test_state_round_trip():
    d = mapped(FakeDomain(), 2)
    d.gnttab.map_frame(1, HOLE + 1)
    d.gnttab.map_frame(0 | gt.STATUS_IDX, HOLE + 10)
    v2_full(d, 10, PERMIT, 0, DATA)
    v2_full(d, 256 + 3, PERMIT | RO, 0, DATA2, base=HOLE + 1)
    assert frame_list(d, "setup", 3)[:2] == (0, Gntst.okay)
    d.gnttab.seed(2 * 256 + 1, 0, 0x777)              # frame 2: not mapped, VMM memory only
    state = json.loads(json.dumps(d.gnttab.to_state()))
    assert state["version"] == 2 and state["frames"][:3] == [F0, HOLE + 1, None]

    mem2 = GuestMemory(RAM)
    mem2.write(0, d.mem.read(0, RAM))                 # guest RAM travels separately
    d2 = FakeDomain(mem2)
    d2.gnttab.from_state(state)
    assert get_version(d2) == (0, 2)
    assert query(d2).nr_frames == d.gnttab.nr_frames
    assert d2.gnttab.entry(10)["frame"] == DATA
    assert d2.gnttab.entry(259)["flags"] == PERMIT | RO and mem2.contains((HOLE + 1) << 12)
    assert d2.gnttab.entry(513)["frame"] == 0x777
    assert frame_list(d2, "status", 1) == (0, Gntst.okay, [HOLE + 10])
    v2_full(d2, 11, PERMIT, 0, DATA2)                 # the restored frames are live guest pages
    assert d2.gnttab.copy_from(DOMID, 11, 0, 4) == mem2.read(DATA2 << 12, 4)
    with d2.gnttab.map(DOMID, 10, True):
        assert v2_status(d2, 10) == READING | WRITING
        assert mem2.read_u32((HOLE + 10) << 12 | 20) & 0xFFFF == READING | WRITING


def test_v2_pinned_entries_and_races(dom, monkeypatch):
    mapped(dom, 2)
    t = dom.gnttab
    v2_full(dom, 10, PERMIT, 0, DATA)
    with t.map(DOMID, 10, False):
        v2_full(dom, 10, PERMIT | RO, 0, DATA)       # the guest makes it read-only while pinned
        with pytest.raises(GrantError):
            t.map(DOMID, 10, True)
        assert v2_status(dom, 10) == READING         # writing was not left behind
        with t.map(DOMID, 10, False) as m:           # a pinned entry is not re-validated
            assert m.gfn == DATA
    assert v2_status(dom, 10) == 0

    # The guest revokes the entry between the check and the status update: undone, refused.
    # (The status frame is in VMM memory here; the same with it mapped: test_gnttab_entries.)
    real = Frame.or32

    def racing(frame, off, bits):
        v2_full(dom, 11, 0, 0, DATA)
        return real(frame, off, bits)
    v2_full(dom, 11, PERMIT, 0, DATA)
    monkeypatch.setattr(Frame, "or32", racing)
    with pytest.raises(GrantError) as e:
        t.copy_from(DOMID, 11, 0, 4)
    monkeypatch.setattr(Frame, "or32", real)
    assert e.value.status == Gntst.general_error and v2_status(dom, 11) == 0 and t.pinned == {}


def test_v2_transitive_pinned_and_nested(dom):
    mapped(dom, 2)
    t = dom.gnttab
    v2_full(dom, 20, PERMIT, DOMID, DATA)
    v2_trans(dom, 21, 0, 0, DOMID, 20)
    v2_trans(dom, 26, 0, DOMID, DOMID, 20)           # transitive, granted to the guest itself
    v2_trans(dom, 27, 0, 0, DOMID, 26)               # ...so 27 -> 26 -> 20 is a nested chain
    with pytest.raises(GrantError) as e:
        t.copy_from(DOMID, 27, 0, 1)
    assert e.value.status == Gntst.general_error and t.pinned == {}
    with dom.lock:                                   # an access in flight on another thread
        t.pins.acquire(21, 0, True, False)
        assert t.pinned == {21: (1, 0), 20: (1, 0)}
        t.copy_to(DOMID, 21, 0, b"w")               # a second, writable, pin: inner pinned again
        assert t.pinned == {21: (1, 0), 20: (1, 0)}
        v2_full(dom, 20, PERMIT | RO, DOMID, DATA)   # inner turned read-only: writes refused
        with pytest.raises(GrantError):
            t.copy_to(DOMID, 21, 0, b"w")
        assert v2_status(dom, 21) == READING and v2_status(dom, 20) == READING
        t.pins.release(21, True)
    assert t.pinned == {} and v2_status(dom, 21) == 0 and v2_status(dom, 20) == 0
    assert dom.mem.read(DATA << 12, 1) == b"w"


def test_restore_reuses_recreated_hole_pages():
    d = FakeDomain()
    d.gnttab.map_frame(0, HOLE)
    v1(d, 9, PERMIT, 0, DATA, base=HOLE)
    state = d.gnttab.to_state()
    d2 = FakeDomain()
    region = d2.mem.add_region(HOLE << 12, 4096, "restored")   # the memory map came back first
    d2.gnttab.from_state(state)
    assert d2.gnttab.entry(9)["frame"] == DATA
    assert bytes(region.view[72:80]) == struct.pack("<HHI", PERMIT, 0, DATA)


def test_unmap_gpfn(dom):
    dom.gnttab.map_frame(0, F0)
    v1(dom, 9, PERMIT, 0, DATA)
    assert dom.gnttab.unmap_gpfn(F0) and not dom.gnttab.unmap_gpfn(F0)
    assert dom.gnttab.frame_gfn(0) == gt.INVALID_GFN
    v1(dom, 9, 0)                                    # no longer the table
    assert dom.gnttab.entry(9)["frame"] == DATA
    dom.gnttab.map_frame(0, F0 + 1)
    assert struct.unpack_from("<HHI", dom.mem.read(((F0 + 1) << 12) + 72, 8)) == (PERMIT, 0, DATA)


# == bounds: what a guest can make the VMM allocate ==================================================
def hole_regions(d: FakeDomain) -> list:
    return [r for r in d.mem.regions if not r.ram and r.name.startswith("grant")]


def physmap(d: FakeDomain, idx: int, gpfn: int) -> int:
    put(d, "struct xen_add_to_physmap", domid=DOMID_SELF, space=lib.XENMAPSPACE_grant_table, idx=idx, gpfn=gpfn)
    r = d.dispatcher.dispatch(FakeVcpu(), Hypercall.memory_op, (lib.XENMEM_add_to_physmap, SCRATCH, 0, 0, 0, 0))
    return r - (1 << 64) if r >> 63 else r


def test_moving_a_frame_releases_the_old_hole_page():
    """add_to_physmap of a grant frame onto a new gfn unmaps it from the old one (Xen): the
    memslot we added for the old gfn goes, so a guest walking a frame over many gfns holds one."""
    d = FakeDomain()
    d.mem.add_region = add_counter(d.mem.add_region)
    for i in range(300):
        assert physmap(d, 0, HOLE + i) == 0
        v1(d, 9, PERMIT, 0, DATA + i % 7, base=HOLE + i)
        assert len(hole_regions(d)) == 1 and not d.mem.contains((HOLE + i - 1) << 12)
    assert d.gnttab.entry(9)["frame"] == DATA + 299 % 7      # the content moved each time
    assert physmap(d, 0, F0) == 0 and hole_regions(d) == []  # into RAM: no region left at all
    assert d.mem.add_region.calls == 300


def add_counter(fn):
    def add(*a, **kw):
        add.calls += 1
        return fn(*a, **kw)
    add.calls = 0
    return add


def test_batch_onto_many_hole_gfns_stays_bounded(dom):
    """1024 (idx, gpfn) pairs per batch, repeatedly: at most one region per frame remains."""
    base = 0x30000
    idxs, gpfns, errs = base, base + 0x2000, base + 0x4000
    for rnd in range(3):
        dom.mem.write(idxs, struct.pack("<1024Q", *(i % 64 for i in range(1024))))
        dom.mem.write(gpfns, struct.pack("<1024Q", *(HOLE + rnd * 1024 + i for i in range(1024))))
        batch = ffi.new("struct xen_add_to_physmap_batch *")
        batch.domid, batch.space, batch.size = DOMID_SELF, lib.XENMAPSPACE_grant_table, 1024
        raw = bytearray(XenStruct("struct xen_add_to_physmap_batch").to_bytes(batch))
        for name, gva in (("idxs", idxs), ("gpfns", gpfns), ("errs", errs)):
            struct.pack_into("<Q", raw, handle_offset("xen_add_to_physmap_batch", name), gva)
        dom.mem.write(SCRATCH, bytes(raw))
        r = dom.dispatcher.dispatch(FakeVcpu(), Hypercall.memory_op,
                                    (lib.XENMEM_add_to_physmap_batch, SCRATCH, 0, 0, 0, 0))
        assert r == 0 and set(struct.unpack("<1024i", dom.mem.read(errs, 4096))) == {0}
        assert len(hole_regions(dom)) == 64
    assert {dom.gnttab.frame_gfn(i) for i in range(64)} == {HOLE + 2 * 1024 + 960 + i for i in range(64)}


def test_hole_memslot_cap_is_enomem_and_recovers():
    d = FakeDomain(limits=Limits(max_guest_memslots=4))
    for i in range(4):
        assert physmap(d, i, HOLE + i) == 0
    assert physmap(d, 4, HOLE + 4) == -Errno.ENOMEM          # Xen: the p2m cannot grow
    assert not d.mem.contains((HOLE + 4) << 12) and d.gnttab.frame_gfn(4) == gt.INVALID_GFN
    assert physmap(d, 4, F0) == 0                            # RAM gfns cost no memslot
    assert physmap(d, 0, HOLE + 3) == 0                      # replaces frame 3 there, frees HOLE
    assert d.gnttab.frame_gfn(3) == gt.INVALID_GFN
    assert physmap(d, 5, HOLE + 5) == 0 and len(hole_regions(d)) == 4
    assert physmap(d, 6, HOLE + 6) == -Errno.ENOMEM
    assert physmap(d, 5, HOLE + 7) == 0                      # a move needs no extra slot, even when full
    assert d.gnttab.frame_gfn(5) == HOLE + 7 and len(hole_regions(d)) == 4
    ref = 4 * 512 + 8                                        # the table still works: a grant copy
    v1(d, ref, PERMIT, 0, DATA, base=F0)                     # through frame 4, at F0
    d.mem.write(DATA << 12, b"still")
    assert d.gnttab.copy_from(DOMID, ref, 0, 5) == b"still"


def test_remove_from_physmap_and_v1_release_hole_pages(dom):
    dom.gnttab.map_frame(0, HOLE)
    assert physmap_remove(dom, HOLE) == 0
    assert hole_regions(dom) == [] and not dom.mem.contains(HOLE << 12)
    assert set_version(dom, 2)[0] == 0
    dom.gnttab.map_frame(gt.STATUS_IDX | 0, HOLE + 1)
    dom.gnttab.map_frame(0, HOLE + 2)
    assert len(hole_regions(dom)) == 2
    assert set_version(dom, 1)[0] == 0                       # status frames leave the physmap
    assert [r.gpa for r in hole_regions(dom)] == [(HOLE + 2) << 12]


def physmap_remove(d: FakeDomain, gpfn: int) -> int:
    put(d, "struct xen_remove_from_physmap", domid=DOMID_SELF, gpfn=gpfn)
    r = d.dispatcher.dispatch(FakeVcpu(), Hypercall.memory_op, (lib.XENMEM_remove_from_physmap, SCRATCH, 0, 0, 0, 0))
    return r - (1 << 64) if r >> 63 else r


def test_setup_table_past_max_frames_is_general_error_then_works():
    """Xen's setup_table: growing past max_grant_frames fails the op with GNTST_general_error."""
    d = FakeDomain(limits=Limits(max_grant_frames=4))
    assert d.gnttab.max_frames == 4
    assert frame_list(d, "setup", 5)[:2] == (0, Gntst.general_error)
    assert physmap(d, 4, HOLE) == -Errno.EINVAL and hole_regions(d) == []
    assert frame_list(d, "setup", 4)[:2] == (0, Gntst.okay) and query(d).nr_frames == 4


def test_maptrack_limit_is_no_space_and_frees_on_unmap():
    d = FakeDomain(limits=Limits(max_maptrack_frames=1))
    d.gnttab.map_frame(0, F0)
    v1(d, 10, PERMIT, 0, DATA)
    maps = [d.gnttab.map(DOMID, 10, False) for _ in range(256)]     # one 4 KiB maptrack frame
    with pytest.raises(GrantError) as e:
        d.gnttab.map(DOMID, 10, False)
    assert e.value.status == Gntst.no_space
    maps.pop().unmap()
    maps[0].unmap()
    maps[0].unmap()                                                 # a repeated unmap frees nothing twice
    maps += [d.gnttab.map(DOMID, 10, False) for _ in range(2)]    # 254 + 2: full again
    with pytest.raises(GrantError):
        d.gnttab.map(DOMID, 10, False)
    for m in maps[1:]:
        m.unmap()
    assert d.gnttab.mappings == 0 and v1_flags(d, 10) == PERMIT
