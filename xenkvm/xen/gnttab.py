"""Grant tables, versions 1 and 2: the guest's hypercalls and the VMM backends' API.

The table is a list of 4 KiB *frames* of grant entries (v1: 8-byte entries,
512 a frame; v2: 16-byte entries, 256 a frame, plus *status frames* of one
uint16 per entry).  The guest reaches a frame by mapping it into its physical
address space with ``XENMEM_add_to_physmap(space=grant_table, idx, gpfn)``
(:meth:`GrantTable.map_frame`); until then the frame lives in VMM memory.
Once mapped, the page at ``gpfn`` *is* the frame's storage: a RAM page if
gpfn is inside guest RAM, else a one-page region added in the hole (a new
memslot).  Moving a frame to another gpfn moves its content.

Backends in the VMM (the I/O thread) read and write granted pages through
:meth:`GrantTable.copy_from`, :meth:`GrantTable.copy_to` and
:meth:`GrantTable.map`, named by the granting domain and the grant ref.  Each
access pins the entry as Xen does: the entry must be ``GTF_permit_access``
for the backend's domid, ``GTF_readonly`` forbids writing, and
``GTF_reading``/``GTF_writing`` are set (compare-and-swap on the 32-bit word
holding flags and domid in v1; in the status word in v2) for as long as the
access lasts, so that the guest's ``gnttab_end_foreign_access`` sees it.
Failures raise :class:`GrantError` carrying the ``GNTST_*`` code Xen returns
in the same case.

Xen facts followed (xen/common/grant_table.c, Xen 4.17, re-stated):

* the table starts with one frame, version 1; it grows on ``setup_table``
  and on ``add_to_physmap`` of a higher index, up to ``max_frames``;
* ``set_version`` may change version only while no entry past the 8
  toolstack-reserved ones is pinned (``-EBUSY``); it clears every frame but
  keeps (and converts) the reserved entries; v2 -> v1 with a reserved entry
  that v1 cannot hold is ``-ERANGE``; status frames exist only in v2;
* ``query_size``, ``setup_table``, ``get_status_frames``, ``set_version``,
  ``get_version`` take count == 1 (else ``-EINVAL``) and report per-call
  problems in the struct's ``status`` field (``GNTST_*``);
* frame lists report the gfn where each frame is mapped, or ~0 (Xen's
  INVALID_GFN through an unset M2P entry) for an unmapped one;
* copy: both offsets + len within the page (else ``GNTST_bad_copy_arg``),
  by-gmfn only for ``DOMID_SELF`` (else ``GNTST_permission_denied``),
  sub-page v2 grants bound the copy (``GNTST_general_error``), transitive
  grants are followed one level and never for maps;
* a frame moved to another gfn leaves its old gfn (add_to_physmap unmaps a
  grant frame from its old location before mapping it at the new one); a
  frame's page outside RAM is a one-page memslot that goes with it, so the
  guest holds at most one slot per frame, and at most
  ``Limits.max_guest_memslots`` (-ENOMEM past it, as Xen when the p2m
  cannot grow);
* backends (the VMM is the mapping domain) hold at most
  ``Limits.max_maptrack_entries`` mappings; one more is ``GNTST_no_space``
  (Xen: no maptrack handle);
* a HVM guest mapping a grant into its own physmap is not supported here:
  map gives ``GNTST_general_error``, unmap ``GNTST_bad_handle`` (no handle
  is ever issued).
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.kvm._kvm_cffi import ffi as kffi
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.machine.memory import GuestMemoryError, RegionRefused
from xenkvm.xen.abi import (DOMID_SELF, PAGE_SHIFT, PAGE_SIZE, Errno, GnttabOp, Gntst, Hypercall,
                            HvmParam, XenStruct, ffi, handle_offset, lib)
from xenkvm.xen.errors import HypercallError, einval
from xenkvm.xen.limits import DEFAULT_MAX_GRANT_FRAMES as DEFAULT_MAX_FRAMES
from xenkvm.xen.limits import of as limits_of

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call, Dispatcher
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

#: Entries 0-7 belong to the toolstack (0: console, 1: xenstore) and survive set_version.
RESERVED_ENTRIES = 8
RESERVED_CONSOLE = 0
RESERVED_XENSTORE = 1
#: Most ops one batched hypercall may carry (no continuations here; Linux uses a few hundred).
MAX_BATCH = 4096
INVALID_GFN = (1 << 64) - 1
STATUS_IDX = lib.XENMAPIDX_grant_table_status

V1_SIZE = ffi.sizeof("struct grant_entry_v1")
V2_SIZE = lib.XK_SIZEOF_grant_entry_v2
STATUS_SIZE = lib.XK_SIZEOF_grant_status
V1_PER_FRAME = PAGE_SIZE // V1_SIZE
V2_PER_FRAME = PAGE_SIZE // V2_SIZE
STATUS_PER_FRAME = PAGE_SIZE // STATUS_SIZE

GTF_permit_access = lib.GTF_permit_access
GTF_transitive = lib.GTF_transitive
GTF_type_mask = lib.GTF_type_mask
GTF_readonly = lib.GTF_readonly
GTF_reading = lib.GTF_reading
GTF_writing = lib.GTF_writing
GTF_sub_page = lib.GTF_sub_page

# Entry layouts (offsets from the compiled headers).
V1_FRAME = ffi.offsetof("struct grant_entry_v1", "frame")
V2_FULL_FRAME = ffi.offsetof("xk_gnt_v2_full_page", "frame")
V2_SUB_OFF = ffi.offsetof("xk_gnt_v2_sub_page", "page_off")
V2_SUB_LEN = ffi.offsetof("xk_gnt_v2_sub_page", "length")
V2_SUB_FRAME = ffi.offsetof("xk_gnt_v2_sub_page", "frame")
V2_TRANS_DOMID = ffi.offsetof("xk_gnt_v2_transitive", "trans_domid")
V2_TRANS_GREF = ffi.offsetof("xk_gnt_v2_transitive", "gref")
assert ffi.offsetof("struct grant_entry_v1", "flags") == 0 and ffi.offsetof("struct grant_entry_v1", "domid") == 2
assert ffi.offsetof("struct grant_entry_header", "flags") == 0
assert ffi.offsetof("struct grant_entry_header", "domid") == 2

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
PTR_U = lib.XK_OFF_gnttab_copy_ptr__u
PTR_DOMID = lib.XK_OFF_gnttab_copy_ptr__domid
PTR_OFFSET = lib.XK_OFF_gnttab_copy_ptr__offset
COPY_LEN = COPY.offset("len")
COPY_FLAGS = COPY.offset("flags")
COPY_STATUS = COPY.offset("status")

_U16 = struct.Struct("<H")
_I16 = struct.Struct("<h")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CAS_RETRIES = 5  #: as Xen: a guest flipping flags faster than we CAS makes the pin fail
_MASK32 = 0xFFFF_FFFF


class GrantError(Exception):
    """A grant access refused; ``status`` is the GNTST_* code (negative)."""

    def __init__(self, status: int, why: str = ""):
        self.status = int(status)
        super().__init__(f"{Gntst(self.status).name}: {why}" if why else Gntst(self.status).name)


class _Frame:
    """One 4 KiB frame of the table: VMM memory until mapped, then the guest page at ``gpfn``."""

    __slots__ = ("buf", "addr", "ptr", "gpfn", "_own")

    def __init__(self) -> None:
        self.gpfn: int | None = None
        self._own_storage(bytearray(PAGE_SIZE))

    def _own_storage(self, data: bytearray) -> None:
        cdata = kffi.from_buffer(data)
        self._own = (data, cdata)
        self.buf = memoryview(data)
        self.addr = int(kffi.cast("uintptr_t", cdata))
        self.ptr = kffi.cast("char *", self.addr)

    def attach(self, gpfn: int, view: memoryview, addr: int, copy: bool = True) -> None:
        if copy:
            view[:] = bytes(self.buf)
        self.buf, self.addr, self.gpfn, self._own = view, addr, gpfn, None
        self.ptr = kffi.cast("char *", addr)

    def detach(self) -> None:
        """Keep the content in VMM memory; the guest page stays as it is."""
        self._own_storage(bytearray(self.buf))
        self.gpfn = None

    def clear(self) -> None:
        self.buf[:] = bytes(PAGE_SIZE)


@dataclass
class _Pin:
    """An active (pinned) entry: Xen's active_grant_entry, reduced."""

    pins: int
    writers: int
    gfn: int
    page_off: int
    length: int
    inner: int | None = None   #: the ref a transitive grant points to (pinned too)
    page: memoryview | None = None  #: the granted page (set when first pinned)


