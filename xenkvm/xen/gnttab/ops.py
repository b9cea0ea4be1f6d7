"""GNTTABOP_* decoding: guest structs in (cffi layouts), GNTST_* / -errno out.

Each sub-op is one short function ``handler(call, uop) -> int`` that reads
the guest's struct(s) at ``uop``, asks the caller's :class:`GrantTable`
(``call.domain.gnttab``) and writes the result back; the table logic knows
nothing of guest structs.  :data:`SUBOPS` maps each sub-op to its handler for
the hypercall table (xen/hypercalls/table.py).

Xen facts followed (xen/common/grant_table.c, do_grant_table_op and the
gnttab_* functions, re-stated):

* ``count`` is an unsigned int; a value with the top bit set is ``-EINVAL``;
* ``query_size``, ``setup_table``, ``get_status_frames``, ``set_version``,
  ``get_version`` take count == 1 (else ``-EINVAL``) and report per-call
  problems in the struct's ``status`` field; the batched ops (copy, map,
  unmap) report per element;
* a domU naming another domain: itself (or DOMID_SELF) is fine, domain 0 is
  refused by XSM (``GNTST_permission_denied``; get_version: ``-EPERM``), any
  other does not exist (``GNTST_bad_domain``; get_version: ``-ESRCH``);
* setup_table past ``max_frames`` is ``GNTST_general_error``; a frame list
  the guest cannot be written is ``GNTST_bad_virt_addr``;
* copy: both offsets + len within the page (else ``GNTST_bad_copy_arg``),
  by-gmfn only for ``DOMID_SELF`` (else ``GNTST_permission_denied``),
  sub-page v2 grants bound the copy (``GNTST_general_error``);
* a HVM guest mapping a grant into its own physmap is not supported here:
  map gives ``GNTST_general_error`` (after Xen's flag checks: no
  host/device map flag is ``GNTST_bad_gntref``; device, application or
  PTE maps are refused to a HVM domain), unmap ``GNTST_bad_handle`` (no
  handle is ever issued).
"""
from __future__ import annotations

import logging
import operator
import struct
from typing import TYPE_CHECKING, Callable, NamedTuple

from xenkvm.xen.abi import DOMID_SELF, Errno, GnttabOp, Gntst, XenStruct, ffi, handle_offset, lib
from xenkvm.xen.errors import HypercallError, einval

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call
    from xenkvm.xen.gnttab.table import GrantTable

log = logging.getLogger(__name__)

#: Most ops one batched hypercall may carry (no continuations here; Linux uses a few hundred).
MAX_BATCH = 4096
SETUP = XenStruct("struct gnttab_setup_table")
QUERY = XenStruct("struct gnttab_query_size")
SETVER = XenStruct("struct gnttab_set_version")
GETVER = XenStruct("struct gnttab_get_version")
STATUS_FRAMES = XenStruct("struct gnttab_get_status_frames")
COPY = XenStruct("struct gnttab_copy")
MAP = XenStruct("struct gnttab_map_grant_ref")
UNMAP = XenStruct("struct gnttab_unmap_grant_ref")
SETUP_LIST = handle_offset("gnttab_setup_table", "frame_list")
STATUS_LIST = handle_offset("gnttab_get_status_frames", "frame_list")
COPY_SRC = lib.XK_OFF_gnttab_copy__source
COPY_DST = lib.XK_OFF_gnttab_copy__dest
# xk_gnttab_copy_ptr (gmfn, domid, offset) stands for struct gnttab_copy_ptr (u, domid, offset),
# whose union u holds the 32-bit ref in gmfn's low half (x86 is little-endian).
assert (ffi.offsetof("xk_gnttab_copy_ptr", "gmfn"), ffi.offsetof("xk_gnttab_copy_ptr", "domid"),
        ffi.offsetof("xk_gnttab_copy_ptr", "offset")) == (
    lib.XK_OFF_gnttab_copy_ptr__u, lib.XK_OFF_gnttab_copy_ptr__domid, lib.XK_OFF_gnttab_copy_ptr__offset)
_I16 = struct.Struct("<h")
_MASK32 = 0xFFFF_FFFF

Handler = Callable[["GrantTable", "Call", int], int]


