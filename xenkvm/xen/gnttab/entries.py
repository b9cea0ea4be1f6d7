"""The grant entry codecs: v1 and v2 as two sibling classes behind one interface.

An entry names a page the guest grants (flags, domid, frame); the table's
version decides its layout and where the ``GTF_reading``/``GTF_writing`` bits
live.  Everything version-specific is here, so the pin logic (pins.py) and the
table (table.py) choose a codec once (:func:`codec_for`) and never branch on
the version.  Layouts come from the compiled headers (``struct
grant_entry_v1``, the members of ``union grant_entry_v2``, ``grant_status_t``
through xen/abi.py): offsets *and* field widths, nothing counted by hand.

* v1: 8-byte entries (512 a frame); flags, domid and frame together; the busy
  bits are flags bits, set by compare-and-swap of the 32-bit word holding
  flags and domid (Xen's ``_set_status_v1``).
* v2: 16-byte entries (256 a frame): full-page, sub-page (``GTF_sub_page``:
  page_off + length) and transitive (``GTF_transitive``: trans_domid + gref);
  the busy bits live in a separate uint16 status entry in the status frames
  (Xen's ``_set_status_v2``: set them, barrier, re-read the entry).
"""
from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from typing import NamedTuple

from xenkvm.xen.abi import PAGE_SIZE, Gntst, ffi, lib
from xenkvm.xen.gnttab.errors import GrantError
from xenkvm.xen.gnttab.frames import Frames

GTF_permit_access = lib.GTF_permit_access
GTF_transitive = lib.GTF_transitive
GTF_type_mask = lib.GTF_type_mask
GTF_readonly = lib.GTF_readonly
GTF_reading = lib.GTF_reading
GTF_writing = lib.GTF_writing
GTF_sub_page = lib.GTF_sub_page
BUSY = GTF_reading | GTF_writing

#: As Xen's _set_status_v1: a guest flipping the entry faster than we can compare-and-swap
#: makes the pin fail after a few tries (a livelock otherwise).
CAS_RETRIES = 5

_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _field(ctype: str, name: str, base: int = 0) -> tuple[int, struct.Struct]:
    """(offset, unpacker) of field ``name`` of ``ctype``, both from the compiled header."""
    ftype = dict(ffi.typeof(ctype).fields)[name].type
    return base + ffi.offsetof(ctype, name), struct.Struct(_FORMATS[ffi.sizeof(ftype)])


V1_SIZE = ffi.sizeof("struct grant_entry_v1")
V2_SIZE = lib.XK_SIZEOF_grant_entry_v2
STATUS_SIZE = lib.XK_SIZEOF_grant_status
STATUS_PER_FRAME = PAGE_SIZE // STATUS_SIZE
HDR_FLAGS = _field("struct grant_entry_header", "flags")
HDR_DOMID = _field("struct grant_entry_header", "domid")
V1_FLAGS = _field("struct grant_entry_v1", "flags")
V1_DOMID = _field("struct grant_entry_v1", "domid")
V1_FRAME = _field("struct grant_entry_v1", "frame")
V2_FULL_FRAME = _field("xk_gnt_v2_full_page", "frame")
V2_SUB_OFF = _field("xk_gnt_v2_sub_page", "page_off")
V2_SUB_LEN = _field("xk_gnt_v2_sub_page", "length")
V2_SUB_FRAME = _field("xk_gnt_v2_sub_page", "frame")
V2_TRANS_DOMID = _field("xk_gnt_v2_transitive", "trans_domid")
V2_TRANS_GREF = _field("xk_gnt_v2_transitive", "gref")
# The busy bits are set on the 32-bit word at the entry's start: flags in its low half.
assert V1_FLAGS[0] == HDR_FLAGS[0] == 0 and V1_DOMID[0] == HDR_DOMID[0] == 2 and STATUS_SIZE == 2


def _get(buf, off: int, fld: tuple[int, struct.Struct]) -> int:
    """One field of an entry the guest may be writing: copied out whole first (struct alone reads
    a byte at a time and could see half an update: sharedwords.py)."""
    start = off + fld[0]
    return fld[1].unpack(bytes(buf[start:start + fld[1].size]))[0]


