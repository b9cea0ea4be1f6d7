"""memory_op: placing shared_info and grant frames, the memory map, maximum_gpfn.

The reservation calls (ballooning: increase/decrease_reservation,
populate_physmap, current/maximum_reservation) are in ``reservation.py``.
"""
from __future__ import annotations

import struct
from xenkvm.xen.abi import DOMID_SELF, Errno, MemOp, XenStruct, ffi, handle_offset, lib
from xenkvm.xen.dispatch import Call, subops
from xenkvm.xen.errors import HypercallError, einval
from xenkvm.xen.hypercalls import reservation


ADD_TO_PHYSMAP = XenStruct("struct xen_add_to_physmap")
ADD_BATCH = XenStruct("struct xen_add_to_physmap_batch")
MEMORY_MAP = XenStruct("struct xen_memory_map")
E820_ENTRY = struct.Struct("<QQI")
MAX_BATCH = 1024


def _check_domid(call: Call, domid: int) -> None:
    if domid not in (DOMID_SELF, call.domain.domid):
        raise HypercallError(Errno.ESRCH, f"domid {domid} is not this domain")


def map_space(call: Call, space: int, idx: int, gpfn: int) -> None:
    """Make item ``idx`` of ``space`` visible at guest frame ``gpfn``."""
    if gpfn >= 1 << 40:
        raise einval(f"gpfn {gpfn:#x} beyond the physical address width")
    if space == lib.XENMAPSPACE_shared_info:
        if idx != 0:
            raise einval("shared_info has one frame")
        call.domain.shinfo.map(gpfn)
    elif space == lib.XENMAPSPACE_grant_table:
        call.domain.gnttab.map_frame(idx, gpfn)
    else:
        raise HypercallError(Errno.EOPNOTSUPP, f"map space {space} not supported")


def add_to_physmap(call: Call, arg: int) -> int:
    req = call.guest.read_struct(ADD_TO_PHYSMAP, arg)
    _check_domid(call, req.domid)
    if req.space == lib.XENMAPSPACE_gmfn_range:
        raise HypercallError(Errno.EOPNOTSUPP, "gmfn_range")
    map_space(call, req.space, req.idx, req.gpfn)
    return 0


def add_to_physmap_batch(call: Call, arg: int) -> int:
    req = call.guest.read_struct(ADD_BATCH, arg)
    _check_domid(call, req.domid)
    if req.size > MAX_BATCH:
        raise einval(f"batch of {req.size}")
    base = arg
    idxs = call.guest.read_u64(base + handle_offset("xen_add_to_physmap_batch", "idxs"))
    gpfns = call.guest.read_u64(base + handle_offset("xen_add_to_physmap_batch", "gpfns"))
    errs = call.guest.read_u64(base + handle_offset("xen_add_to_physmap_batch", "errs"))
    for i in range(req.size):
        idx = call.guest.read_u64(idxs + 8 * i)
        gpfn = call.guest.read_u64(gpfns + 8 * i)
        try:
            map_space(call, req.space, idx, gpfn)
            err = 0
        except HypercallError as e:
            err = -e.errno
        call.guest.write_u32(errs + 4 * i, err & 0xFFFFFFFF)
    return 0


def memory_map(call: Call, arg: int) -> int:
    """The guest's e820 map; nr_entries in = buffer capacity, out = entries written."""
    req = call.guest.read_struct(MEMORY_MAP, arg)
    entries = call.domain.memory_map()
    if req.nr_entries < len(entries):
        raise HypercallError(Errno.ENOBUFS, f"{req.nr_entries} entries, need {len(entries)}")
    buf = call.guest.read_u64(arg + handle_offset("xen_memory_map", "buffer"))
    call.guest.write(buf, b"".join(E820_ENTRY.pack(e.addr, e.size, int(e.type)) for e in entries))
    req.nr_entries = len(entries)
    call.guest.write_struct(MEMORY_MAP, arg, req)
    return 0


def remove_from_physmap(call: Call, arg: int) -> int:
    """Only grant frames can leave the physmap (RAM leaves by decrease_reservation)."""
    domid = call.guest.read_u32(arg) & 0xFFFF
    _check_domid(call, domid)
    gpfn = call.guest.read_u64(arg + ffi.offsetof("struct xen_remove_from_physmap", "gpfn"))
    if call.domain.gnttab.unmap_gpfn(gpfn):
        return 0
    raise HypercallError(Errno.ENOSYS, f"gpfn {gpfn:#x} is not a grant frame; RAM stays mapped")


def maximum_gpfn(call: Call, arg: int) -> int:
    _check_domid(call, call.guest.read_u32(arg) & 0xFFFF)
    return call.domain.mem.top_of_regions() // 4096 - 1


SUBOPS = {MemOp.add_to_physmap: add_to_physmap, MemOp.add_to_physmap_batch: add_to_physmap_batch,
          MemOp.memory_map: memory_map, MemOp.maximum_gpfn: maximum_gpfn,
          MemOp.remove_from_physmap: remove_from_physmap}
_other_ops = subops(SUBOPS)


def memory_op(call: Call) -> int:
    """``memory_op(cmd, arg)``: the reservation calls carry a start extent in ``cmd >> 6``
    (MEMOP_EXTENT_SHIFT, their continuation); every other sub-op is the whole ``cmd``."""
    cmd = call.args[0]
    op, start = cmd & reservation.MEMOP_CMD_MASK, cmd >> reservation.MEMOP_EXTENT_SHIFT
    if op in reservation.EXTENT_OPS:
        return reservation.extent_op(call, op, call.args[1], start)
    if op in reservation.COUNT_OPS:
        return reservation.count_op(call, op, call.args[1], start)
    return _other_ops(call)
