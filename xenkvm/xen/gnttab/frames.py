"""Grant frames and status frames, and where the guest sees them in its physmap.

The table is a list of 4 KiB *shared frames* of entries, plus (v2 only)
*status frames* of one uint16 per entry.  A frame lives in VMM memory until
the guest maps it with ``XENMEM_add_to_physmap(space=grant_table, idx, gpfn)``;
from then on the page at ``gpfn`` *is* its storage: a RAM page when gpfn is in
guest RAM, else a one-page region this module adds in the hole (one memslot,
through ``GuestMemory.add_region``) and removes when the frame leaves.

Xen facts followed (xen/common/grant_table.c and xen/arch/x86/mm.c, re-stated):

* add_to_physmap of a grant frame first unmaps it from the gfn it held, so
  moving a frame leaves its old gfn a hole (and our slot there goes), and a
  frame mapped over another grant frame's gfn unmaps that one;
* the guest holds at most one slot per frame and at most
  ``Limits.max_guest_memslots`` in all: one more is ``-ENOMEM`` (Xen: the p2m
  cannot take another entry).  A move when all slots are used frees the old
  one first; if the new gfn is then refused, the frame stays unmapped;
* frame lists report ~0 (``INVALID_GFN``) for an unmapped frame.

Words of a frame the guest can see change under us at any time, so every
read-modify-write on one is atomic: the C helpers (``lib.xk_*32_at``) on a
pointer to the frame's storage taken when it moves (``GuestMemory.cptr`` for a
guest page, the bytearray's buffer in VMM memory), not a GuestMemory lookup per
access.  The pointer holds the storage it points into, so even a frame whose
region left still writes only memory that is mapped.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemoryError, RegionRefused
from xenkvm.xen.abi import PAGE_SHIFT, PAGE_SIZE, Errno, ffi, lib
from xenkvm.xen.errors import HypercallError, einval

if TYPE_CHECKING:
    from xenkvm.machine.memory import GuestMemory, Region

log = logging.getLogger(__name__)

INVALID_GFN = (1 << 64) - 1
_MASK32 = 0xFFFF_FFFF
_or32_at = lib.xk_or32_at
_and32_at = lib.xk_and32_at
_cmpxchg32_at = lib.xk_cmpxchg32_at


class Frame:
    """One 4 KiB frame of the table: VMM memory until mapped, then the guest page at ``gpfn``."""

    __slots__ = ("buf", "gpfn", "gpa", "mem", "ptr")

    def __init__(self, mem: "GuestMemory") -> None:
        self.mem = mem
        self.gpfn: int | None = None
        self.gpa: int | None = None   #: gpfn's address while mapped
        self._own(bytearray(PAGE_SIZE))

    def _own(self, data: bytearray) -> None:
        """Keep the frame in VMM memory (``data``)."""
        self.buf = memoryview(data)
        self.ptr = ffi.from_buffer(data)   #: C pointer to the storage (the atomics' base)

    def attach(self, gpfn: int, view: memoryview, copy: bool = True) -> None:
        """Make the guest page ``view`` (at ``gpfn``) the frame's storage, moving the content there."""
        ptr = self.mem.cptr(gpfn << PAGE_SHIFT, PAGE_SIZE)
        if copy:
            view[:] = bytes(self.buf)
        self.buf, self.ptr, self.gpfn, self.gpa = view, ptr, gpfn, gpfn << PAGE_SHIFT

    def detach(self) -> None:
        """Keep the content in VMM memory; the guest page stays as it is."""
        self._own(bytearray(self.buf))
        self.gpfn = self.gpa = None

    def clear(self) -> None:
        self.buf[:] = bytes(PAGE_SIZE)

    # -- 32-bit words: atomic (the guest may see the frame) ---------------------
    def load32(self, off: int) -> int:
        """The word at ``off`` in one load (not struct's byte at a time: sharedwords.py)."""
        return self.buf[off:off + 4].cast("I")[0]

    def cmpxchg32(self, off: int, expected: int, desired: int) -> tuple[bool, int]:
        """Compare-and-swap the word at ``off``: (swapped, value found)."""
        r = _cmpxchg32_at(self.ptr, off, expected & _MASK32, desired & _MASK32)
        return r >> 32 == 1, r & _MASK32

    def or32(self, off: int, bits: int) -> int:
        """Atomically OR ``bits`` into the word at ``off`` (a full barrier); the old value."""
        return _or32_at(self.ptr, off, bits & _MASK32)

    def and32(self, off: int, bits: int) -> int:
        """Atomically AND the word at ``off`` with ``bits`` (a full barrier); the old value."""
        return _and32_at(self.ptr, off, bits & _MASK32)