class GrantMapping:
    """A backend's mapping of one granted page; ``unmap()`` (or leaving ``with``) ends it."""

    def __init__(self, table: "GrantTable", ref: int, writable: bool, gfn: int, view: memoryview):
        self.table = table
        self.ref = ref
        self.writable = writable
        self.gfn = gfn
        self.view = view if writable else view.toreadonly()
        self.mapped = True

    def unmap(self) -> None:
        """Drop the pin (clears GTF_reading/GTF_writing when it was the last); safe to repeat."""
        with self.table.domain.lock:
            if not self.mapped:
                return
            self.mapped = False
            self.table.mappings -= 1
            try:
                self.view.release()
            except BufferError:   # someone still holds an export of it; it stays readable
                pass
            self.table._release(self.ref, not self.writable)

    def __enter__(self) -> "GrantMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.unmap()

    def __repr__(self) -> str:
        return f"GrantMapping(ref={self.ref}, gfn={self.gfn:#x}, {'rw' if self.writable else 'ro'}, mapped={self.mapped})"


_expected = threading.local()


def _cas32(ptr, expected: int, desired: int) -> tuple[bool, int]:
    """Compare-and-swap the 32-bit word at ``ptr`` (a cffi char pointer)."""
    exp = getattr(_expected, "cell", None)
    if exp is None:
        exp = _expected.cell = kffi.new("uint32_t *")
    exp[0] = expected
    ok = klib.xk_cmpxchg32(ptr, exp, desired)
    return bool(ok), exp[0]


def _load32(ptr) -> int:
    return kffi.cast("uint32_t *", ptr)[0]


