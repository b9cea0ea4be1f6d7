"""GrantTable: one domain's grant table, the facade over frames, codec, pins and the backend API.

It owns the table's state and the operations that change its shape:

* frames and their placement (``map_frame``/``unmap_gpfn`` for
  XENMEM_add_to_physmap / remove_from_physmap; :mod:`.frames`);
* the version and its entry codec (``set_version``; :mod:`.entries`);
* the active entries (``pins``; :mod:`.pins`) and the backend API mixed in
  from :mod:`.backend`;
* save/restore (``to_state``/``from_state``, format unchanged).

The guest's GNTTABOP_* calls are decoded in :mod:`.ops`, which calls in here.

Xen facts followed (xen/common/grant_table.c, Xen 4.17, re-stated):

* the table starts with one frame, version 1; it grows on ``setup_table``
  and on ``add_to_physmap`` of a higher index, up to ``max_frames``;
* ``set_version`` may change version only while no entry past the 8
  toolstack-reserved ones is pinned (``-EBUSY``); it clears every frame but
  keeps (and converts) the reserved entries; v2 -> v1 with a reserved entry
  that v1 cannot hold is ``-ERANGE``; status frames exist only in v2;
* an add_to_physmap index with XENMAPIDX_grant_table_status names a status
  frame in v2; in v1 the bit makes the index out of range (``-EINVAL``).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.xen.abi import PAGE_SHIFT, PAGE_SIZE, Errno, Gntst, HvmParam, lib
from xenkvm.xen.errors import einval
from xenkvm.xen.gnttab.backend import BackendApi
from xenkvm.xen.gnttab.entries import (CODECS, GTF_permit_access, GTF_readonly, STATUS_PER_FRAME, EntryCodec,
                                       codec_for)
from xenkvm.xen.gnttab.errors import GrantError
from xenkvm.xen.gnttab.frames import Frame, Frames
from xenkvm.xen.gnttab.pins import Pins
from xenkvm.xen.limits import of as limits_of

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

#: Entries 0-7 belong to the toolstack (0: console, 1: xenstore) and survive set_version.
RESERVED_ENTRIES = 8
RESERVED_CONSOLE = 0
RESERVED_XENSTORE = 1
STATUS_IDX = lib.XENMAPIDX_grant_table_status
MAX_FRAMES_CAP = 1024


class GrantTable(BackendApi):
    """The domain's grant table (owned by XenDomain; all changes under ``domain.lock``)."""

    def __init__(self, domain: "XenDomain", max_frames: int | None = None, max_version: int = 2):
        limits = limits_of(domain)
        if max_frames is None:
            max_frames = limits.max_grant_frames
        if not 1 <= max_frames <= MAX_FRAMES_CAP:
            raise ValueError(f"grant table max_frames {max_frames}: need 1..{MAX_FRAMES_CAP}")
        self.domain = domain
        self.mem = domain.mem
        self.max_frames = max_frames
        self.max_version = max_version
        self.max_mappings = limits.max_maptrack_entries
        self.mappings = 0   #: live GrantMappings (Xen's maptrack entries of the mapping domain)
        self.physmap = Frames(self.mem, limits.max_guest_memslots)
        self.pins = Pins(self.mem, domain)
        self._use_version(1)
        self._seed_reserved()

    # -- geometry ----------------------------------------------------------------
    def _use_version(self, version: int) -> None:
        self.codec: EntryCodec = codec_for(version, self.physmap)
        self.pins.codec = self.codec

    @property
    def version(self) -> int:
        return self.codec.version

    @property
    def frames(self) -> list[Frame]:
        """The shared frames."""
        return self.physmap.shared

    @property
    def status(self) -> list[Frame]:
        """The status frames (v2; empty in v1)."""
        return self.physmap.status

    @property
    def nr_frames(self) -> int:
        return len(self.physmap.shared)

    @property
    def per_frame(self) -> int:
        return self.codec.per_frame

    @property
    def nr_entries(self) -> int:
        return self.codec.nr_entries

    def _grow(self, nr_frames: int) -> None:
        nr_frames = max(nr_frames, self.nr_frames)
        self.physmap.grow(nr_frames, self.codec.status_frames_for(nr_frames))

    def grow(self, nr_frames: int) -> bool:
        """Grow to ``nr_frames`` shared frames (setup_table); False past ``max_frames``."""
        if nr_frames > self.max_frames:
            return False
        self._grow(nr_frames)
        return True

    # -- entries (VMM side) ---------------------------------------------------------
    def seed(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """Write a full-page permit_access entry, as the toolstack does for refs 0 and 1."""
        with self.domain.lock:
            self.codec.write(ref, GTF_permit_access | (GTF_readonly if readonly else 0), domid, gfn)

    def _seed_reserved(self) -> None:
        params = getattr(self.domain, "params", {}) or {}
        if params.get(HvmParam.CONSOLE_PFN):
            self.seed(RESERVED_CONSOLE, 0, params[HvmParam.CONSOLE_PFN])
        if params.get(HvmParam.STORE_PFN):
            self.seed(RESERVED_XENSTORE, 0, params[HvmParam.STORE_PFN])

    def entry(self, ref: int) -> dict:
        """The entry as a dict (diagnostics and tests)."""
        with self.domain.lock:
            if not 0 <= ref < self.nr_entries:
                raise GrantError(Gntst.bad_gntref, f"ref {ref}")
            return self.codec.describe(ref)

    @property
    def pinned(self) -> dict[int, tuple[int, int]]:
        """ref -> (pins, writers) of every active entry."""
        return self.pins.counts()

    # -- frames in the guest physmap -------------------------------------------------
    def map_frame(self, idx: int, gpfn: int) -> None:
        """XENMEM_add_to_physmap(XENMAPSPACE_grant_table): show frame ``idx`` at ``gpfn``.

        ``idx`` with XENMAPIDX_grant_table_status names a status frame (v2 only;
        in v1 the bit makes the index out of range, as in Xen).  Raises
        HypercallError(EINVAL) for an index past the maximum or a gpfn that
        cannot hold the frame, ENOMEM when no memslot is left for it.
        """
        if not 0 <= gpfn < 1 << (52 - PAGE_SHIFT):
            raise einval(f"gpfn {gpfn:#x} out of range")
        with self.domain.lock:
            status = self.codec.has_status and bool(idx & STATUS_IDX)
            if status:
                idx &= ~STATUS_IDX
                self._grow_for_status(idx)
            else:
                if idx >= self.max_frames:
                    raise einval(f"grant frame {idx:#x} beyond the maximum {self.max_frames}")
                self._grow(idx + 1)
            self.physmap.place(idx, gpfn, status)

    def _grow_for_status(self, idx: int) -> None:
        """Grow the table until status frame ``idx`` exists (EINVAL past ``max_frames``)."""
        if idx >= len(self.status):
            need = -(-(idx + 1) * STATUS_PER_FRAME // self.per_frame)
            if need <= self.max_frames:
                self._grow(need)
            if idx >= len(self.status):
                raise einval(f"grant status frame {idx} beyond the maximum")

    def unmap_gpfn(self, gpfn: int) -> bool:
        """XENMEM_remove_from_physmap of a gpfn holding a grant frame: the frame goes back to
        VMM memory (content kept).  False if no frame is mapped there."""
        with self.domain.lock:
            return self.physmap.unmap_gpfn(gpfn)

    def frame_gfn(self, idx: int, status: bool = False) -> int:
        """Where frame ``idx`` is mapped, or INVALID_GFN."""
        return self.physmap.gfn(idx, status)

    # -- version ---------------------------------------------------------------------
    def set_version(self, version: int) -> int:
        """Switch the table to ``version``; returns 0 or -errno (the hypercall's result)."""
        if version not in (1, 2):
            return -Errno.EINVAL
        if version == 2 and self.max_version < 2:
            return -Errno.ENOSYS
        if version == self.version:
            return 0
        busy = self.pins.busy_refs(RESERVED_ENTRIES)
        if busy:
            log.info("grant set_version %d: %d entries in use (first ref %d)", version, len(busy), min(busy))
            return -Errno.EBUSY
        kept = [self.codec.keep(ref) for ref in range(RESERVED_ENTRIES)]
        if None in kept:
            return -Errno.ERANGE   # v1 cannot hold one of them
        self._switch(version, kept)
        log.info("grant table version %d", version)
        return 0

    def _switch(self, version: int, kept: list) -> None:
        """Clear every frame, change codec, and write the reserved entries back."""
        if not CODECS[version].has_status:
            self.physmap.drop_status()
        for frame in self.frames:
            frame.clear()
        self._use_version(version)
        self._grow(self.nr_frames)   # status frames for v2
        for frame in self.status:
            frame.clear()
        for ref, (flags, dom, gfn) in enumerate(kept):
            self.codec.write(ref, flags, dom, gfn)

    # -- the guest's own copies (GNTTABOP_copy, decoded in ops) ---------------------------
    def guest_copy(self, src, dst, length: int) -> int:
        """Copy ``length`` bytes between two sides (ops.CopySide: a ref of this table or a gmfn of
        the guest, with an offset); returns the GNTST code for the op's ``status``."""
        pinned: list[tuple[int, bool]] = []
        try:
            spans = [self._copy_span(side, readonly, pinned) for side, readonly in ((src, True), (dst, False))]
            if any(off + length > PAGE_SIZE for *_, off in spans):
                return Gntst.bad_copy_arg
            for _, page_off, glen, off in spans:
                if off < page_off or off + length > page_off + glen:
                    return Gntst.general_error   # outside a sub-page grant
            (src_page, *_, soff), (dst_page, *_, doff) = spans
            dst_page[doff:doff + length] = bytes(src_page[soff:soff + length])
            return Gntst.okay
        except GrantError as e:
            return e.status
        finally:
            for ref, readonly in reversed(pinned):
                self.pins.release(ref, readonly)

    def _copy_span(self, side, readonly: bool, pinned: list) -> tuple[memoryview, int, int, int]:
        """(page, granted offset, granted length, copy offset) of one copy side, pinned if a ref."""
        if side.by_ref:
            act = self.pins.acquire(side.ref_or_gmfn, self.domid, readonly, False)
            pinned.append((side.ref_or_gmfn, readonly))
            return act.page, act.page_off, act.length, side.offset
        page = self.pins.page(side.ref_or_gmfn)
        if page is None:
            raise GrantError(Gntst.bad_page, f"gmfn {side.ref_or_gmfn:#x} is not guest memory")
        return page, 0, PAGE_SIZE, side.offset

    # -- hypercalls --------------------------------------------------------------------
    # -- save / restore ----------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain data: version, frames' gpfns, and the content of frames not in guest RAM."""
        with self.domain.lock:
            return {"version": self.version, "max_frames": self.max_frames, "max_version": self.max_version,
                    **self.physmap.to_state()}

    def from_state(self, state: dict) -> None:
        """Restore onto a fresh table (guest RAM restored separately; hole pages recreated)."""
        with self.domain.lock:
            self.max_frames = int(state.get("max_frames", self.max_frames))
            self.max_version = int(state.get("max_version", self.max_version))
            self.pins.active.clear()
            self._use_version(int(state["version"]))
            self.physmap.from_state(state)
            self._grow(self.nr_frames)
