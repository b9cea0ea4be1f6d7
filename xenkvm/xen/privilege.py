"""Who is calling: the caller's privilege level, and the fault a fetch would take.

Xen serves hypercalls from the guest kernel only.  For an HVM/PVH guest,
``hvm_hypercall()`` (xen/arch/x86/hvm/hypercall.c) answers any call made in
protected or long mode at CPL > 0, and any call from virtual-8086 mode, with
``-EPERM`` and does nothing else; real mode (CPL 0) is served.  The traps
(traps.py) apply that rule in their one shared dispatch path, using
:func:`caller_cpl` on the state KVM saved at the exit.

A hardware execute breakpoint fires *before* the instruction is fetched, so
a breakpoint on a kernel hypercall site also fires when an outer ring jumps
there, although the CPU would have raised an instruction-fetch #PF instead
(a supervisor page at CPL 3, a page not present, NX).  :func:`fetch_fault`
walks the guest's page tables as the CPU would for that fetch and gives the
page-fault error code, so the trap can inject the #PF the guest would have
seen without the breakpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Callable, Optional

PF_VECTOR = 14
RFLAGS_VM = 1 << 17
ADDR_BITS = 52          #: x86 page-table entries hold physical addresses up to bit 51
DEFAULT_PHYS_BITS = 36  #: MAXPHYADDR when CPUID 0x80000008 is absent (SDM)


class Cr0(IntFlag):
    PE = 1 << 0
    PG = 1 << 31


class Cr4(IntFlag):
    PSE = 1 << 4
    PAE = 1 << 5
    LA57 = 1 << 12
    SMEP = 1 << 20


class Efer(IntFlag):
    LMA = 1 << 10
    NXE = 1 << 11


class Pte(IntFlag):
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


_CR0_PE = int(Cr0.PE)  # plain ints: caller_cpl runs on every hypercall


def caller_cpl(sregs, rflags: int) -> int:
    """The CPL at the exit: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL.

    SS.DPL is the architectural CPL (SDM vol. 3, 5.5); KVM reports it that
    way on VMX (vmx_get_cpl reads SS's access rights) and SVM (SS.DPL is the
    VMCB's CPL), also for a null SS in 64-bit mode.  Ordered so that the
    kernel's own calls (SS.DPL 0, no VM flag) cost two field reads.
    """
    dpl = sregs.ss.dpl & 3
    if rflags & RFLAGS_VM:
        return 3 if sregs.cr0 & _CR0_PE else 0
    if not dpl or not sregs.cr0 & _CR0_PE:
        return 0
    return dpl


@dataclass(frozen=True)
class Paging:
    """The registers that decide a page walk."""

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
        """Whether a fetch sets the error code's I/D bit: with CR4.SMEP, or NXE on 64-bit entries."""
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


ReadEntry = Callable[[int, int], Optional[int]]


def fetch_fault(p: Paging, va: int, cpl: int, read: ReadEntry) -> int | None:
    """The #PF error code an instruction fetch at ``va`` and ``cpl`` takes, or None if it does not fault.

    ``read(gpa, size)`` returns a page-table entry, or None where guest
    memory has none (treated as not present, as KVM's own walker does).
    Accessed/dirty bits are not set: a fetch that faults here never ran.
    """
    if not p.cr0 & Cr0.PG:
        return None
    user = cpl == 3
    base = (PfError.USER if user else 0) | (PfError.FETCH if p.fetch_reported() else 0)
    table, size, levels = _levels(p)
    user_ok, no_exec = True, False
    for i, level in enumerate(levels):
        index = (va >> level.shift) & ((1 << level.index_bits) - 1)
        entry = read(table + index * size, size)
        if entry is None or not entry & Pte.P:
            return int(base)
        large = level.large_ok and bool(entry & Pte.PS)
        if _reserved(p, level, entry, large):
            return int(base | PfError.PRESENT | PfError.RSVD)
        if level.flags_ok:
            user_ok = user_ok and bool(entry & Pte.US)
            no_exec = no_exec or (p.nx and bool(entry & Pte.NX))
        if large or i == len(levels) - 1:
            break
        table = entry & _mask(12, ADDR_BITS - 1 if p.wide else 31)
    denied = (not user_ok or no_exec) if user else (no_exec or (bool(p.cr4 & Cr4.SMEP) and user_ok))
    return int(base | PfError.PRESENT) if denied else None