class GrantTable:
    """The domain's grant table (owned by XenDomain; all changes under ``domain.lock``)."""

    def __init__(self, domain: "XenDomain", max_frames: int | None = None, max_version: int = 2):
        limits = limits_of(domain)
        if max_frames is None:
            max_frames = limits.max_grant_frames
        if not 1 <= max_frames <= 1024:
            raise ValueError(f"grant table max_frames {max_frames}: need 1..1024")
        self.domain = domain
        self.mem = domain.mem
        self.max_frames = max_frames
        self.max_version = max_version
        self.max_hole_slots = limits.max_guest_memslots
        self.max_mappings = limits.max_maptrack_entries
        self.mappings = 0   #: live GrantMappings (Xen's maptrack entries of the mapping domain)
        self.version = 1
        self.frames: list[_Frame] = [_Frame()]
        self.status: list[_Frame] = []
        self._active: dict[int, _Pin] = {}
        #: one-page regions this table added outside RAM, by gpfn: one per mapped frame, removed
        #: when the frame leaves that gpfn
        self._holes: dict[int, object] = {}
        #: gpfn -> (is_status, idx) for every frame mapped in the guest
        self._at: dict[int, tuple[bool, int]] = {}
        self._seed_reserved()

    @property
    def domid(self) -> int:
        return self.domain.domid

    # -- geometry ------------------------------------------------------------
    @property
    def nr_frames(self) -> int:
        return len(self.frames)

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        self._version = version
        self.per_frame = V1_PER_FRAME if version == 1 else V2_PER_FRAME
        self.entry_size = V1_SIZE if version == 1 else V2_SIZE

    @property
    def nr_entries(self) -> int:
        return len(self.frames) * self.per_frame

    @staticmethod
    def status_frames_for(nr_frames: int) -> int:
        return -(-nr_frames * V2_PER_FRAME // STATUS_PER_FRAME)

    def _entry(self, ref: int) -> tuple[_Frame, int]:
        frame = self.frames[ref // self.per_frame]
        return frame, (ref % self.per_frame) * self.entry_size

    def _status_word(self, ref: int) -> tuple[int, int]:
        """(host address of the aligned 32-bit word, shift of ref's uint16 in it)."""
        frame = self.status[ref // STATUS_PER_FRAME]
        off = (ref % STATUS_PER_FRAME) * STATUS_SIZE
        return frame.ptr + (off & ~3), (off & 2) * 8

    def _grow(self, nr_frames: int) -> None:
        while len(self.frames) < nr_frames:
            self.frames.append(_Frame())
        if self.version == 2:
            while len(self.status) < self.status_frames_for(len(self.frames)):
                self.status.append(_Frame())

    # -- entries (VMM side) ----------------------------------------------------
    def seed(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """Write a full-page permit_access entry, as the toolstack does for refs 0 and 1."""
        with self.domain.lock:
            frame, off = self._entry(ref)
            flags = GTF_permit_access | (GTF_readonly if readonly else 0)
            if self.version == 1:
                struct.pack_into("<HHI", frame.buf, off, flags, domid, gfn)
            else:
                frame.buf[off:off + V2_SIZE] = bytes(V2_SIZE)
                _U64.pack_into(frame.buf, off + V2_FULL_FRAME, gfn)
                _U16.pack_into(frame.buf, off + 2, domid)
                _U16.pack_into(frame.buf, off, flags)

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
            frame, off = self._entry(ref)
            flags, domid = struct.unpack_from("<HH", frame.buf, off)
            if self.version == 1:
                return {"flags": flags, "domid": domid, "frame": _U32.unpack_from(frame.buf, off + V1_FRAME)[0]}
            addr, shift = self._status_word(ref)
            out = {"flags": flags, "domid": domid, "status": (_load32(addr) >> shift) & 0xFFFF}
            if flags & GTF_type_mask == GTF_transitive:
                out["trans_domid"] = _U16.unpack_from(frame.buf, off + V2_TRANS_DOMID)[0]
                out["gref"] = _U32.unpack_from(frame.buf, off + V2_TRANS_GREF)[0]
            elif flags & GTF_sub_page:
                out["page_off"], out["length"] = struct.unpack_from("<HH", frame.buf, off + V2_SUB_OFF)
                out["frame"] = _U64.unpack_from(frame.buf, off + V2_SUB_FRAME)[0]
            else:
                out["frame"] = _U64.unpack_from(frame.buf, off + V2_FULL_FRAME)[0]
            return out

    # -- frames in the guest physmap ------------------------------------------
    def map_frame(self, idx: int, gpfn: int) -> None:
        """XENMEM_add_to_physmap(XENMAPSPACE_grant_table): show frame ``idx`` at ``gpfn``.

        ``idx`` with XENMAPIDX_grant_table_status names a status frame (v2 only;
        in v1 the bit makes the index out of range, as in Xen).  Raises
        HypercallError(EINVAL) for an index past the maximum or a gpfn that
        cannot hold the frame.
        """
        if not 0 <= gpfn < 1 << (52 - PAGE_SHIFT):
            raise einval(f"gpfn {gpfn:#x} out of range")
        with self.domain.lock:
            status = self.version == 2 and bool(idx & STATUS_IDX)
            if status:
                idx &= ~STATUS_IDX
                if idx >= len(self.status):
                    need = -(-(idx + 1) * STATUS_PER_FRAME // V2_PER_FRAME)
                    if need <= self.max_frames:
                        self._grow(need)
                    if idx >= len(self.status):
                        raise einval(f"grant status frame {idx} beyond the maximum")
                frames = self.status
            else:
                if idx >= self.max_frames:
                    raise einval(f"grant frame {idx:#x} beyond the maximum {self.max_frames}")
                self._grow(idx + 1)
                frames = self.frames
            frame = frames[idx]
            if frame.gpfn == gpfn:
                return
            view, addr = self._page_for_moving(frame, gpfn, f"grant-{'status' if status else 'frame'}-{idx}")
            other = self._at.pop(gpfn, None)
            if other is not None:   # the gpfn held another frame: Xen unmaps that one
                (self.status if other[0] else self.frames)[other[1]].detach()
            old = frame.gpfn
            if old is not None:
                del self._at[old]
            frame.attach(gpfn, view, addr)
            self._at[gpfn] = (status, idx)
            if old is not None:
                # Xen unmaps a grant frame from its old gfn before mapping it at the new
                # one: the old gfn is a hole again, and its memslot (if we added one) goes.
                self._release_hole(old)
            log.debug("grant %s frame %d at gpfn %#x", "status" if status else "shared", idx, gpfn)

    def _page_for_moving(self, frame: _Frame, gpfn: int, name: str) -> tuple[memoryview, int]:
        """The page at ``gpfn`` for ``frame``; when no memslot is left and the frame holds one
        outside RAM, that one is freed first (Xen unmaps the old gfn before mapping the new: if
        the new one then fails too, the frame stays unmapped, as there)."""
        try:
            return self._page_for(gpfn, name)
        except HypercallError as e:
            old = frame.gpfn
            if e.errno != Errno.ENOMEM or old is None or old not in self._holes:
                raise
            del self._at[old]
            frame.detach()
            self._release_hole(old)
            return self._page_for(gpfn, name)

    def _page_for(self, gpfn: int, name: str) -> tuple[memoryview, int]:
        gpa = gpfn << PAGE_SHIFT
        region = self._holes.get(gpfn)
        if region is None:
            for r in self.mem.regions:
                if r.gpa <= gpa < r.end:
                    if not r.ram:
                        raise einval(f"gpfn {gpfn:#x} is in region {r.name}")
                    return self.mem.view(gpa, PAGE_SIZE), self.mem.host_address(gpa, PAGE_SIZE)
            if len(self._holes) >= self.max_hole_slots:
                # Xen: -ENOMEM when the p2m cannot take another entry.
                raise HypercallError(Errno.ENOMEM, f"grant frame at gpfn {gpfn:#x}: all "
                                     f"{self.max_hole_slots} memslots for grant frames in use")
            try:
                region = self.mem.add_region(gpa, PAGE_SIZE, name)
            except RegionRefused as e:
                log.warning("grant frame at gpfn %#x: %s", gpfn, e)
                raise HypercallError(Errno.ENOMEM, str(e)) from None
            except GuestMemoryError as e:
                log.warning("grant frame at gpfn %#x: %s", gpfn, e)
                raise einval(str(e)) from None
            self._holes[gpfn] = region
        return region.view[:PAGE_SIZE], region.host_addr

    def _release_hole(self, gpfn: int) -> None:
        """Remove the region this table added at ``gpfn`` once no frame is mapped there."""
        if gpfn in self._at:
            return
        region = self._holes.pop(gpfn, None)
        if region is not None:
            self.mem.remove_region(region)
            log.debug("grant frame region at gpfn %#x removed", gpfn)

    def unmap_gpfn(self, gpfn: int) -> bool:
        """XENMEM_remove_from_physmap of a gpfn holding a grant frame: the frame goes back to
        VMM memory (content kept).  False if no frame is mapped there."""
        with self.domain.lock:
            where = self._at.pop(gpfn, None)
            if where is None:
                return False
            (self.status if where[0] else self.frames)[where[1]].detach()
            self._release_hole(gpfn)
            return True

    def frame_gfn(self, idx: int, status: bool = False) -> int:
        frames = self.status if status else self.frames
        gpfn = frames[idx].gpfn
        return INVALID_GFN if gpfn is None else gpfn

    # -- pins --------------------------------------------------------------------
    def _acquire(self, ref: int, ldomid: int, readonly: bool, mapping: bool,
                 transitive: bool = True) -> _Pin:
        """Pin ``ref`` for domain ``ldomid`` (Xen's _set_status + active entry)."""
        if not 0 <= ref < self.nr_entries:
            raise GrantError(Gntst.bad_gntref, f"ref {ref} of {self.nr_entries}")
        act = self._active.get(ref)
        pinned = act is not None
        per = self.per_frame
        frame = self.frames[ref // per]
        off = (ref % per) * self.entry_size
        mask = GTF_type_mask | (GTF_sub_page if mapping else 0)
        if self._version == 1:
            word_addr = frame.ptr + off
            word = _U32.unpack_from(frame.buf, off)[0]
            for attempt in range(_CAS_RETRIES):
                flags, dom = word & 0xFFFF, word >> 16
                if not pinned and (flags & mask != GTF_permit_access or dom != ldomid):
                    raise GrantError(Gntst.general_error, f"ref {ref}: flags {flags:#x} domid {dom}, expected d{ldomid}")
                if not readonly and flags & GTF_readonly:
                    raise GrantError(Gntst.general_error, f"ref {ref}: write access to a read-only grant")
                new = word | GTF_reading | (0 if readonly else GTF_writing)
                ok, word = _cas32(word_addr, word, new)
                if ok:
                    break
            else:
                raise GrantError(Gntst.general_error, f"ref {ref}: entry is unstable")
            if not pinned:
                gfn = _U32.unpack_from(frame.buf, off + V1_FRAME)[0]
                act = _Pin(0, 0, gfn, 0, PAGE_SIZE)
        else:
            act = self._acquire_v2(ref, ldomid, readonly, mapping, transitive, act, frame, off, mask)
        if pinned and act.inner is not None:
            try:   # a transitive grant pins the grant it names once per pin
                self._acquire(act.inner, self.domid, readonly, False, transitive=False)
            except GrantError:
                if not readonly and act.writers == 0:
                    self._clear_flags(ref, GTF_writing)
                raise
        if not pinned:
            if act.page is None:
                try:
                    act.page = self.mem.view(act.gfn << PAGE_SHIFT, PAGE_SIZE)
                except GuestMemoryError:
                    self._clear_flags(ref, GTF_reading | GTF_writing)
                    raise GrantError(Gntst.bad_page, f"ref {ref}: gfn {act.gfn:#x} is not guest memory") from None
            self._active[ref] = act
        act.pins += 1
        if not readonly:
            act.writers += 1
        return act

    def _acquire_v2(self, ref, ldomid, readonly, mapping, transitive, act, frame, off, mask) -> _Pin:
        pinned = act is not None
        flags, dom = struct.unpack_from("<HH", frame.buf, off)

        def valid(flags: int, dom: int) -> bool:
            kind = flags & mask
            return (kind == GTF_permit_access or (not mapping and kind == GTF_transitive)) and dom == ldomid

        if not pinned and not valid(flags, dom):
            raise GrantError(Gntst.general_error, f"ref {ref}: flags {flags:#x} domid {dom}, expected d{ldomid}")
        if not readonly and flags & GTF_readonly:
            raise GrantError(Gntst.general_error, f"ref {ref}: write access to a read-only grant")
        set_bits = GTF_reading | (0 if readonly else GTF_writing)
        addr, shift = self._status_word(ref)
        klib.xk_fetch_or32(addr, set_bits << shift)
        klib.xk_mb()
        # The guest may have revoked the entry between our check and the status update.
        flags, dom = struct.unpack_from("<HH", frame.buf, off)
        if not pinned and (not valid(flags, dom) or (not readonly and flags & GTF_readonly)):
            self._clear_flags(ref, GTF_reading | GTF_writing)
            raise GrantError(Gntst.general_error, f"ref {ref}: entry changed while pinning")
        if pinned:
            if not readonly and flags & GTF_readonly:
                if act.writers == 0:
                    self._clear_flags(ref, GTF_writing)
                raise GrantError(Gntst.general_error, f"ref {ref}: grant became read-only")
            return act
        if flags & GTF_type_mask == GTF_transitive:
            return self._follow(ref, frame, off, ldomid, readonly, transitive)
        if flags & GTF_sub_page:
            page_off, length = struct.unpack_from("<HH", frame.buf, off + V2_SUB_OFF)
            gfn = _U64.unpack_from(frame.buf, off + V2_SUB_FRAME)[0]
            return _Pin(0, 0, gfn, page_off, length)
        return _Pin(0, 0, _U64.unpack_from(frame.buf, off + V2_FULL_FRAME)[0], 0, PAGE_SIZE)

    def _follow(self, ref, frame, off, ldomid, readonly, transitive) -> _Pin:
        """A transitive grant: pin the grant it names (one level; only this domain's table)."""
        trans_domid = _U16.unpack_from(frame.buf, off + V2_TRANS_DOMID)[0]
        gref = _U32.unpack_from(frame.buf, off + V2_TRANS_GREF)[0]
        try:
            if not transitive:
                raise GrantError(Gntst.general_error, f"ref {ref}: nested transitive grant")
            if trans_domid != self.domid:
                raise GrantError(Gntst.general_error, f"ref {ref}: transitive grant to unknown d{trans_domid}")
            inner = self._acquire(gref, self.domid, readonly, False, transitive=False)
        except GrantError:
            self._clear_flags(ref, GTF_reading | GTF_writing)
            raise
        return _Pin(0, 0, inner.gfn, inner.page_off, inner.length, inner=gref, page=inner.page)

    def _release(self, ref: int, readonly: bool) -> None:
        act = self._active.get(ref)
        if act is None:
            return
        act.pins -= 1
        if not readonly:
            act.writers -= 1
        clear = 0
        if act.writers == 0:
            clear |= GTF_writing
        if act.pins == 0:
            clear |= GTF_reading
            del self._active[ref]
        if clear and ref < self.nr_entries:
            self._clear_flags(ref, clear)
        if act.inner is not None:
            self._release(act.inner, readonly)

    def _clear_flags(self, ref: int, bits: int) -> None:
        if self._version == 1:
            frame, off = self._entry(ref)
            klib.xk_fetch_and32(frame.ptr + off, ~bits & _MASK32)
        else:
            addr, shift = self._status_word(ref)
            klib.xk_fetch_and32(addr, ~(bits << shift) & _MASK32)

    @property
    def pinned(self) -> dict[int, tuple[int, int]]:
        """ref -> (pins, writers) of every active entry."""
        return {ref: (a.pins, a.writers) for ref, a in self._active.items()}

    # -- backend API -------------------------------------------------------------
    def _check_granter(self, domid: int) -> None:
        if domid != self.domid:
            raise GrantError(Gntst.bad_domain, f"no grant table for d{domid}")

    def _check_range(self, act: _Pin, offset: int, length: int, ref: int) -> None:
        if offset < act.page_off or offset + length > act.page_off + act.length:
            raise GrantError(Gntst.general_error,
                             f"ref {ref}: {offset}+{length} outside the grant {act.page_off}+{act.length}")

    def copy_from(self, domid: int, ref: int, offset: int, length: int, *, backend: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset`` of the page domain ``domid`` granted to ``backend`` as ``ref``."""
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GrantError(Gntst.bad_copy_arg, f"{offset}+{length} beyond the page")
        with self.domain.lock:
            self._check_granter(domid)
            act = self._acquire(ref, backend, True, False)
            try:
                self._check_range(act, offset, length, ref)
                return bytes(act.page[offset:offset + length])
            finally:
                self._release(ref, True)

    def copy_to(self, domid: int, ref: int, offset: int, data: bytes | bytearray | memoryview,
                *, backend: int = 0) -> None:
        """Write ``data`` at ``offset`` of the granted page (the grant must not be read-only)."""
        length = len(data)
        if offset < 0 or offset + length > PAGE_SIZE:
            raise GrantError(Gntst.bad_copy_arg, f"{offset}+{length} beyond the page")
        with self.domain.lock:
            self._check_granter(domid)
            act = self._acquire(ref, backend, False, False)
            try:
                self._check_range(act, offset, length, ref)
                act.page[offset:offset + length] = data
            finally:
                self._release(ref, False)

    def map(self, domid: int, ref: int, writable: bool, *, backend: int = 0) -> GrantMapping:
        """Map the whole granted page; the entry stays pinned (flags set) until ``unmap()``.

        At most ``max_mappings`` live at once (Xen's maptrack limit of the mapping
        domain: past it, map_grant_ref reports GNTST_no_space).
        """
        with self.domain.lock:
            self._check_granter(domid)
            if self.mappings >= self.max_mappings:
                raise GrantError(Gntst.no_space, f"all {self.max_mappings} maptrack entries in use")
            act = self._acquire(ref, backend, not writable, True)
            self.mappings += 1
            return GrantMapping(self, ref, writable, act.gfn, act.page[:])

    def map_refs(self, domid: int, refs: list[int], writable: bool, *, backend: int = 0) -> list[GrantMapping]:
        """Map several refs (multi-page rings): all or none."""
        done: list[GrantMapping] = []
        try:
            for ref in refs:
                done.append(self.map(domid, ref, writable, backend=backend))
        except GrantError:
            for m in done:
                m.unmap()
            raise
        return done

    # -- hypercalls ----------------------------------------------------------------
    def register_hypercalls(self, dispatcher: "Dispatcher") -> None:
        for op, fn in ((GnttabOp.setup_table, self.op_setup_table),
                       (GnttabOp.query_size, self.op_query_size),
                       (GnttabOp.set_version, self.op_set_version),
                       (GnttabOp.get_version, self.op_get_version),
                       (GnttabOp.get_status_frames, self.op_get_status_frames),
                       (GnttabOp.copy, self.op_copy),
                       (GnttabOp.map_grant_ref, self.op_map_grant_ref),
                       (GnttabOp.unmap_grant_ref, self.op_unmap_grant_ref)):
            dispatcher.register_subop(Hypercall.grant_table_op, op, fn)

    @staticmethod
    def _count(call: "Call") -> int:
        count = call.args[2] & _MASK32
        if count >= 1 << 31:
            raise einval(f"count {count:#x}")
        return count

    def _single(self, call: "Call") -> None:
        if self._count(call) != 1:
            raise einval("count must be 1")

    def _batch(self, call: "Call") -> int:
        count = self._count(call)
        if count > MAX_BATCH:
            raise einval(f"count {count} over the batch limit {MAX_BATCH}")
        return count

    def _dom_status(self, dom: int) -> int:
        """GNTST code for a guest naming domain ``dom`` (only itself has a table it may see)."""
        if dom in (DOMID_SELF, self.domid):
            return Gntst.okay
        # Domain 0 exists (the VMM's backends) but a domU may not look at it (XSM).
        return Gntst.permission_denied if dom == 0 else Gntst.bad_domain

    @staticmethod
    def _write_status(call: "Call", gva: int, value: int) -> None:
        call.guest.write(gva, _I16.pack(value))

    def op_setup_table(self, call: "Call", uop: int) -> int:
        self._single(call)
        op = call.guest.read_struct(SETUP, uop)
        status = self._dom_status(op.dom)
        if status == Gntst.okay:
            if op.nr_frames > self.max_frames:
                status = Gntst.general_error
            else:
                self._grow(op.nr_frames)
                lst = call.guest.read_u64(uop + SETUP_LIST)
                for i in range(op.nr_frames):
                    try:
                        call.guest.write_u64(lst + 8 * i, self.frame_gfn(i))
                    except HypercallError:
                        status = Gntst.bad_virt_addr
        self._write_status(call, uop + SETUP.offset("status"), status)
        return 0

    def op_query_size(self, call: "Call", uop: int) -> int:
        self._single(call)
        op = call.guest.read_struct(QUERY, uop)
        op.status = self._dom_status(op.dom)
        if op.status == Gntst.okay:
            op.nr_frames = self.nr_frames
            op.max_nr_frames = self.max_frames
        call.guest.write_struct(QUERY, uop, op)
        return 0

    def op_get_version(self, call: "Call", uop: int) -> int:
        self._single(call)
        op = call.guest.read_struct(GETVER, uop)
        status = self._dom_status(op.dom)
        if status == Gntst.bad_domain:
            raise HypercallError(Errno.ESRCH)
        if status != Gntst.okay:
            raise HypercallError(Errno.EPERM)
        op.version = self.version
        call.guest.write_struct(GETVER, uop, op)
        return 0

    def op_set_version(self, call: "Call", uop: int) -> int:
        self._single(call)
        op = call.guest.read_struct(SETVER, uop)
        res = self.set_version(op.version)
        op.version = self.version
        call.guest.write_struct(SETVER, uop, op)
        return res

    def set_version(self, version: int) -> int:
        """Switch the table to ``version``; returns 0 or -errno (the hypercall's result)."""
        if version not in (1, 2):
            return -Errno.EINVAL
        if version == 2 and self.max_version < 2:
            return -Errno.ENOSYS
        if version == self.version:
            return 0
        busy = [ref for ref in self._active if ref >= RESERVED_ENTRIES]
        if busy:
            log.info("grant set_version %d: %d entries in use (first ref %d)", version, len(busy), min(busy))
            return -Errno.EBUSY
        # Keep the reserved entries, as (flags incl. reading/writing, domid, frame).
        kept: list[tuple[int, int, int]] = []
        for ref in range(RESERVED_ENTRIES):
            frame, off = self._entry(ref)
            flags, dom = struct.unpack_from("<HH", frame.buf, off)
            if self.version == 1:
                kept.append((flags, dom, _U32.unpack_from(frame.buf, off + V1_FRAME)[0]))
                continue
            kind = flags & GTF_type_mask
            gfn = _U64.unpack_from(frame.buf, off + V2_FULL_FRAME)[0]
            if kind == GTF_transitive or (kind == GTF_permit_access and gfn >> 32):
                return -Errno.ERANGE   # v1 cannot hold it
            if kind == GTF_permit_access:
                addr, shift = self._status_word(ref)
                kept.append((flags | (_load32(addr) >> shift) & (GTF_reading | GTF_writing), dom, gfn))
            else:
                kept.append((0, 0, 0))
        if version == 1:
            self.status_to_vmm()
            self.status = []
        for frame in self.frames:
            frame.clear()
        self.version = version
        self._grow(self.nr_frames)   # status frames for v2
        for frame in self.status:
            frame.clear()
        for ref, (flags, dom, gfn) in enumerate(kept):
            frame, off = self._entry(ref)
            if version == 1:
                struct.pack_into("<HHI", frame.buf, off, flags, dom, gfn)
            else:
                addr, shift = self._status_word(ref)
                klib.xk_fetch_or32(addr, (flags & (GTF_reading | GTF_writing)) << shift)
                _U64.pack_into(frame.buf, off + V2_FULL_FRAME, gfn)
                struct.pack_into("<HH", frame.buf, off, flags & ~(GTF_reading | GTF_writing), dom)
        log.info("grant table version %d", version)
        return 0

    def status_to_vmm(self) -> None:
        """Unmap every status frame from the guest (Xen makes their gfns holes: RAM pages stay
        here, the one-page regions we added outside RAM go)."""
        for frame in self.status:
            if frame.gpfn is not None:
                gpfn = frame.gpfn
                self._at.pop(gpfn, None)
                frame.detach()
                self._release_hole(gpfn)

    def op_get_status_frames(self, call: "Call", uop: int) -> int:
        self._single(call)
        op = call.guest.read_struct(STATUS_FRAMES, uop)
        status = self._dom_status(op.dom)
        if status == Gntst.okay:
            if op.nr_frames > len(self.status):
                status = Gntst.general_error
            else:
                lst = call.guest.read_u64(uop + STATUS_LIST)
                for i in range(op.nr_frames):
                    try:
                        call.guest.write_u64(lst + 8 * i, self.frame_gfn(i, status=True))
                    except HypercallError:
                        status = Gntst.bad_virt_addr
        self._write_status(call, uop + STATUS_FRAMES.offset("status"), status)
        return 0

    def op_copy(self, call: "Call", uop: int) -> int:
        count = self._batch(call)
        for i in range(count):
            gva = uop + i * COPY.size
            raw = call.guest.read(gva, COPY.size)
            status = self._guest_copy(raw)
            self._write_status(call, gva + COPY_STATUS, status)
        return 0

    def _guest_copy(self, raw: bytes) -> int:
        length = _U16.unpack_from(raw, COPY_LEN)[0]
        flags = _U16.unpack_from(raw, COPY_FLAGS)[0]
        sides = []
        for base, gref_flag, readonly in ((COPY_SRC, lib.GNTCOPY_source_gref, True),
                                          (COPY_DST, lib.GNTCOPY_dest_gref, False)):
            u = _U64.unpack_from(raw, base + PTR_U)[0]
            dom = _U16.unpack_from(raw, base + PTR_DOMID)[0]
            off = _U16.unpack_from(raw, base + PTR_OFFSET)[0]
            by_ref = bool(flags & gref_flag)
            if not by_ref and dom != DOMID_SELF:
                return Gntst.permission_denied
            if by_ref and dom not in (DOMID_SELF, self.domid):
                return Gntst.bad_domain
            sides.append((by_ref, u & _MASK32 if by_ref else u, off, readonly))
        pinned: list[tuple[int, bool]] = []
        try:
            spans = []
            for by_ref, u, off, readonly in sides:
                if by_ref:
                    act = self._acquire(u, self.domid, readonly, False)
                    pinned.append((u, readonly))
                    spans.append((act.gfn, act.page_off, act.length, off))
                else:
                    if not self.mem.contains(u << PAGE_SHIFT, PAGE_SIZE):
                        return Gntst.bad_page
                    spans.append((u, 0, PAGE_SIZE, off))
            if any(off + length > PAGE_SIZE for *_, off in spans):
                return Gntst.bad_copy_arg
            for gfn, page_off, glen, off in spans:
                if off < page_off or off + length > page_off + glen:
                    return Gntst.general_error
            (sgfn, *_, soff), (dgfn, *_, doff) = spans
            data = bytes(self.mem.view((sgfn << PAGE_SHIFT) + soff, length))
            self.mem.view((dgfn << PAGE_SHIFT) + doff, length)[:] = data
            return Gntst.okay
        except GrantError as e:
            return e.status
        finally:
            for ref, readonly in reversed(pinned):
                self._release(ref, readonly)

    def op_map_grant_ref(self, call: "Call", uop: int) -> int:
        count = self._batch(call)
        for i in range(count):
            gva = uop + i * MAP.size
            op = call.guest.read_struct(MAP, gva)
            op.status = self._guest_map_status(op)
            call.guest.write_struct(MAP, gva, op)
        return 0

    def _guest_map_status(self, op) -> int:
        if not op.flags & (lib.GNTMAP_device_map | lib.GNTMAP_host_map):
            return Gntst.bad_gntref
        if op.flags & (lib.GNTMAP_device_map | lib.GNTMAP_application_map | lib.GNTMAP_contains_pte):
            return Gntst.general_error   # not for a HVM (paging_mode_external) domain
        if op.dom != self.domid:
            return Gntst.general_error if op.dom == 0 else Gntst.bad_domain
        if op.ref >= self.nr_entries:
            return Gntst.bad_gntref
        log.debug("guest map of its own grant ref %d: not supported", op.ref)
        return Gntst.general_error

    def op_unmap_grant_ref(self, call: "Call", uop: int) -> int:
        count = self._batch(call)
        for i in range(count):
            gva = uop + i * UNMAP.size
            call.guest.read_struct(UNMAP, gva)
            self._write_status(call, gva + UNMAP.offset("status"), Gntst.bad_handle)
        return 0

    # -- save / restore ------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain data: version, frames' gpfns, and the content of frames not in guest RAM."""
        with self.domain.lock:
            def frames(lst: list[_Frame], tag: str) -> tuple[list, dict]:
                gpfns, content = [], {}
                for i, f in enumerate(lst):
                    gpfns.append(f.gpfn)
                    if f.gpfn is None or f.gpfn in self._holes:
                        content[f"{tag}{i}"] = bytes(f.buf).hex()
                return gpfns, content
            shared, c1 = frames(self.frames, "f")
            status, c2 = frames(self.status, "s")
            return {"version": self.version, "max_frames": self.max_frames, "max_version": self.max_version,
                    "frames": shared, "status_frames": status, "content": {**c1, **c2},
                    "holes": sorted(self._holes)}

    def from_state(self, state: dict) -> None:
        """Restore onto a fresh table (guest RAM restored separately; hole pages recreated)."""
        with self.domain.lock:
            self.max_frames = int(state.get("max_frames", self.max_frames))
            self.max_version = int(state.get("max_version", self.max_version))
            self.version = int(state["version"])
            self._active.clear()
            self._at.clear()
            for gpfn in state.get("holes", []):
                if gpfn not in self._holes:
                    self._holes[gpfn] = self._restore_hole(int(gpfn))
            content = state.get("content", {})

            def build(gpfns: list, tag: str, status: bool) -> list[_Frame]:
                out = []
                for i, gpfn in enumerate(gpfns):
                    f = _Frame()
                    data = content.get(f"{tag}{i}")
                    if data is not None:
                        f.buf[:] = bytes.fromhex(data)
                    if gpfn is not None:
                        view, addr = self._page_for(int(gpfn), f"grant-frame-{i}")
                        f.attach(int(gpfn), view, addr, copy=data is not None)
                        self._at[int(gpfn)] = (status, i)
                    out.append(f)
                return out
            self.frames = build(state["frames"], "f", False) or [_Frame()]
            self.status = build(state.get("status_frames", []), "s", True)
            self._grow(len(self.frames))

    def _restore_hole(self, gpfn: int):
        gpa = gpfn << PAGE_SHIFT
        for r in self.mem.regions:   # already recreated by whoever restored the memory map
            if r.gpa == gpa and r.size == PAGE_SIZE and not r.ram:
                return r
        return self.mem.add_region(gpa, PAGE_SIZE, f"grant-frame@{gpfn:#x}")
