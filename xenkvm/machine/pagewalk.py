"""The guest's page-table walk: what a linear address translates to, or the #PF it takes.

Two parts of xenkvm must see a guest access the way its MMU would: the
breakpoint trap (xen/traps.py), whose execute breakpoint fires before the
fetch a user process would have faulted on, and the emulation of refused
instructions (machine/gaps.py), whose memory operands unicorn cannot
translate itself.  Both use :func:`walk`, which follows the SDM (vol. 3,
chapter 4): 32-bit, PAE, 4- and 5-level paging, large pages, reserved bits,
U/S, R/W with CR0.WP, NX and SMEP (not SMAP, not protection keys).
Accessed and dirty bits are never set: the walk only decides, the access it
decides about is made (or faulted) elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntFlag
from typing import Callable, Optional

ADDR_BITS = 52          #: x86 page-table entries hold physical addresses up to bit 51
DEFAULT_PHYS_BITS = 36  #: MAXPHYADDR when CPUID 0x80000008 is absent (SDM)


class Cr0(IntFlag):
    PE = 1 << 0
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    WP = 1 << 16
    PG = 1 << 31


class Cr4(IntFlag):
    PSE = 1 << 4
    PAE = 1 << 5
    OSFXSR = 1 << 9
    LA57 = 1 << 12
    SMEP = 1 << 20


class Efer(IntFlag):
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


class Pte(IntFlag):
    """Page-table entry bits the walk reads (SDM vol. 3, 4.3-4.5)."""

    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    PS = 1 << 7
    NX = 1 << 63


class PfError(IntFlag):
    """Page-fault error code bits (SDM vol. 3, 4.7)."""

    PRESENT = 1 << 0
    WRITE = 1 << 1
    USER = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4


class Access(Enum):
    """The kind of access walked: it decides which permission bits apply and the error code's W and I/D."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


def cpuid_phys_bits(cpuid) -> int:
    """MAXPHYADDR as CPUID 0x80000008 EAX[7:0] says, from (function, index, flags, eax, ...) entries."""
    for fn, _idx, _flags, eax, *_ in cpuid:
        if fn == 0x80000008 and eax & 0xFF:
            return eax & 0xFF
    return DEFAULT_PHYS_BITS


def canonical(addr: int, la57: bool = False) -> bool:
    """Whether a 64-bit linear address is canonical (bits 63..47, or 63..56 with LA57, all equal)."""
    bits = 57 if la57 else 48
    top = addr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


@dataclass(frozen=True)
class Paging:
    """The registers that decide a page walk, and the guest's MAXPHYADDR (its reserved address bits)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    phys_bits: int = DEFAULT_PHYS_BITS

    @classmethod
    def from_sregs(cls, sregs, phys_bits: int) -> "Paging":
        return cls(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, phys_bits)

    @property
    def wide(self) -> bool:
        """64-bit entries (PAE or 4/5-level paging): NX and high reserved bits exist."""
        return bool(self.efer & Efer.LMA or self.cr4 & Cr4.PAE)

    @property
    def nx(self) -> bool:
        return self.wide and bool(self.efer & Efer.NXE)

    def fetch_reported(self) -> bool:
        """Whether a fetch sets the error code's I/D bit: with CR4.SMEP, or NXE on 64-bit entries (SDM 4.7)."""
        return bool(self.cr4 & Cr4.SMEP) or self.nx


@dataclass(frozen=True)
class _Level:
    shift: int          #: VA bit the index starts at
    index_bits: int
    large_ok: bool      #: PS may end the walk here
    large_rsvd: int     #: reserved bits of a large-page entry (beyond the address ones)
    flags_ok: bool = True  #: the entry has U/S, R/W, NX (not a PAE PDPTE)
    ps_rsvd: bool = False  #: PS is reserved (PML4E, PML5E)


