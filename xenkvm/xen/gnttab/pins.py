"""Pins: the active entries of a grant table (Xen's active_grant_entry, reduced).

Every access to a granted page (a backend's copy or map, a guest's
GNTTABOP_copy) pins the entry for its duration: the first pin checks the
entry and sets GTF_reading (and GTF_writing for a write) through the table's
entry codec, later pins count; the last release clears the bits, so the
guest's ``gnttab_end_foreign_access`` sees the page in use until then.

Xen rules enforced here (xen/common/grant_table.c, re-stated):

* a ref past the table's entries is ``GNTST_bad_gntref`` (map_grant_ref's
  bounds check);
* an entry not pinned yet must be ``GTF_permit_access`` (or, v2 and copies
  only, ``GTF_transitive``) for the accessing domain, and a write of a
  ``GTF_readonly`` grant fails (``_set_status_v1``/``_v2``, in entries.py);
* an entry already pinned is not re-checked (the active entry holds what it
  granted), except that a new write pin of a grant turned read-only fails;
* GTF_writing is cleared when the last writer goes, GTF_reading when the last
  pin goes (``unmap_common_complete``, ``release_grant_for_copy``);
* a transitive grant is followed one level, within this domain's own table
  (``acquire_grant_for_copy`` recursing with the transitive step disallowed),
  and the grant it names is pinned once for each pin of the outer one;
* the granted frame must be guest memory, else ``GNTST_bad_page``
  (``get_paged_frame``).

All calls run under ``domain.lock``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import Gntst
from xenkvm.xen.gnttab.entries import BUSY, GTF_writing
from xenkvm.xen.gnttab.errors import GrantError

if TYPE_CHECKING:
    from xenkvm.machine.memory import GuestMemory
    from xenkvm.xen.gnttab.entries import EntryCodec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pin:
    """An active (pinned) entry: counts, and what it granted when first pinned."""

    pins: int
    writers: int
    gfn: int
    page_off: int
    length: int
    inner: int | None = None   #: the ref a transitive grant points to (pinned too)
    page: memoryview | None = None  #: the granted page (set when first pinned)


class Pins:
    """The active entries of one table, by ref."""

    def __init__(self, mem: "GuestMemory", domain) -> None:
        self.mem = mem
        self.domain = domain   #: the granting domain (the table's owner)
        self.active: dict[int, Pin] = {}
        self.codec: "EntryCodec" = None   # type: ignore[assignment]  # set by the table
        self._pages: dict[int, memoryview] = {}   #: gfn -> page view, valid for _pages_gen
        self._pages_gen = -1                      #: GuestMemory.generation of _pages

    @property
    def domid(self) -> int:
        return self.domain.domid

    def acquire(self, ref: int, ldomid: int, readonly: bool, mapping: bool, transitive: bool = True) -> Pin:
        """Pin ``ref`` for domain ``ldomid`` (a map when ``mapping``); GrantError if refused."""
        codec = self.codec
        if not 0 <= ref < len(codec.frames.shared) * codec.per_frame:   # codec.nr_entries, inlined
            raise GrantError(Gntst.bad_gntref, f"ref {ref} of {codec.nr_entries}")
        act = self.active.get(ref)
        if act is None:
            act = self._activate(ref, codec.claim(ref, ldomid, readonly, mapping), readonly, transitive)
        else:
            codec.set_status(ref, ldomid, readonly, mapping, True, act.writers)
            if act.inner is not None:
                self._pin_inner_again(ref, act, readonly)
        act.pins += 1
        if not readonly:
            act.writers += 1
        return act

    def _activate(self, ref: int, target, readonly: bool, transitive: bool) -> Pin:
        """The first pin of ``ref`` (its busy bits just set): resolve what it grants (``target``)."""
        gfn, page_off, length, trans = target
        if trans is not None:
            act = self._follow(ref, trans, readonly, transitive)
        else:
            act = Pin(0, 0, gfn, page_off, length, None, self._page(ref, gfn))
        self.active[ref] = act
        return act

    def _page(self, ref: int, gfn: int) -> memoryview:
        """The page of guest frame ``gfn`` for pinning ``ref``; GNTST_bad_page (busy bits undone) if none."""
        page = self.page(gfn)
        if page is None:
            self.codec.clear_busy(ref, BUSY)
            raise GrantError(Gntst.bad_page, f"ref {ref}: gfn {gfn:#x} is not guest memory")
        return page

    def page(self, gfn: int) -> memoryview | None:
        """A view of guest frame ``gfn``, or None if it is not guest memory.

        Cached by gfn (a copy or a pin looks up the same few pages again and
        again) until a region leaves guest memory (``GuestMemory.generation``).
        """
        if self._pages_gen != self.mem.generation:
            self._pages.clear()
            self._pages_gen = self.mem.generation
        page = self._pages.get(gfn)
        if page is None:
            try:
                page = self.mem.page(gfn)
            except GuestMemoryError:
                return None
            if len(self._pages) >= 1024:
                self._pages.clear()
            self._pages[gfn] = page
        return page

    def _follow(self, ref: int, trans: tuple[int, int], readonly: bool, transitive: bool) -> Pin:
        """A transitive grant: pin the grant it names (one level; only this domain's table)."""
        trans_domid, gref = trans
        try:
            if not transitive:
                raise GrantError(Gntst.general_error, f"ref {ref}: nested transitive grant")
            if trans_domid != self.domid:
                raise GrantError(Gntst.general_error, f"ref {ref}: transitive grant to unknown d{trans_domid}")
            inner = self.acquire(gref, self.domid, readonly, False, transitive=False)
        except GrantError:
            self.codec.clear_busy(ref, BUSY)
            raise
        return Pin(0, 0, inner.gfn, inner.page_off, inner.length, inner=gref, page=inner.page)

    def _pin_inner_again(self, ref: int, act: Pin, readonly: bool) -> None:
        """Another pin of a pinned transitive grant pins the grant it names again."""
        try:
            self.acquire(act.inner, self.domid, readonly, False, transitive=False)
        except GrantError:
            if not readonly and act.writers == 0:
                self.codec.clear_busy(ref, GTF_writing)
            raise

    def release(self, ref: int, readonly: bool) -> None:
        """Drop one pin of ``ref`` taken with the same ``readonly``; clears the busy bits it ends."""
        act = self.active.get(ref)
        if act is None:
            return
        act.pins -= 1
        if not readonly:
            act.writers -= 1
        clear = 0
        if act.writers == 0:
            clear |= GTF_writing
        if act.pins == 0:
            clear |= BUSY
            del self.active[ref]
        if clear and ref < self.codec.nr_entries:
            self.codec.clear_busy(ref, clear)
        if act.inner is not None:
            self.release(act.inner, readonly)

    def counts(self) -> dict[int, tuple[int, int]]:
        """ref -> (pins, writers) of every active entry."""
        return {ref: (a.pins, a.writers) for ref, a in self.active.items()}

    def busy_refs(self, first: int) -> list[int]:
        """The pinned refs from ``first`` up (set_version refuses while any is)."""
        return [ref for ref in self.active if ref >= first]