class CopySide(NamedTuple):
    """One side of a gnttab_copy: a grant ref of ``dom`` (``by_ref``) or a gmfn of the caller."""

    by_ref: bool
    ref_or_gmfn: int
    dom: int
    offset: int


class CopyOp(NamedTuple):
    """A decoded struct gnttab_copy."""

    src: CopySide
    dst: CopySide
    length: int


def _packed(fields: list[tuple[str, int, int]]) -> tuple[struct.Struct, list[str]]:
    """One little-endian Struct reading (name, offset, size) fields at once, padding between them:
    a single unpack per op, with offsets and widths from the compiled header."""
    fmt, at, names = "<", 0, []
    for name, off, size in sorted(fields, key=lambda f: f[1]):
        fmt += f"{off - at}x" if off > at else ""
        fmt += {2: "H", 8: "Q"}[size]
        at, names = off + size, names + [name]
    return struct.Struct(fmt), names


def _copy_fields() -> list[tuple[str, int, int]]:
    out = [(f, COPY.offset(f), ffi.sizeof(dict(ffi.typeof("struct gnttab_copy").fields)[f].type))
           for f in ("len", "flags")]
    for side, base in (("src", COPY_SRC), ("dst", COPY_DST)):
        for f in ("gmfn", "domid", "offset"):
            ftype = dict(ffi.typeof("xk_gnttab_copy_ptr").fields)[f].type
            out.append((f"{side}_{f}", base + ffi.offsetof("xk_gnttab_copy_ptr", f), ffi.sizeof(ftype)))
    return out


COPY_LAYOUT, COPY_NAMES = _packed(_copy_fields())
_COPY_INDEX = {name: i for i, name in enumerate(COPY_NAMES)}
_COPY_FIELDS = operator.itemgetter(*(_COPY_INDEX[n] for n in ("len", "flags", "src_gmfn", "src_domid", "src_offset",
                                                               "dst_gmfn", "dst_domid", "dst_offset")))
COPY_STATUS = COPY.offset("status")


def decode_copy(raw: bytes) -> CopyOp:
    """The guest's struct gnttab_copy (``COPY.size`` bytes) as a CopyOp."""
    length, flags, sg, sd, so, dg, dd, do = _COPY_FIELDS(COPY_LAYOUT.unpack_from(raw))
    src_ref = bool(flags & lib.GNTCOPY_source_gref)
    dst_ref = bool(flags & lib.GNTCOPY_dest_gref)
    return CopyOp(CopySide(src_ref, sg & _MASK32 if src_ref else sg, sd, so),
                  CopySide(dst_ref, dg & _MASK32 if dst_ref else dg, dd, do), length)


# -- helpers ---------------------------------------------------------------------------
def _count(call: "Call") -> int:
    count = call.args[2] & _MASK32
    if count >= 1 << 31:
        raise einval(f"count {count:#x}")
    return count


def _single(call: "Call") -> None:
    if _count(call) != 1:
        raise einval("count must be 1")


def _batch(call: "Call") -> int:
    count = _count(call)
    if count > MAX_BATCH:
        raise einval(f"count {count} over the batch limit {MAX_BATCH}")
    return count


def dom_status(table: "GrantTable", dom: int) -> int:
    """GNTST code for a guest naming domain ``dom`` (only itself has a table it may see)."""
    if dom in (DOMID_SELF, table.domid):
        return Gntst.okay
    # Domain 0 exists (the VMM's backends) but a domU may not look at it (XSM).
    return Gntst.permission_denied if dom == 0 else Gntst.bad_domain


def _write_status(call: "Call", gva: int, value: int) -> None:
    call.guest.write(gva, _I16.pack(value))


def _write_frame_list(table: "GrantTable", call: "Call", lst: int, nr: int, status: bool) -> int:
    """Write the gfns of frames 0..nr-1 to the guest's list; GNTST code."""
    result = Gntst.okay
    for i in range(nr):
        try:
            call.guest.write_u64(lst + 8 * i, table.frame_gfn(i, status=status))
        except HypercallError:
            result = Gntst.bad_virt_addr
    return result