def _mask(lo: int, hi: int) -> int:
    """Bits lo..hi inclusive."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def _levels(p: Paging) -> tuple[int, int, list[_Level]]:
    """(table address, entry size, levels from the top) of the current paging mode."""
    if p.efer & Efer.LMA:
        top = [_Level(48, 9, False, 0, ps_rsvd=True)] if p.cr4 & Cr4.LA57 else []
        return (p.cr3 & _mask(12, ADDR_BITS - 1), 8, top + [
            _Level(39, 9, False, 0, ps_rsvd=True),
            _Level(30, 9, True, _mask(13, 29)),
            _Level(21, 9, True, _mask(13, 20)),
            _Level(12, 9, False, 0)])
    if p.cr4 & Cr4.PAE:
        return (p.cr3 & _mask(5, 31), 8, [
            _Level(30, 2, False, 0, flags_ok=False),
            _Level(21, 9, True, _mask(13, 20)),
            _Level(12, 9, False, 0)])
    return (p.cr3 & _mask(12, 31), 4, [
        _Level(22, 10, bool(p.cr4 & Cr4.PSE), 0),
        _Level(12, 10, False, 0)])


def _reserved(p: Paging, level: _Level, entry: int, large: bool) -> bool:
    """Whether ``entry`` sets a bit reserved at its level (64-bit entries only), a #PF with RSVD."""
    if not p.wide:
        return False
    rsvd = _mask(p.phys_bits, ADDR_BITS - 1) if p.phys_bits < ADDR_BITS else 0
    if not p.nx:
        rsvd |= Pte.NX
    if not level.flags_ok:      # PAE PDPTE: bits 2:1 and 8:5 are reserved too
        rsvd |= _mask(1, 2) | _mask(5, 8)
    if level.ps_rsvd:
        rsvd |= Pte.PS
    if large:
        rsvd |= level.large_rsvd
    return bool(entry & rsvd)


def _frame(p: Paging, entry: int, shift: int, va: int) -> int:
    """The physical address ``va`` maps to through the leaf ``entry`` of a page of 2**shift bytes.

    A 4 MiB page of 32-bit paging holds physical bits 39:32 in its bits 20:13 (PSE-36).
    """
    offset = va & ((1 << shift) - 1)
    if p.wide:
        return (entry & _mask(shift, ADDR_BITS - 1)) | offset
    high = (entry >> 13) & 0xFF if shift == 22 else 0
    return (high << 32) | (entry & _mask(shift, 31)) | offset


def _denied(p: Paging, access: Access, user: bool, user_ok: bool, writable: bool, no_exec: bool) -> bool:
    """Whether the combined rights of all levels refuse the access (SDM 4.6).

    CPL 3 needs U/S at every level; a write needs R/W at every level, at CPL <
    3 only with CR0.WP; a fetch is refused by NX at any level, and at CPL < 3
    from a user page with CR4.SMEP.
    """
    if user and not user_ok:
        return True
    if access is Access.WRITE:
        return not writable and (user or bool(p.cr0 & Cr0.WP))
    if access is Access.FETCH:
        return no_exec or (not user and bool(p.cr4 & Cr4.SMEP) and user_ok)
    return False


ReadEntry = Callable[[int, int], Optional[int]]


def walk(read: ReadEntry, p: Paging, va: int, access: Access, cpl: int) -> tuple[int | None, int]:
    """Translate ``va`` like the MMU: (guest-physical address, 0), or (None, #PF error code).

    ``read(gpa, size)`` returns a page-table entry, or None where guest memory
    has none (treated as not present, as KVM's own walker does).  Without
    CR0.PG the address is physical.  CPL 3 is a user access, CPL 0-2 a
    supervisor one.
    """
    if not p.cr0 & Cr0.PG:
        return va, 0
    user = cpl == 3
    base = ((PfError.USER if user else 0) | (PfError.WRITE if access is Access.WRITE else 0)
            | (PfError.FETCH if access is Access.FETCH and p.fetch_reported() else 0))
    table, size, levels = _levels(p)
    user_ok, writable, no_exec = True, True, False
    for i, level in enumerate(levels):
        entry = read(table + ((va >> level.shift) & ((1 << level.index_bits) - 1)) * size, size)
        if entry is None or not entry & Pte.P:
            return None, int(base)
        large = level.large_ok and bool(entry & Pte.PS)
        if _reserved(p, level, entry, large):
            return None, int(base | PfError.PRESENT | PfError.RSVD)
        if level.flags_ok:
            user_ok, writable = user_ok and bool(entry & Pte.US), writable and bool(entry & Pte.RW)
            no_exec = no_exec or (p.nx and bool(entry & Pte.NX))
        if large or i == len(levels) - 1:
            if _denied(p, access, user, user_ok, writable, no_exec):
                return None, int(base | PfError.PRESENT)
            return _frame(p, entry, level.shift, va), 0
        table = entry & _mask(12, ADDR_BITS - 1 if p.wide else 31)
    raise AssertionError("unreachable: the last level always ends the walk")
