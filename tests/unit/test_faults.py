"""The rules that decide which exception a refused instruction raises (machine/faults.py)."""
from __future__ import annotations


import pytest

from xenkvm.machine.faults import (CR0_EM, CR0_MP, CR0_TS, CR0_WP, CR4_OSFXSR, EFER_NXE, PF_I, PF_P, PF_RSVD,
                                   PF_U, PF_W, CpuState, FailedAccess, InsnClass, Paging, Vector, canonical,
                                   classify, decide_fault, walk)

RING0 = CpuState(cr0=0x8000_0033, cr4=CR4_OSFXSR, efer=0x500, cpl=0)


@pytest.mark.parametrize("code,cls", [
    (b"\xd9\xd0", InsnClass.X87),                 # fnop
    (b"\xd9\x3b", InsnClass.X87),                 # fnstcw (%rbx)
    (b"\x9b", InsnClass.FWAIT),
    (b"\x0f\x28\xc1", InsnClass.SSE),             # movaps
    (b"\x66\x0f\xef\xc0", InsnClass.SSE),         # pxor xmm
    (b"\x0f\xef\xc0", InsnClass.MMX),             # pxor mm
    (b"\x66\x0f\x38\x00\xc1", InsnClass.SSE),     # pshufb xmm
    (b"\x0f\xae\x10", InsnClass.SSE),             # ldmxcsr
    (b"\x0f\xae\x00", InsnClass.FXSR),            # fxsave
    (b"\x0f\xae\xf0", InsnClass.OTHER),           # mfence
    (b"\xf3\x48\x0f\xb8\x03", InsnClass.OTHER),   # popcnt
    (b"\x48\x0f\xc7\x0b", InsnClass.OTHER),       # cmpxchg16b
    (b"\x0f\x38\xf0\x03", InsnClass.OTHER),       # movbe
    (b"\xf4", InsnClass.PRIVILEGED),              # hlt
    (b"\x0f\x01\x15\x00\x00\x00\x00", InsnClass.PRIVILEGED),  # lgdt
    (b"\x0f\x01\xf8", InsnClass.PRIVILEGED),      # swapgs
    (b"\x0f\x01\xca", InsnClass.OTHER),           # clac
    (b"\x0f\x30", InsnClass.PRIVILEGED),          # wrmsr
    (b"\x0f\x22\xd8", InsnClass.PRIVILEGED),      # mov cr3
    (b"\x0f\x0b", InsnClass.UD),
    (b"", InsnClass.OTHER),
])
def test_classify(code: bytes, cls: InsnClass) -> None:
    assert classify(code) is cls


@pytest.mark.parametrize("code,state,vector,rule", [
    (b"\xd9\xd0", CpuState(0x8000_0033 | CR0_TS, CR4_OSFXSR, 0x500, 0), Vector.NM, "x87"),
    (b"\xd9\xd0", CpuState(0x8000_0033 | CR0_EM, CR4_OSFXSR, 0x500, 0), Vector.NM, "x87"),
    (b"\x9b", CpuState(0x8000_0031 | CR0_MP | CR0_TS, 0, 0x500, 0), Vector.NM, "wait"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033, 0, 0x500, 0), Vector.UD, "sse"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033 | CR0_EM, CR4_OSFXSR, 0x500, 0), Vector.UD, "sse"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033 | CR0_TS, CR4_OSFXSR, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\xef\xc0", CpuState(0x8000_0033 | CR0_EM, 0, 0x500, 0), Vector.UD, "mmx"),
    (b"\x0f\xef\xc0", CpuState(0x8000_0033 | CR0_TS, 0, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\xae\x00", CpuState(0x8000_0033 | CR0_TS, 0, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\x30", CpuState(0x8000_0033, CR4_OSFXSR, 0x500, 3), Vector.GP, "priv"),
])
def test_instruction_rules(code: bytes, state: CpuState, vector: int, rule: str) -> None:
    f = decide_fault(code, state, raised=13, access=None)
    assert f is not None and (f.vector, f.rule) == (vector, rule)
    assert f.error_code == (0 if vector == Vector.GP else None) and f.cr2 is None


def test_sse_with_osfxsr_is_not_a_ud_and_x87_without_ts_is_not_nm() -> None:
    assert decide_fault(b"\xd9\xd0", RING0, raised=None, access=None) is None
    assert decide_fault(b"\x0f\x28\xc1", RING0, raised=None, access=None) is None


def test_privileged_at_ring0_falls_through() -> None:
    assert decide_fault(b"\x0f\x30", RING0, raised=13, access=None).rule == "cpu"


