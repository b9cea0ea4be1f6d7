"""The domain's memory reservation: which RAM frames are populated, and Xen's page accounting.

Xen counts the pages a domain owns (``tot_pages``, XENMEM_current_reservation)
against a limit (``max_pages``, XENMEM_maximum_reservation).  A ballooning
guest gives frames of its physmap back (XENMEM_decrease_reservation) and asks
for frames again (XENMEM_populate_physmap); here a frame given back is really
returned to the host (``madvise(MADV_DONTNEED)`` on the anonymous mapping
behind the memslot, through :meth:`GuestMemory.discard`), and reads as zero
once populated again.

Xen facts followed (xen/common/memory.c, 4.17, re-stated):

* removing a frame that is not populated fails (``guest_remove_page``: no
  valid page behind the gfn), and the operation stops there;
* pages of an extent are removed one by one: a failure inside an extent leaves
  the earlier pages of that extent removed, but the extent is not counted;
* populating allocates a new page per frame and maps it, even over a frame
  that is populated already: the old page stays owned by the domain but is in
  no physmap slot any more (Xen's ``p2m_add_page`` leaves it unreachable), so
  ``tot_pages`` grows by the extent size either way;
* an allocation that would take ``tot_pages`` past ``max_pages`` fails
  (``assign_pages``: over-allocation), and the operation stops there;
* for an auto-translated (HVM/PVH) guest, XENMEM_increase_reservation
  allocates pages to the domain without mapping them anywhere.

Deviations, each because guest RAM here is a fixed set of memslots:

* only frames inside the boot-time RAM regions can be populated (Xen would
  populate any gfn, e.g. above RAM for memory hotplug);
* a frame that holds a structure the VMM keeps *in guest memory*
  (shared_info, a registered vcpu_info, runstate or time area, a FIFO event
  control block or event array page) cannot be removed or populated over: Xen
  keeps those in its own pages and would only unmap the gfn, whereas here the
  page is the structure, so releasing it would lose its state and the VMM would
  go on writing into whatever the guest later puts at that gfn;
* a guest that touches a frame it gave back gets a fresh zero page from the
  host (Xen would fault it); the frame still counts as not populated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from xenkvm.machine.memory import GuestMemory, Region

log = logging.getLogger(__name__)

PAGE_SHIFT = 12


@dataclass(eq=False)
class _RamRange:
    """One RAM region and the populated state of each of its frames."""

    region: Region
    first: int               #: first gfn
    populated: np.ndarray    #: bool, one per frame

    @property
    def end(self) -> int:
        return self.first + len(self.populated)


class Reservation:
    """Populated RAM frames plus the pages owned outside the physmap, against a maximum.

    All methods run under the domain's big lock (they are called from hypercalls).
    ``pinned`` gfns (Xen structures kept in guest memory) refuse removal and
    repopulation; ``frames`` gfns (grant frames mapped in the guest) are unmapped
    through ``unmap_frame`` before their page goes, as Xen unmaps them.
    """

    def __init__(self, mem: GuestMemory, max_pages: int | None = None):
        self.mem = mem
        self._ram = [_RamRange(r, r.gpa >> PAGE_SHIFT, np.ones(r.size >> PAGE_SHIFT, dtype=bool))
                     for r in mem.ram_regions()]
        self.populated_pages = sum(len(r.populated) for r in self._ram)
        #: pages the domain owns that are in no physmap slot (increase_reservation, replaced frames)
        self.unmapped_pages = 0
        self.max_pages = self.populated_pages if max_pages is None else max_pages

    # -- accounting ------------------------------------------------------------
    @property
    def tot_pages(self) -> int:
        """Xen's ``d->tot_pages``: what XENMEM_current_reservation answers."""
        return self.populated_pages + self.unmapped_pages

    def is_populated(self, gfn: int) -> bool:
        for r in self._ram:
            if r.first <= gfn < r.end:
                return bool(r.populated[gfn - r.first])
        return False

    # -- lookups (vectorised: a balloon driver hands over 512 frames a call) -----
    def _locate(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(range index or -1, populated) for each gfn in ``pages``."""
        where = np.full(len(pages), -1, dtype=np.int64)
        populated = np.zeros(len(pages), dtype=bool)
        for i, r in enumerate(self._ram):
            inside = (pages >= r.first) & (pages < r.end)
            where[inside] = i
            populated[inside] = r.populated[(pages[inside] - r.first).astype(np.int64)]
        return where, populated

    @staticmethod
    def _expand(bases: np.ndarray, order: int) -> np.ndarray:
        """Every gfn of every extent, extent by extent (uint64; wraps are caught as 'outside RAM')."""
        if order == 0:
            return bases
        return (bases[:, None] + np.arange(1 << order, dtype=np.uint64)[None, :]).ravel()

    @staticmethod
    def _first_repeat(pages: np.ndarray) -> np.ndarray:
        """True for every gfn that already appeared earlier in ``pages``."""
        repeat = np.ones(len(pages), dtype=bool)
        repeat[np.unique(pages, return_index=True)[1]] = False
        return repeat

    def _set(self, pages: np.ndarray, where: np.ndarray, value: bool) -> None:
        for i, r in enumerate(self._ram):
            sel = pages[where == i]
            r.populated[(sel - r.first).astype(np.int64)] = value

    def _discard(self, pages: np.ndarray) -> None:
        """Give the host pages of RAM frames ``pages`` back, one madvise per contiguous run."""
        if not len(pages):
            return
        pages = np.unique(pages)
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(pages, breaks):
            first, count = int(run[0]), len(run)
            for r in self._ram:   # a run never spans two ranges: they are not adjacent
                if r.first <= first < r.end:
                    self.mem.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
                    break

    # -- the operations ----------------------------------------------------------
    def remove(self, bases: np.ndarray, order: int, pinned: set[int], frames: set[int],
               unmap_frame: Callable[[int], bool]) -> int:
        """decrease_reservation of extents ``bases`` (gfns) of 2**order frames: extents done.

        A frame can go if it is a populated RAM frame not pinned, or a grant frame
        (mapped anywhere); the first one that cannot stops the call.
        """
        pages = self._expand(bases.astype(np.uint64), order)
        where, populated = self._locate(pages)
        ok = populated & ~self._first_repeat(pages)
        if pinned:
            ok &= ~np.isin(pages, np.fromiter(pinned, dtype=np.uint64, count=len(pinned)))
        if frames:
            ok |= np.isin(pages, np.fromiter(frames, dtype=np.uint64, count=len(frames))) \
                & ~self._first_repeat(pages)
        bad = np.flatnonzero(~ok)
        n = int(bad[0]) if len(bad) else len(pages)
        pages, where = pages[:n], where[:n]
        for gfn in (frames.intersection(pages.tolist()) if frames else ()):
            unmap_frame(gfn)
        ram = where >= 0
        self._set(pages[ram], where[ram], False)
        self.populated_pages -= int(ram.sum())
        self._discard(pages[ram])
        return n >> order

    def populate(self, bases: np.ndarray, order: int, pinned: set[int], frames: set[int],
                 unmap_frame: Callable[[int], bool]) -> int:
        """populate_physmap of extents ``bases`` of 2**order frames: extents done.

        Each extent must lie in RAM, hold no pinned frame and fit under max_pages;
        the first that does not stops the call.  Populated frames read as zero.
        """
        per = 1 << order
        pages = self._expand(bases.astype(np.uint64), order)
        where, populated = self._locate(pages)
        ok = where >= 0
        if pinned:
            ok &= ~np.isin(pages, np.fromiter(pinned, dtype=np.uint64, count=len(pinned)))
        ext_ok = ok.reshape(-1, per).all(axis=1)
        bad = np.flatnonzero(~ext_ok)
        n = int(bad[0]) if len(bad) else len(ext_ok)
        n = min(n, max(0, self.max_pages - self.tot_pages) // per)
        pages, where = pages[:n * per], where[:n * per]
        for gfn in (frames.intersection(pages.tolist()) if frames else ()):
            unmap_frame(gfn)
        new = ~populated[:n * per] & ~self._first_repeat(pages)
        self._set(pages, where, True)
        gained = int(new.sum())
        self.unmapped_pages += n * per - gained      # the pages they replace stay owned, unmapped
        self.populated_pages += gained
        self._discard(pages)
        return n

    def allocate_unmapped(self, nr_extents: int, order: int) -> int:
        """increase_reservation for a translated guest: pages owned, in no physmap slot."""
        per = 1 << order
        n = min(nr_extents, max(0, self.max_pages - self.tot_pages) // per)
        self.unmapped_pages += n * per
        return n


def gfns_of(areas: Iterable[tuple[int | None, int]]) -> set[int]:
    """The frames touched by each (gpa, size) area; None gpas are skipped."""
    out: set[int] = set()
    for gpa, size in areas:
        if gpa is not None:
            out.update(range(gpa >> PAGE_SHIFT, ((gpa + max(size, 1) - 1) >> PAGE_SHIFT) + 1))
    return out
