"""ELF32/ELF64 kernel images: safe parsing, loading at p_paddr, Xen ELF notes.

A Xen PVH kernel (Linux vmlinux, FreeBSD, the test guests) is a plain ELF file
whose ``PT_LOAD`` segments are copied to their *physical* addresses and entered
in 32-bit protected mode at the address in the ``XEN_ELFNOTE_PHYS32_ENTRY`` note
(name "Xen").  Structure layouts come from ``<elf.h>`` through cffi; every
offset and size in the file is checked against the file before use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import IntEnum

from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi, lib
from xenkvm.machine.boot.common import check_loadable, read_struct
from xenkvm.machine.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
#: More program headers than any kernel has; bounds the work a hostile file causes.
MAX_PHNUM = 4096


class ElfClass(IntEnum):
    ELF32 = lib.ELFCLASS32
    ELF64 = lib.ELFCLASS64


class SegmentType(IntEnum):
    NULL = lib.PT_NULL
    LOAD = lib.PT_LOAD
    NOTE = lib.PT_NOTE


class XenElfNote(IntEnum):
    """``XEN_ELFNOTE_*`` types (values from ``<xen/elfnote.h>``)."""

    INFO = lib.XEN_ELFNOTE_INFO
    ENTRY = lib.XEN_ELFNOTE_ENTRY
    HYPERCALL_PAGE = lib.XEN_ELFNOTE_HYPERCALL_PAGE
    VIRT_BASE = lib.XEN_ELFNOTE_VIRT_BASE
    PADDR_OFFSET = lib.XEN_ELFNOTE_PADDR_OFFSET
    XEN_VERSION = lib.XEN_ELFNOTE_XEN_VERSION
    GUEST_OS = lib.XEN_ELFNOTE_GUEST_OS
    GUEST_VERSION = lib.XEN_ELFNOTE_GUEST_VERSION
    LOADER = lib.XEN_ELFNOTE_LOADER
    PAE_MODE = lib.XEN_ELFNOTE_PAE_MODE
    FEATURES = lib.XEN_ELFNOTE_FEATURES
    BSD_SYMTAB = lib.XEN_ELFNOTE_BSD_SYMTAB
    HV_START_LOW = lib.XEN_ELFNOTE_HV_START_LOW
    L1_MFN_VALID = lib.XEN_ELFNOTE_L1_MFN_VALID
    SUSPEND_CANCEL = lib.XEN_ELFNOTE_SUSPEND_CANCEL
    INIT_P2M = lib.XEN_ELFNOTE_INIT_P2M
    MOD_START_PFN = lib.XEN_ELFNOTE_MOD_START_PFN
    SUPPORTED_FEATURES = lib.XEN_ELFNOTE_SUPPORTED_FEATURES
    PHYS32_ENTRY = lib.XEN_ELFNOTE_PHYS32_ENTRY


#: Xen notes whose descriptor is a little-endian number (4 or 8 bytes, or fewer).
_NUMERIC_NOTES = {
    XenElfNote.ENTRY, XenElfNote.HYPERCALL_PAGE, XenElfNote.VIRT_BASE,
    XenElfNote.PADDR_OFFSET, XenElfNote.HV_START_LOW, XenElfNote.SUSPEND_CANCEL,
    XenElfNote.INIT_P2M, XenElfNote.MOD_START_PFN, XenElfNote.SUPPORTED_FEATURES,
    XenElfNote.PHYS32_ENTRY,
}
#: Xen notes whose descriptor is a NUL-terminated string.
_STRING_NOTES = {
    XenElfNote.INFO, XenElfNote.XEN_VERSION, XenElfNote.GUEST_OS, XenElfNote.GUEST_VERSION,
    XenElfNote.LOADER, XenElfNote.PAE_MODE, XenElfNote.FEATURES, XenElfNote.BSD_SYMTAB,
}


@dataclass(frozen=True)
class ElfNote:
    """One note from a ``PT_NOTE`` segment (name without its NUL)."""

    name: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfSegment:
    """One ``PT_LOAD`` segment, already checked to lie inside the file."""

    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfImage:
    """What a loader needs from a kernel ELF file.

    ``entry`` is ``e_entry`` as written; ``entry_paddr`` is it translated to a
    physical address through the segment that contains it (None if none does).
    ``pvh_entry`` is the ``XEN_ELFNOTE_PHYS32_ENTRY`` value, or None.
    ``lowest_paddr``/``end_paddr`` bound the loaded image (end is exclusive).
    """

    elf_class: ElfClass
    machine: int
    entry: int
    entry_paddr: int | None
    pvh_entry: int | None
    lowest_paddr: int
    end_paddr: int
    segments: tuple[ElfSegment, ...]
    notes: tuple[ElfNote, ...] = ()
    xen_notes: dict[XenElfNote, int | str | bytes] = field(default_factory=dict)


def _ehdr(data: bytes | memoryview) -> tuple[ElfClass, object]:
    """Validate the identification bytes and return (class, Ehdr)."""
    if len(data) < lib.EI_NIDENT or bytes(data[:4]) != ELF_MAGIC:
        raise BootError("not an ELF file (bad magic or too short)")
    cls = data[lib.EI_CLASS]
    if cls not in (ElfClass.ELF32, ElfClass.ELF64):
        raise BootError(f"ELF class {cls} is neither ELF32 nor ELF64")
    if data[lib.EI_DATA] != lib.ELFDATA2LSB:
        raise BootError("ELF file is not little-endian")
    if data[lib.EI_VERSION] != lib.EV_CURRENT:
        raise BootError(f"ELF identification version {data[lib.EI_VERSION]} is not EV_CURRENT")
    elf_class = ElfClass(cls)
    bits = 64 if elf_class == ElfClass.ELF64 else 32
    eh = read_struct(f"Elf{bits}_Ehdr", data, 0, "ELF header")
    if eh.e_type not in (lib.ET_EXEC, lib.ET_DYN):
        raise BootError(f"ELF type {eh.e_type} is not an executable")
    if eh.e_machine not in (lib.EM_X86_64, lib.EM_386):
        raise BootError(f"ELF machine {eh.e_machine} is not x86")
    return elf_class, eh


def _phdrs(data: bytes | memoryview, elf_class: ElfClass, eh) -> list:
    """All program headers, each checked to lie inside the file."""
    bits = 64 if elf_class == ElfClass.ELF64 else 32
    ctype = f"Elf{bits}_Phdr"
    if eh.e_phnum == 0 or eh.e_phnum > MAX_PHNUM:
        raise BootError(f"ELF file has {eh.e_phnum} program headers")
    if eh.e_phentsize != ffi.sizeof(ctype):
        raise BootError(f"ELF program header size {eh.e_phentsize} is not {ffi.sizeof(ctype)}")
    return [read_struct(ctype, data, eh.e_phoff + i * eh.e_phentsize, f"program header {i}")
            for i in range(eh.e_phnum)]


def _segment(data: bytes | memoryview, ph, index: int, addr_limit: int) -> ElfSegment:
    """Check one PT_LOAD header against the file and the address space."""
    if ph.p_filesz > ph.p_memsz:
        raise BootError(f"segment {index}: file size {ph.p_filesz:#x} exceeds memory size {ph.p_memsz:#x}")
    if ph.p_offset + ph.p_filesz > len(data):
        raise BootError(f"segment {index}: bytes {ph.p_offset:#x}+{ph.p_filesz:#x} run past the end of the file")
    if ph.p_paddr + ph.p_memsz > addr_limit or ph.p_vaddr + ph.p_memsz > addr_limit:
        raise BootError(f"segment {index}: {ph.p_paddr:#x}+{ph.p_memsz:#x} wraps the address space")
    return ElfSegment(ph.p_paddr, ph.p_vaddr, ph.p_offset, ph.p_filesz, ph.p_memsz, ph.p_flags)


def _check_disjoint(segments: list[ElfSegment]) -> None:
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise BootError(f"segments at {a.paddr:#x} and {b.paddr:#x} overlap")


def _notes(data: bytes | memoryview, ph) -> list[ElfNote]:
    """Parse the notes of one PT_NOTE segment (entries padded to 4, or 8 if p_align is 8)."""
    if ph.p_offset + ph.p_filesz > len(data):
        raise BootError(f"note segment {ph.p_offset:#x}+{ph.p_filesz:#x} runs past the end of the file")
    align = 8 if ph.p_align == 8 else 4
    seg = memoryview(data)[ph.p_offset:ph.p_offset + ph.p_filesz]
    notes, off = [], 0
    hsize = ffi.sizeof("Elf64_Nhdr")
    while off + hsize <= len(seg):
        nh = read_struct("Elf64_Nhdr", seg, off, "note header")
        name_off = off + hsize
        desc_off = name_off + _pad(nh.n_namesz, align)
        end = desc_off + _pad(nh.n_descsz, align)
        if desc_off + nh.n_descsz > len(seg):
            raise BootError(f"note at segment offset {off:#x} runs past its segment")
        name = bytes(seg[name_off:name_off + nh.n_namesz]).split(b"\0", 1)[0]
        notes.append(ElfNote(name.decode("ascii", "replace"), nh.n_type,
                             bytes(seg[desc_off:desc_off + nh.n_descsz])))
        off = end
    return notes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _xen_value(note: ElfNote) -> int | str | bytes:
    """Decode a Xen note's descriptor: a number, a string or raw bytes."""
    kind = XenElfNote(note.type)
    if kind in _NUMERIC_NOTES and len(note.desc) in (1, 2, 4, 8):
        return int.from_bytes(note.desc, "little")
    if kind in _STRING_NOTES:
        return note.desc.split(b"\0", 1)[0].decode("ascii", "replace")
    return note.desc