# -- the sub-ops -------------------------------------------------------------------------
def setup_table(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    _single(call)
    op = call.guest.read_struct(SETUP, uop)
    status = dom_status(table, op.dom)
    if status == Gntst.okay:
        if not table.grow(op.nr_frames):
            status = Gntst.general_error
        else:
            status = _write_frame_list(table, call, call.guest.read_u64(uop + SETUP_LIST), op.nr_frames, False)
    _write_status(call, uop + SETUP.offset("status"), status)
    return 0


def query_size(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    _single(call)
    op = call.guest.read_struct(QUERY, uop)
    op.status = dom_status(table, op.dom)
    if op.status == Gntst.okay:
        op.nr_frames = table.nr_frames
        op.max_nr_frames = table.max_frames
    call.guest.write_struct(QUERY, uop, op)
    return 0


def get_version(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    _single(call)
    op = call.guest.read_struct(GETVER, uop)
    status = dom_status(table, op.dom)
    if status == Gntst.bad_domain:
        raise HypercallError(Errno.ESRCH)
    if status != Gntst.okay:
        raise HypercallError(Errno.EPERM)
    op.version = table.version
    call.guest.write_struct(GETVER, uop, op)
    return 0


def set_version(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    _single(call)
    op = call.guest.read_struct(SETVER, uop)
    res = table.set_version(op.version)
    op.version = table.version
    call.guest.write_struct(SETVER, uop, op)
    return res


def get_status_frames(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    _single(call)
    op = call.guest.read_struct(STATUS_FRAMES, uop)
    status = dom_status(table, op.dom)
    if status == Gntst.okay:
        if op.nr_frames > len(table.status):
            status = Gntst.general_error
        else:
            lst = call.guest.read_u64(uop + STATUS_LIST)
            status = _write_frame_list(table, call, lst, op.nr_frames, True)
    _write_status(call, uop + STATUS_FRAMES.offset("status"), status)
    return 0


def copy(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    for i in range(_batch(call)):
        gva = uop + i * COPY.size
        op = decode_copy(call.guest.read(gva, COPY.size))
        _write_status(call, gva + COPY_STATUS, _copy_status(table, op))
    return 0


def _copy_status(table: "GrantTable", op: CopyOp) -> int:
    for side in (op.src, op.dst):
        if not side.by_ref and side.dom != DOMID_SELF:
            return Gntst.permission_denied
        if side.by_ref and side.dom not in (DOMID_SELF, table.domid):
            return Gntst.bad_domain
    return table.guest_copy(op.src, op.dst, op.length)


def map_grant_ref(call: "Call", uop: int) -> int:
    table: "GrantTable" = call.domain.gnttab
    for i in range(_batch(call)):
        gva = uop + i * MAP.size
        op = call.guest.read_struct(MAP, gva)
        op.status = _map_status(table, op)
        call.guest.write_struct(MAP, gva, op)
    return 0


def _map_status(table: "GrantTable", op) -> int:
    if not op.flags & (lib.GNTMAP_device_map | lib.GNTMAP_host_map):
        return Gntst.bad_gntref
    if op.flags & (lib.GNTMAP_device_map | lib.GNTMAP_application_map | lib.GNTMAP_contains_pte):
        return Gntst.general_error   # not for a HVM (paging_mode_external) domain
    if op.dom != table.domid:
        return Gntst.general_error if op.dom == 0 else Gntst.bad_domain
    if op.ref >= table.nr_entries:
        return Gntst.bad_gntref
    log.debug("guest map of its own grant ref %d: not supported", op.ref)
    return Gntst.general_error


def unmap_grant_ref(call: "Call", uop: int) -> int:
    for i in range(_batch(call)):
        gva = uop + i * UNMAP.size
        call.guest.read_struct(UNMAP, gva)
        _write_status(call, gva + UNMAP.offset("status"), Gntst.bad_handle)
    return 0


#: GNTTABOP_* -> handler(call, uop), for the hypercall table (xen/hypercalls/table.py).
SUBOPS: dict[GnttabOp, Handler] = {
    GnttabOp.setup_table: setup_table,
    GnttabOp.query_size: query_size,
    GnttabOp.set_version: set_version,
    GnttabOp.get_version: get_version,
    GnttabOp.get_status_frames: get_status_frames,
    GnttabOp.copy: copy,
    GnttabOp.map_grant_ref: map_grant_ref,
    GnttabOp.unmap_grant_ref: unmap_grant_ref,
}