def test_memory_operand_faults() -> None:
    pf = decide_fault(b"\xf3\x48\x0f\xb8\x03", RING0, raised=14, access=FailedAccess(0x1000_0000_0123, PF_W))
    assert (pf.vector, pf.error_code, pf.cr2, pf.rule) == (Vector.PF, PF_W, 0x1000_0000_0123, "page")
    gp = decide_fault(b"\xf3\x48\x0f\xb8\x03", RING0, raised=8, access=FailedAccess(1 << 63, None))
    assert (gp.vector, gp.error_code, gp.cr2, gp.rule) == (Vector.GP, 0, None, "canon")


def test_instruction_checks_come_before_memory() -> None:
    # fnstcw to an unmapped page with CR0.TS set: #NM, not #PF (SDM priority)
    s = CpuState(0x8000_0033 | CR0_TS, 0, 0x500, 0)
    assert decide_fault(b"\xd9\x3b", s, raised=7, access=FailedAccess(0x2000, 0)).vector == Vector.NM


def test_other_vectors_from_unicorn_get_an_error_code_only_if_they_push_one() -> None:
    align = decide_fault(b"\x48\x0f\xc7\x0b", RING0, raised=13, access=None)   # cmpxchg16b misaligned
    assert (align.vector, align.error_code, align.rule) == (13, 0, "cpu")
    de = decide_fault(b"\x48\xf7\xf1", RING0, raised=0, access=None)
    assert (de.vector, de.error_code) == (0, None)


def test_unknown_to_unicorn_is_not_a_guest_ud() -> None:
    assert decide_fault(b"\x0f\x0b", RING0, raised=None, access=None).vector == Vector.UD
    assert decide_fault(b"\x62\xf1\x7c\x48\x28\xc1", RING0, raised=None, access=None) is None


def test_canonical() -> None:
    assert canonical(0x7FFF_FFFF_FFFF) and canonical(0xFFFF_8000_0000_0000)
    assert not canonical(0x8000_0000_0000_0000) and not canonical(0x0000_8000_0000_0000)
    assert canonical(0x00FF_FFFF_FFFF_FFFF, la57=True)


class Tables:
    """Guest page tables in a dict of physical memory."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}

    def read(self, gpa: int) -> int | None:
        return self.mem.get(gpa, 0)

    def map4k(self, va: int, pa: int, flags: int, top: int = 0x7) -> None:
        tables = [0x1000, 0x2000, 0x3000, 0x4000]
        for level, table in enumerate(tables[:3]):
            shift = 39 - 9 * level
            self.mem[table + 8 * ((va >> shift) & 0x1FF)] = tables[level + 1] | top
        self.mem[0x4000 + 8 * ((va >> 12) & 0x1FF)] = pa | flags


def paging(cpl: int = 0, cr0: int = 0x8000_0033 | CR0_WP, efer: int = 0x500 | EFER_NXE) -> Paging:
    return Paging(cr0=cr0, cr3=0x1000, cr4=0x20, efer=efer, cpl=cpl)


def test_walk_translates_and_reports_not_present() -> None:
    t = Tables()
    t.map4k(0x40_0000, 0x9000, 0x3)
    assert walk(t.read, paging(), 0x40_0123, write=True) == (0x9123, 0)
    assert walk(t.read, paging(), 0x40_1000, write=False) == (None, 0)
    assert walk(t.read, paging(cpl=3), 0x80_0000_0000, write=True) == (None, PF_W | PF_U)


def test_walk_permissions() -> None:
    t = Tables()
    t.map4k(0x40_0000, 0x9000, 0x1)                    # present, read-only, supervisor
    assert walk(t.read, paging(), 0x40_0000, write=True) == (None, PF_P | PF_W)
    assert walk(t.read, paging(cr0=0x8000_0033), 0x40_0000, write=True) == (0x9000, 0)   # WP off
    assert walk(t.read, paging(cpl=3), 0x40_0000, write=False) == (None, PF_P | PF_U)
    t.map4k(0x40_0000, 0x9000, 0x7 | (1 << 63))         # user, NX
    assert walk(t.read, paging(), 0x40_0000, write=False, fetch=True) == (None, PF_P | PF_I)
    assert walk(t.read, paging(efer=0x500), 0x40_0000, write=False) == (None, PF_P | PF_RSVD)


def test_walk_large_pages() -> None:
    t = Tables()
    t.mem[0x1000] = 0x2003
    t.mem[0x2000] = 0x3003
    t.mem[0x3000 + 8] = 0x20_0000 | 0x83                # 2 MiB page at 2 MiB
    assert walk(t.read, paging(), 0x2F_1234, write=True) == (0x2F_1234, 0)
    t.mem[0x1000] = 0x2083                             # PS in a PML4 entry is reserved
    assert walk(t.read, paging(), 0x2F_1234, write=False) == (None, PF_P | PF_RSVD)


def test_walk_unreadable_entry_is_not_present() -> None:
    assert walk(lambda gpa: None, paging(), 0x1000, write=False) == (None, 0)