class Frames:
    """The shared and status frames and their placement in the guest physmap."""

    def __init__(self, mem: "GuestMemory", max_hole_slots: int) -> None:
        self.mem = mem
        self.max_hole_slots = max_hole_slots
        self.shared: list[Frame] = [Frame(mem)]
        self.status: list[Frame] = []
        #: one-page regions added outside RAM, by gpfn: one per mapped frame there
        self.holes: dict[int, "Region"] = {}
        #: gpfn -> (is_status, idx) for every frame mapped in the guest
        self.at: dict[int, tuple[bool, int]] = {}

    def grow(self, nr_shared: int, nr_status: int) -> None:
        """Add frames (in VMM memory) up to the given counts; never shrinks."""
        while len(self.shared) < nr_shared:
            self.shared.append(Frame(self.mem))
        while len(self.status) < nr_status:
            self.status.append(Frame(self.mem))

    def _list(self, status: bool) -> list[Frame]:
        return self.status if status else self.shared

    def gfn(self, idx: int, status: bool = False) -> int:
        """Where frame ``idx`` is mapped, or INVALID_GFN (the value frame lists report)."""
        gpfn = self._list(status)[idx].gpfn
        return INVALID_GFN if gpfn is None else gpfn

    def place(self, idx: int, gpfn: int, status: bool) -> None:
        """Show frame ``idx`` (which exists) at ``gpfn``, unmapping what was there and its old gfn."""
        frame = self._list(status)[idx]
        if frame.gpfn == gpfn:
            return
        view = self._page_for_moving(frame, gpfn, f"grant-{'status' if status else 'frame'}-{idx}")
        other = self.at.pop(gpfn, None)
        if other is not None:   # the gpfn held another frame: Xen unmaps that one
            self._list(other[0])[other[1]].detach()
        old = frame.gpfn
        if old is not None:
            del self.at[old]
        frame.attach(gpfn, view)
        self.at[gpfn] = (status, idx)
        if old is not None:
            # Xen unmaps a grant frame from its old gfn before mapping it at the new one:
            # the old gfn is a hole again, and its memslot (if we added one) goes.
            self.release_hole(old)
        log.debug("grant %s frame %d at gpfn %#x", "status" if status else "shared", idx, gpfn)

    def _page_for_moving(self, frame: Frame, gpfn: int, name: str) -> memoryview:
        """The page at ``gpfn`` for ``frame``; when no memslot is left and the frame holds one
        outside RAM, that one is freed first (if the new one then fails too, the frame stays
        unmapped, as in Xen)."""
        try:
            return self.page_for(gpfn, name)
        except HypercallError as e:
            old = frame.gpfn
            if e.errno != Errno.ENOMEM or old is None or old not in self.holes:
                raise
            del self.at[old]
            frame.detach()
            self.release_hole(old)
            return self.page_for(gpfn, name)

    def page_for(self, gpfn: int, name: str) -> memoryview:
        """The guest page at ``gpfn`` to hold a frame: RAM, or a region added in the hole."""
        region = self.holes.get(gpfn)
        if region is None:
            gpa = gpfn << PAGE_SHIFT
            found = self.mem.region_at(gpa)
            if found is not None:
                if not found.ram:
                    raise einval(f"gpfn {gpfn:#x} is in region {found.name}")
                return self.mem.page(gpfn)
            region = self._add_hole(gpfn, name)
        return region.view[:PAGE_SIZE]

    def _add_hole(self, gpfn: int, name: str) -> "Region":
        if len(self.holes) >= self.max_hole_slots:
            # Xen: -ENOMEM when the p2m cannot take another entry.
            raise HypercallError(Errno.ENOMEM, f"grant frame at gpfn {gpfn:#x}: all "
                                 f"{self.max_hole_slots} memslots for grant frames in use")
        try:
            region = self.mem.add_region(gpfn << PAGE_SHIFT, PAGE_SIZE, name)
        except RegionRefused as e:
            log.warning("grant frame at gpfn %#x: %s", gpfn, e)
            raise HypercallError(Errno.ENOMEM, str(e)) from None
        except GuestMemoryError as e:
            log.warning("grant frame at gpfn %#x: %s", gpfn, e)
            raise einval(str(e)) from None
        self.holes[gpfn] = region
        return region

    def release_hole(self, gpfn: int) -> None:
        """Remove the region added at ``gpfn`` once no frame is mapped there."""
        if gpfn in self.at:
            return
        region = self.holes.pop(gpfn, None)
        if region is not None:
            self.mem.remove_region(region)
            log.debug("grant frame region at gpfn %#x removed", gpfn)

    def unmap_gpfn(self, gpfn: int) -> bool:
        """Take the frame at ``gpfn`` back to VMM memory (content kept); False if none is there."""
        where = self.at.pop(gpfn, None)
        if where is None:
            return False
        self._list(where[0])[where[1]].detach()
        self.release_hole(gpfn)
        return True

    def drop_status(self) -> None:
        """Forget the status frames (v2 -> v1): unmapped from the guest first, their gfns holes
        again (RAM pages stay as they are, our regions outside RAM go)."""
        for frame in self.status:
            if frame.gpfn is not None:
                self.unmap_gpfn(frame.gpfn)
        self.status = []

    # -- save / restore ----------------------------------------------------------
    def to_state(self) -> dict:
        """The frames' gpfns, the content of frames not in guest RAM, and our hole gpfns."""
        shared, c1 = self._save(self.shared, "f")
        status, c2 = self._save(self.status, "s")
        return {"frames": shared, "status_frames": status, "content": {**c1, **c2},
                "holes": sorted(self.holes)}

    def _save(self, frames: list[Frame], tag: str) -> tuple[list, dict]:
        gpfns, content = [], {}
        for i, f in enumerate(frames):
            gpfns.append(f.gpfn)
            if f.gpfn is None or f.gpfn in self.holes:
                content[f"{tag}{i}"] = bytes(f.buf).hex()
        return gpfns, content

    def from_state(self, state: dict) -> None:
        """Rebuild from :meth:`to_state` (guest RAM restored separately; hole pages recreated)."""
        self.at.clear()
        for gpfn in state.get("holes", []):
            if gpfn not in self.holes:
                self.holes[gpfn] = self._restore_hole(int(gpfn))
        content = state.get("content", {})
        self.shared = self._build(state["frames"], "f", False, content) or [Frame(self.mem)]
        self.status = self._build(state.get("status_frames", []), "s", True, content)

    def _build(self, gpfns: list, tag: str, status: bool, content: dict) -> list[Frame]:
        out = []
        for i, gpfn in enumerate(gpfns):
            f = Frame(self.mem)
            data = content.get(f"{tag}{i}")
            if data is not None:
                f.buf[:] = bytes.fromhex(data)
            if gpfn is not None:
                f.attach(int(gpfn), self.page_for(int(gpfn), f"grant-frame-{i}"), copy=data is not None)
                self.at[int(gpfn)] = (status, i)
            out.append(f)
        return out

    def _restore_hole(self, gpfn: int) -> "Region":
        """The one-page region at ``gpfn``: the one whoever restored the memory map recreated, or
        a new one."""
        gpa = gpfn << PAGE_SHIFT
        r = self.mem.region_at(gpa)
        if r is not None and r.gpa == gpa and r.size == PAGE_SIZE and not r.ram:
            return r
        return self.mem.add_region(gpa, PAGE_SIZE, f"grant-frame@{gpfn:#x}")
