"""Batched grant copies for the backends' data paths: many segments, one C call.

A vif packet spans up to 18 slots (a GSO frame 17 pages), each a (ref, offset,
length) piece of a granted page.  ``GrantTable.copy_from``/``copy_to`` cost ~3 µs
of Python a piece (lock, entry check, compare-and-swap of the busy bits, page
lookup, copy, release); :class:`BatchCopy` gathers the pieces of a packet and
hands them to ``xkg_copy`` (_netif_build.py) in one call, as the mapping
domain 0 (the VMM's backends), without the domain lock: it claims each entry
from a :class:`~.grantsnap.GrantSnapshot` of the table synced before the call,
as the block backend's requests do.  One BatchCopy per thread (it owns its
segment array and snapshot).

The checks are the same as the Python path's (xk_grants.h): Xen's
``_set_status_v1`` rule ("the type must be exactly GTF_permit_access and the
domid ours; a write access to a GTF_readonly grant fails"; compare-and-swap of
GTF_reading, plus GTF_writing for a write, retried at most 5 times), the bounds
rule (offset + length within the 4 KiB page, else GNTST_bad_copy_arg), the
frame must be guest RAM; then the copy and the busy bits cleared.  Every
segment it does not serve (a v2 table, a sub-page grant, an entry someone
holds, a frame outside RAM, or any refusal) goes through ``copy_from``/``copy_to``
one by one, which copy it or raise the exact ``GrantError``: refusals keep their
Xen codes and messages.
"""
from __future__ import annotations

from xenkvm.xen.gnttab import GrantError

from ._netif_cffi import ffi, lib
from .grantsnap import GrantSnapshot


class BatchCopy:
    """Up to ``capacity`` segments between one domain's granted pages and host memory."""

    def __init__(self, domain, capacity: int):
        self.domain = domain
        self.capacity = capacity
        self.segs = ffi.new("struct xkg_seg[]", capacity)
        self.n = 0
        self.snapshot = GrantSnapshot(domain.gnttab, ffi, lib)

    def reset(self) -> None:
        """Forget the queued segments (a packet dropped before its copy)."""
        self.n = 0

    def filled(self, n: int) -> None:
        """``n`` segments were written straight into :attr:`segs` (a C helper of the caller)."""
        self.n = n

    def add(self, ref: int, offset: int, length: int, host) -> None:
        """Queue ``length`` bytes at ``offset`` of ``ref``'s page <-> ``host`` (a ``char *`` whose
        buffer the caller keeps alive until :meth:`run`)."""
        s = self.segs[self.n]
        s.ref, s.offset, s.length, s.buf = ref, offset, length, host
        self.n += 1

    def run(self, to_guest: bool) -> dict[int, GrantError]:
        """Copy every queued segment (host -> guest if ``to_guest``); the refused ones by index."""
        n, self.n = self.n, 0
        if n == 0:
            return {}
        self.snapshot.sync()
        left = lib.xkg_copy(self.snapshot.ptr, self.segs, n, to_guest)
        return self._python_path(n, to_guest) if left else {}

    def _python_path(self, n: int, to_guest: bool) -> dict[int, GrantError]:
        """The segments C left: GrantTable's own per-page copy (and its errors)."""
        dom, errors = self.domain, {}
        for i in range(n):
            s = self.segs[i]
            if s.status == lib.XKG_DONE:
                continue
            try:
                if to_guest:
                    dom.gnttab.copy_to(dom.domid, s.ref, s.offset, ffi.buffer(s.buf, s.length))
                else:
                    ffi.memmove(s.buf, dom.gnttab.copy_from(dom.domid, s.ref, s.offset, s.length), s.length)
            except GrantError as e:
                errors[i] = e
        return errors