def _put(buf, off: int, fld: tuple[int, struct.Struct], value: int) -> None:
    """Store one field whole (``pack_into`` zero-fills it first, which the guest could see)."""
    start = off + fld[0]
    buf[start:start + fld[1].size] = fld[1].pack(value)


class Target(NamedTuple):
    """What a valid entry grants: a page range, or (transitive) another domain's grant."""

    gfn: int
    page_off: int = 0
    length: int = PAGE_SIZE
    trans: tuple[int, int] | None = None   #: (trans_domid, gref) of a transitive grant


def _full_page(gfn: int) -> Target:
    """``Target(gfn)`` without the NamedTuple's keyword handling (on every first pin)."""
    return tuple.__new__(Target, (gfn, 0, PAGE_SIZE, None))


class EntryCodec(ABC):
    """One table version's entry layout and busy-bit protocol (all calls under ``domain.lock``)."""

    version: int
    entry_size: int
    has_status: bool   #: whether the busy bits live in status frames

    def __init__(self, frames: Frames) -> None:
        self.frames = frames
        self.per_frame = PAGE_SIZE // self.entry_size

    @property
    def nr_entries(self) -> int:
        return len(self.frames.shared) * self.per_frame

    def locate(self, ref: int):
        """(frame, byte offset) of entry ``ref`` (a valid ref)."""
        return self.frames.shared[ref // self.per_frame], (ref % self.per_frame) * self.entry_size

    def header(self, ref: int) -> tuple[int, int]:
        """(flags, domid) of entry ``ref`` as the guest wrote them (one read of the 32-bit word)."""
        frame, off = self.locate(ref)
        word = frame.load32(off)
        return word & 0xFFFF, word >> 16

    @abstractmethod
    def status_frames_for(self, nr_shared: int) -> int:
        """How many status frames ``nr_shared`` shared frames need."""

    @abstractmethod
    def set_status(self, ref: int, ldomid: int, readonly: bool, mapping: bool,
                   pinned: bool, writers: int) -> None:
        """Mark ``ref`` in use (GTF_reading, and GTF_writing unless ``readonly``) for domain
        ``ldomid``, checking the entry as Xen's _set_status does; GrantError if refused (then
        nothing is left set that was not set before)."""

    @abstractmethod
    def target(self, ref: int) -> Target:
        """What entry ``ref`` grants (after a successful :meth:`set_status`)."""

    def claim(self, ref: int, ldomid: int, readonly: bool, mapping: bool) -> Target:
        """The first pin of ``ref``: :meth:`set_status` (not yet pinned), then :meth:`target`
        (one pass over the entry where the version allows)."""
        self.set_status(ref, ldomid, readonly, mapping, False, 0)
        return self.target(ref)

    @abstractmethod
    def busy(self, ref: int) -> int:
        """The entry's GTF_reading/GTF_writing bits."""

    @abstractmethod
    def clear_busy(self, ref: int, bits: int) -> None:
        """Atomically clear ``bits`` (of GTF_reading/GTF_writing) of entry ``ref``."""

    @abstractmethod
    def write(self, ref: int, flags: int, domid: int, gfn: int) -> None:
        """Write a full-page entry (the toolstack's seed, or a kept reserved entry); busy bits in
        ``flags`` go where this version keeps them."""

    @abstractmethod
    def keep(self, ref: int) -> tuple[int, int, int] | None:
        """A reserved entry as (flags with busy bits, domid, gfn) for a version switch; None if
        v1 could not hold it."""

    @abstractmethod
    def describe(self, ref: int) -> dict:
        """The entry as a dict (diagnostics and tests)."""


def _refused(ref: int, flags: int, dom: int, ldomid: int) -> GrantError:
    return GrantError(Gntst.general_error, f"ref {ref}: flags {flags:#x} domid {dom}, expected d{ldomid}")


def _read_only(ref: int) -> GrantError:
    return GrantError(Gntst.general_error, f"ref {ref}: write access to a read-only grant")


class EntryCodecV1(EntryCodec):
    """v1: ``struct grant_entry_v1``; busy bits in the flags, set by compare-and-swap."""

    version = 1
    entry_size = V1_SIZE
    has_status = False

    def status_frames_for(self, nr_shared: int) -> int:
        return 0

    def set_status(self, ref, ldomid, readonly, mapping, pinned, writers) -> None:
        frame, off = self.locate(ref)
        self._set_busy(ref, frame, off, ldomid, readonly, mapping, pinned)

    def claim(self, ref: int, ldomid: int, readonly: bool, mapping: bool) -> Target:
        frame, off = self.locate(ref)
        self._set_busy(ref, frame, off, ldomid, readonly, mapping, False)
        return _full_page(_get(frame.buf, off, V1_FRAME))

    @staticmethod
    def _set_busy(ref, frame, off, ldomid, readonly, mapping, pinned) -> None:
        # Xen (_set_status_v1): if not already pinned, the type (GTF_sub_page counted too for a
        # map) must be exactly GTF_permit_access and the domid ours; a write pin of a
        # GTF_readonly grant fails; the cmpxchg is retried a bounded number of times.
        mask = GTF_type_mask | (GTF_sub_page if mapping else 0)
        word = frame.load32(off)
        for _ in range(CAS_RETRIES):
            flags, dom = word & 0xFFFF, word >> 16
            if not pinned and (flags & mask != GTF_permit_access or dom != ldomid):
                raise _refused(ref, flags, dom, ldomid)
            if not readonly and flags & GTF_readonly:
                raise _read_only(ref)
            ok, word = frame.cmpxchg32(off, word, word | GTF_reading | (0 if readonly else GTF_writing))
            if ok:
                return
        raise GrantError(Gntst.general_error, f"ref {ref}: entry is unstable")

    def target(self, ref: int) -> Target:
        frame, off = self.locate(ref)
        return Target(_get(frame.buf, off, V1_FRAME))

    def busy(self, ref: int) -> int:
        return self.header(ref)[0] & BUSY

    def clear_busy(self, ref: int, bits: int) -> None:
        frame, off = self.locate(ref)
        frame.and32(off, ~bits)

    def write(self, ref: int, flags: int, domid: int, gfn: int) -> None:
        frame, off = self.locate(ref)
        _put(frame.buf, off, V1_FRAME, gfn)
        _put(frame.buf, off, V1_DOMID, domid)
        _put(frame.buf, off, V1_FLAGS, flags)

    def keep(self, ref: int) -> tuple[int, int, int]:
        flags, dom = self.header(ref)
        return flags, dom, self.target(ref).gfn

    def describe(self, ref: int) -> dict:
        flags, dom = self.header(ref)
        return {"flags": flags, "domid": dom, "frame": self.target(ref).gfn}


class EntryCodecV2(EntryCodec):
    """v2: ``union grant_entry_v2`` (full page, sub-page, transitive); busy bits in ``grant_status_t``."""

    version = 2
    entry_size = V2_SIZE
    has_status = True

    def status_frames_for(self, nr_shared: int) -> int:
        return -(-nr_shared * self.per_frame // STATUS_PER_FRAME)

    def _status_word(self, ref: int):
        """(status frame, offset of the aligned 32-bit word, shift of ref's uint16 in it)."""
        frame = self.frames.status[ref // STATUS_PER_FRAME]
        off = (ref % STATUS_PER_FRAME) * STATUS_SIZE
        return frame, off & ~3, (off & 2) * 8

    @staticmethod
    def _valid(flags: int, dom: int, ldomid: int, mapping: bool) -> bool:
        kind = flags & (GTF_type_mask | (GTF_sub_page if mapping else 0))
        # Transitive grants are followed for copies only, never for maps (no map path here).
        return (kind == GTF_permit_access or (not mapping and kind == GTF_transitive)) and dom == ldomid

    def set_status(self, ref, ldomid, readonly, mapping, pinned, writers) -> None:
        self._set_busy(ref, *self.locate(ref), ldomid, readonly, mapping, pinned, writers)

    def claim(self, ref: int, ldomid: int, readonly: bool, mapping: bool) -> Target:
        entry, eoff = self.locate(ref)
        flags = self._set_busy(ref, entry, eoff, ldomid, readonly, mapping, False, 0)
        return self._target_at(entry.buf, eoff, flags)

    def _set_busy(self, ref, entry, eoff, ldomid, readonly, mapping, pinned, writers) -> int:
        """set_status on entry ``ref`` (at ``eoff`` of frame ``entry``); returns the flags as
        re-read after the status bits were set."""
        # Xen (_set_status_v2): check the entry, set the status bits, full barrier so the guest
        # sees them before we look again, re-read: if the guest revoked or made it read-only in
        # between, undo and fail ("Unstable flags").  A pinned entry is not re-validated, but
        # turning read-only under a write pin still fails it.
        word = entry.load32(eoff)
        flags, dom = word & 0xFFFF, word >> 16
        if not pinned and not self._valid(flags, dom, ldomid, mapping):
            raise _refused(ref, flags, dom, ldomid)
        if not readonly and flags & GTF_readonly:
            raise _read_only(ref)
        frame, off, shift = self._status_word(ref)
        frame.or32(off, (GTF_reading | (0 if readonly else GTF_writing)) << shift)   # locked: a barrier
        word = entry.load32(eoff)
        flags, dom = word & 0xFFFF, word >> 16
        if not pinned and (not self._valid(flags, dom, ldomid, mapping) or (not readonly and flags & GTF_readonly)):
            self.clear_busy(ref, BUSY)
            raise GrantError(Gntst.general_error, f"ref {ref}: entry changed while pinning")
        if pinned and not readonly and flags & GTF_readonly:
            if writers == 0:
                self.clear_busy(ref, GTF_writing)
            raise GrantError(Gntst.general_error, f"ref {ref}: grant became read-only")
        return flags

    def target(self, ref: int) -> Target:
        frame, off = self.locate(ref)
        return self._target_at(frame.buf, off, frame.load32(off) & 0xFFFF)

    @staticmethod
    def _target_at(buf, off: int, flags: int) -> Target:
        """What the entry at ``off`` of ``buf`` grants, its flags being ``flags``."""
        if flags & GTF_type_mask == GTF_transitive:
            return Target(0, trans=(_get(buf, off, V2_TRANS_DOMID), _get(buf, off, V2_TRANS_GREF)))
        if flags & GTF_sub_page:
            return Target(_get(buf, off, V2_SUB_FRAME), _get(buf, off, V2_SUB_OFF), _get(buf, off, V2_SUB_LEN))
        return _full_page(_get(buf, off, V2_FULL_FRAME))

    def busy(self, ref: int) -> int:
        frame, off, shift = self._status_word(ref)
        return (frame.load32(off) >> shift) & BUSY

    def clear_busy(self, ref: int, bits: int) -> None:
        frame, off, shift = self._status_word(ref)
        frame.and32(off, ~(bits << shift))

    def write(self, ref: int, flags: int, domid: int, gfn: int) -> None:
        frame, off = self.locate(ref)
        frame.buf[off:off + V2_SIZE] = bytes(V2_SIZE)
        if flags & BUSY:
            sframe, soff, shift = self._status_word(ref)
            sframe.or32(soff, (flags & BUSY) << shift)
        _put(frame.buf, off, V2_FULL_FRAME, gfn)
        _put(frame.buf, off, HDR_DOMID, domid)
        _put(frame.buf, off, HDR_FLAGS, flags & ~BUSY)

    def keep(self, ref: int) -> tuple[int, int, int] | None:
        flags, dom = self.header(ref)
        kind = flags & GTF_type_mask
        gfn = self.target(ref).gfn if kind != GTF_transitive else 0
        if kind == GTF_transitive or (kind == GTF_permit_access and gfn >> 32):
            return None   # v1 cannot hold it
        if kind == GTF_permit_access:
            return flags | self.busy(ref), dom, gfn
        return 0, 0, 0

    def describe(self, ref: int) -> dict:
        flags, dom = self.header(ref)
        out = {"flags": flags, "domid": dom, "status": self._status_half(ref)}
        t = self.target(ref)
        if t.trans is not None:
            out["trans_domid"], out["gref"] = t.trans
        elif flags & GTF_sub_page:
            out["page_off"], out["length"], out["frame"] = t.page_off, t.length, t.gfn
        else:
            out["frame"] = t.gfn
        return out

    def _status_half(self, ref: int) -> int:
        frame, off, shift = self._status_word(ref)
        return (frame.load32(off) >> shift) & 0xFFFF


CODECS: dict[int, type[EntryCodec]] = {1: EntryCodecV1, 2: EntryCodecV2}


def codec_for(version: int, frames: Frames) -> EntryCodec:
    """The codec of table version ``version`` (1 or 2) over ``frames``."""
    return CODECS[version](frames)
