"""The vCPU's view of the CPU: CPUID composition and the register state at entry.

CPUID starts from KVM_GET_SUPPORTED_CPUID; per-vCPU topology (APIC IDs) and
the hypervisor leaves are ours, and a :class:`CpuProfile` hides features the
host cannot run (chosen by ``machine.host``).  Two entry states exist: the
PVH contract (32-bit protected mode, paging off, EBX = hvm_start_info) and the
64-bit Linux boot protocol (long mode, identity-mapped, RSI = boot_params).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from xenkvm.machine import layout
from xenkvm.machine.memory import GuestMemory

CpuidEntry = tuple[int, int, int, int, int, int, int]  # fn, index, flags, eax, ebx, ecx, edx

HYPERVISOR_BASE = 0x4000_0000
LEAF1_ECX_HYPERVISOR = 1 << 31


class Reg(IntEnum):
    EAX = 3
    EBX = 4
    ECX = 5
    EDX = 6


@dataclass(frozen=True)
class FeatureMask:
    """Clear ``bits`` of register ``reg`` in leaf ``leaf`` (every sub-leaf unless ``index``)."""

    leaf: int
    reg: Reg
    bits: int
    index: int | None = None
    why: str = ""


@dataclass(frozen=True)
class CpuProfile:
    """What the guest is allowed to see of the host CPU, and why."""

    name: str
    masks: tuple[FeatureMask, ...] = ()
    kernel_params: tuple[str, ...] = field(default=())


HARDWARE = CpuProfile("host")


def build_cpuid(supported: list[CpuidEntry], vcpu_id: int, n_vcpus: int, profile: CpuProfile,
                hypervisor_leaves: list[CpuidEntry] | None = None) -> list[CpuidEntry]:
    """The CPUID table for one vCPU.

    ``hypervisor_leaves`` (e.g. Xen's) replace KVM's own 0x4000_00xx leaves when given.
    """
    out: list[CpuidEntry] = []
    for fn, index, flags, a, b, c, d in supported:
        if hypervisor_leaves is not None and fn & 0xFFFF_FF00 == HYPERVISOR_BASE:
            continue
        regs = [fn, index, flags, a, b, c, d]
        if fn == 1:
            regs[Reg.EBX] = (b & 0x0000_FFFF) | (min(n_vcpus, 255) << 16) | ((vcpu_id & 0xFF) << 24)
            regs[Reg.ECX] |= LEAF1_ECX_HYPERVISOR
            regs[Reg.EDX] |= 1 << 28 if n_vcpus > 1 else 0  # HTT: the count in EBX is valid
        elif fn in (0xB, 0x1F):
            regs[Reg.EDX] = vcpu_id  # x2APIC ID of this logical processor
        for m in profile.masks:
            if m.leaf == fn and (m.index is None or m.index == index):
                regs[m.reg] &= ~m.bits
        out.append(tuple(regs))  # type: ignore[arg-type]
    if hypervisor_leaves is not None:
        out.extend(hypervisor_leaves)
    return out


# --- entry state -----------------------------------------------------------------
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_IA32_MISC_ENABLE = 0x1A0
CODE_SEL, DATA_SEL, TSS_SEL = 0x10, 0x18, 0x20


@dataclass(frozen=True)
class Segment:
    selector: int
    type: int
    s: int = 1
    db: int = 1
    l: int = 0
    base: int = 0
    limit: int = 0xFFFF_FFFF
    g: int = 1

    def descriptor(self) -> int:
        """The 8-byte GDT encoding (for the in-memory GDT matching what we load)."""
        lim = self.limit >> 12 if self.g else self.limit
        access = 0x80 | (self.s << 4) | self.type  # present, DPL 0
        flags = (self.g << 3) | (self.db << 2) | (self.l << 1)
        return ((lim & 0xFFFF) | (self.base & 0xFFFFFF) << 16 | access << 40
                | ((lim >> 16) & 0xF) << 48 | flags << 52 | ((self.base >> 24) & 0xFF) << 56)


def _segments(long_mode: bool) -> tuple[Segment, Segment, Segment]:
    code = Segment(CODE_SEL, 0xB, db=0 if long_mode else 1, l=1 if long_mode else 0)
    data = Segment(DATA_SEL, 0x3)
    tss = Segment(TSS_SEL, 0xB, s=0, db=0, limit=0x67, g=0)  # busy 32-bit TSS (PVH asks for one)
    return code, data, tss


def write_gdt(mem: GuestMemory, long_mode: bool) -> None:
    """Null, null, code (0x10), data (0x18), TSS (0x20): Linux's __BOOT_CS/__BOOT_DS."""
    code, data, tss = _segments(long_mode)
    mem.write(layout.BOOT_GDT, struct.pack("<6Q", 0, 0, code.descriptor(), data.descriptor(),
                                           tss.descriptor(), 0))


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the low 4 GiB with 2 MiB pages; returns CR3."""
    pml4, pdpt, pd0 = layout.BOOT_PML4, layout.BOOT_PML4 + 0x1000, layout.BOOT_PML4 + 0x2000
    mem.fill(pml4, 6 * 0x1000)
    mem.write_u64(pml4, pdpt | 0x3)
    for i in range(4):
        mem.write_u64(pdpt + 8 * i, (pd0 + 0x1000 * i) | 0x3)
    pds = mem.array(pd0, 4 * 512, "<u8")
    pds[:] = [(i << 21) | 0x83 for i in range(4 * 512)]  # present, writable, 2 MiB page
    return pml4


def _load_segment(kseg, seg: Segment) -> None:
    kseg.base, kseg.limit, kseg.selector = seg.base, seg.limit, seg.selector
    kseg.type, kseg.present, kseg.dpl = seg.type, 1, 0
    kseg.db, kseg.s, kseg.l, kseg.g, kseg.avl, kseg.unusable = seg.db, seg.s, seg.l, seg.g, 0, 0


def set_entry_state(vcpu, mem: GuestMemory, *, long_mode: bool, rip: int,
                    rsi: int = 0, rbx: int = 0) -> None:
    """Put the BSP at a 32-bit PVH entry or a 64-bit Linux entry."""
    write_gdt(mem, long_mode)
    code, data, tss = _segments(long_mode)
    sregs = vcpu.get_sregs()
    _load_segment(sregs.cs, code)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _load_segment(seg, data)
    _load_segment(sregs.tr, tss)
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT, 6 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    if long_mode:
        sregs.cr3 = write_identity_page_tables(mem)
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
        sregs.cr0 |= CR0_PG
    else:
        sregs.cr3, sregs.cr4, sregs.efer = 0, 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip, regs.rsi, regs.rbx, regs.rflags = rip, rsi, rbx, 0x2
    vcpu.set_regs(regs)
    vcpu.set_msrs({MSR_MTRR_DEF_TYPE: (1 << 11) | 6, MSR_IA32_MISC_ENABLE: 1})