def _xen_notes(notes: list[ElfNote]) -> dict[XenElfNote, int | str | bytes]:
    known = {int(t) for t in XenElfNote}
    return {XenElfNote(n.type): _xen_value(n) for n in notes if n.name == "Xen" and n.type in known}


def _translate(entry: int, segments: list[ElfSegment]) -> int | None:
    """Physical address of ``entry``: through a segment's vaddr range, else its paddr range."""
    for s in segments:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return s.paddr + (entry - s.vaddr)
    for s in segments:
        if s.paddr <= entry < s.paddr + s.memsz:
            return entry
    return None


def _pvh_entry(xen: dict, segments: list[ElfSegment]) -> int | None:
    """The PHYS32 entry, checked to be a 32-bit address inside a loaded segment."""
    if XenElfNote.PHYS32_ENTRY not in xen:
        return None
    value = xen[XenElfNote.PHYS32_ENTRY]
    if not isinstance(value, int) or value >= 1 << 32:
        raise BootError(f"XEN_ELFNOTE_PHYS32_ENTRY {value!r} is not a 32-bit address")
    if not any(s.paddr <= value < s.paddr + s.filesz for s in segments):
        raise BootError(f"XEN_ELFNOTE_PHYS32_ENTRY {value:#x} is not inside a loaded segment")
    return value


