"""memory_op reservation calls: increase/decrease_reservation, populate_physmap, the counts.

The accounting and the host side live in :mod:`xenkvm.xen.reservation`
(``domain.reservation``); this module reads the guest's arguments and applies
Xen's rules for them (xen/common/memory.c, ``do_memory_op``, re-stated):

* the three extent calls return the number of extents done, never an error:
  an unreadable ``xen_memory_reservation``, ``nr_extents`` too large to encode
  a continuation (above ``UINT_MAX >> MEMOP_EXTENT_SHIFT``), a start extent
  (``cmd >> MEMOP_EXTENT_SHIFT``) at or past ``nr_extents``, a domain other
  than the caller (another domain fails XSM's target check, a missing one is
  not found), ``address_bits`` of 1..PAGE_SHIFT, an exact-node request from a
  domU, or ``extent_order`` above the domU limit (9 on x86) all return the
  start extent with nothing done;
* extents are read one by one from ``extent_start``: the first that cannot be
  read (or done) ends the call, and the count so far is returned;
* populate_physmap with ``XENMEMF_populate_on_demand`` on oneself is refused;
* current/maximum_reservation read a ``domid_t`` (``-EFAULT`` if unreadable):
  the caller itself (DOMID_SELF or its own id) gets its page count, dom0
  (which exists, but a domU may not look at it) ``-EPERM``, any other id
  ``-ESRCH``; a start extent in ``cmd`` is ``-EINVAL``.

Xen continues a long call with a hypercall continuation; here every call runs
to its end (its work is bounded by the guest's RAM and its max_pages).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from xenkvm.xen.abi import DOMID_SELF, Errno, MemOp, XenStruct, handle_offset, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval
from xenkvm.xen.reservation import Reservation, gfns_of
from xenkvm.xen.shinfo import RUNSTATE, TIME_INFO, VCPU_INFO

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)
RESERVATION = XenStruct("struct xen_memory_reservation")
EXTENT_START = handle_offset("xen_memory_reservation", "extent_start")
#: xen/include/xen/hypercall.h: memory_op's cmd carries the start extent above the op.
MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1
MAX_NR_EXTENTS = 0xFFFF_FFFF >> MEMOP_EXTENT_SHIFT
#: CONFIG_DOMU_MAX_ORDER on x86: a domU's extents are at most 2 MiB.
DOMU_MAX_ORDER = 9
PAGE_SHIFT = 12
DOM0 = 0
XENMEMF_POD = lib.XENMEMF_populate_on_demand
XENMEMF_EXACT_NODE = lib.XENMEMF_exact_node_request
XENMEMF_VNODE = lib.XENMEMF_vnode
EXTENT_OPS = (MemOp.increase_reservation, MemOp.decrease_reservation, MemOp.populate_physmap)
COUNT_OPS = (MemOp.current_reservation, MemOp.maximum_reservation)


def _is_self(call: Call, domid: int) -> bool:
    return domid in (DOMID_SELF, call.domain.domid)


def xen_owned_gfns(domain: "XenDomain") -> set[int]:
    """Guest frames holding structures the VMM keeps in guest memory (never released)."""
    areas: list[tuple[int | None, int]] = [(domain.shinfo.gpa, 4096)]
    for v in domain.vcpus:
        areas += [(v.vcpu_info_gpa, VCPU_INFO.size), (v.runstate_gpa, RUNSTATE.size),
                  (v.time_area_gpa, TIME_INFO.size)]
    gfns = gfns_of(areas)
    gfns.update(domain.evtchn.guest_frames())       # FIFO control blocks and event array
    return gfns


def grant_frame_gfns(domain: "XenDomain") -> set[int]:
    """Where the guest mapped its grant (and status) frames."""
    gt = domain.gnttab
    gfns = {gt.frame_gfn(i) for i in range(gt.nr_frames)}
    gfns |= {gt.frame_gfn(i, True) for i in range(len(gt.status))}
    return {g for g in gfns if g >> 52 == 0}   # drop INVALID_GFN (~0)


def _extent_chunks(call: Call, handle: int, start: int, nr: int) -> Iterator[np.ndarray]:
    """The guest's xen_pfn_t list from index ``start``, a guest page at a time; ends at the
    first entry that cannot be read (Xen's per-entry __copy_from_guest_offset)."""
    i = start
    while i < nr:
        addr = (handle + 8 * i) & ((1 << 64) - 1)
        n = min(nr - i, (4096 - (addr & 0xFFF)) // 8) or 1   # whole entries before the page end
        try:
            data = call.guest.read(addr, 8 * n)
        except HypercallError:
            return
        yield np.frombuffer(data, dtype="<u8")
        i += n


def _extents_done(call: Call, arg: int, req, start: int,
                  apply: Callable[[np.ndarray, int, set[int], set[int]], int]) -> int:
    """Run ``apply`` over the extent list chunk by chunk; stop at the first short chunk."""
    domain = call.domain
    pinned, frames = xen_owned_gfns(domain), grant_frame_gfns(domain)
    done = start
    handle = call.guest.read_u64(arg + EXTENT_START)
    for chunk in _extent_chunks(call, handle, start, req.nr_extents):
        n = apply(chunk, req.extent_order, pinned, frames)
        done += n
        if n < len(chunk):
            break
        frames = grant_frame_gfns(domain) if frames else frames
    if done < req.nr_extents:
        log.debug("memory_op %s: %d of %d extents (order %d) done", MemOp(call.args[0] & MEMOP_CMD_MASK).name,
                  done, req.nr_extents, req.extent_order)
    return done


def _flags_refused(req) -> bool:
    """construct_memop_from_reservation's refusals for a domU."""
    bits = req.mem_flags & 0xFF
    if 0 < bits <= PAGE_SHIFT:
        return True
    node_given = ((req.mem_flags >> 8) & 0xFF) != 0
    return not req.mem_flags & XENMEMF_VNODE and node_given and bool(req.mem_flags & XENMEMF_EXACT_NODE)


def extent_op(call: Call, op: int, arg: int, start: int) -> int:
    """increase_reservation, decrease_reservation, populate_physmap: extents done."""
    try:
        req = call.guest.read_struct(RESERVATION, arg)
    except HypercallError:
        return start
    if (req.nr_extents > MAX_NR_EXTENTS or start >= req.nr_extents or not _is_self(call, req.domid)
            or _flags_refused(req) or req.extent_order > DOMU_MAX_ORDER):
        return start
    res: Reservation = call.domain.reservation
    gnttab = call.domain.gnttab
    if op == MemOp.increase_reservation:
        return start + res.allocate_unmapped(req.nr_extents - start, req.extent_order)
    if op == MemOp.decrease_reservation:
        return _extents_done(call, arg, req, start,
                             lambda b, o, p, f: res.remove(b, o, p, f, gnttab.unmap_gpfn))
    if req.mem_flags & XENMEMF_POD:      # "Disallow populating PoD pages on oneself."
        return start
    return _extents_done(call, arg, req, start, lambda b, o, p, f: res.populate(b, o, p, f, gnttab.unmap_gpfn))


def count_op(call: Call, op: int, arg: int, start: int) -> int:
    """current_reservation / maximum_reservation: the caller's tot_pages / max_pages."""
    if start:
        raise einval(f"start extent {start} on a query")
    domid = int.from_bytes(call.guest.read(arg, 2), "little")
    if not _is_self(call, domid):
        if domid == DOM0:
            raise HypercallError(Errno.EPERM, "a domU may not query dom0's reservation")
        raise HypercallError(Errno.ESRCH, f"no domain {domid}")
    res: Reservation = call.domain.reservation
    return res.tot_pages if op == MemOp.current_reservation else res.max_pages