def parse_elf(data: bytes | bytearray | memoryview) -> ElfImage:
    """Validate an ELF kernel image and describe it; guest memory is not touched."""
    elf_class, eh = _ehdr(data)
    phdrs = _phdrs(data, elf_class, eh)
    limit = 1 << (64 if elf_class == ElfClass.ELF64 else 32)
    segments = [_segment(data, ph, i, limit) for i, ph in enumerate(phdrs)
                if ph.p_type == SegmentType.LOAD and ph.p_memsz > 0]
    if not segments:
        raise BootError("ELF file has no loadable segments")
    _check_disjoint(segments)
    notes = [n for ph in phdrs if ph.p_type == SegmentType.NOTE for n in _notes(data, ph)]
    xen = _xen_notes(notes)
    return ElfImage(
        elf_class=elf_class, machine=eh.e_machine, entry=eh.e_entry,
        entry_paddr=_translate(eh.e_entry, segments), pvh_entry=_pvh_entry(xen, segments),
        lowest_paddr=min(s.paddr for s in segments),
        end_paddr=max(s.paddr + s.memsz for s in segments),
        segments=tuple(segments), notes=tuple(notes), xen_notes=xen,
    )


def load_elf(mem: GuestMemory, data: bytes | bytearray | memoryview) -> ElfImage:
    """Parse ``data`` and copy its PT_LOAD segments to guest memory at p_paddr.

    Each segment must lie in guest RAM clear of the boot areas below 1 MiB
    (see :func:`~xenkvm.machine.boot.common.boot_reserved`); the part of a
    segment past its file size (bss) is zeroed.
    """
    image = parse_elf(data)
    for i, s in enumerate(image.segments):
        check_loadable(mem, s.paddr, s.memsz, f"ELF segment {i}")
    src = memoryview(data)
    try:
        for s in image.segments:
            mem.write(s.paddr, src[s.offset:s.offset + s.filesz])
            if s.memsz > s.filesz:
                mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0)
    except GuestMemoryError as exc:
        raise BootError(f"loading ELF segment: {exc}") from exc
    log.info("loaded ELF %s: %#x..%#x entry %#x pvh %s", image.elf_class.name, image.lowest_paddr,
             image.end_paddr, image.entry, None if image.pvh_entry is None else hex(image.pvh_entry))
    return image
