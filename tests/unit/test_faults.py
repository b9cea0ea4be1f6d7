"""The rules that decide which exception a refused instruction raises (machine/faults.py)."""
from __future__ import annotations


import pytest

from xenkvm.machine.faults import CpuState, FailedAccess, InsnClass, Vector, classify, decide_fault
from xenkvm.machine.pagewalk import Cr0, Cr4, PfError

RING0 = CpuState(cr0=0x8000_0033, cr4=Cr4.OSFXSR, efer=0x500, cpl=0)


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
    (b"\xd9\xd0", CpuState(0x8000_0033 | Cr0.TS, Cr4.OSFXSR, 0x500, 0), Vector.NM, "x87"),
    (b"\xd9\xd0", CpuState(0x8000_0033 | Cr0.EM, Cr4.OSFXSR, 0x500, 0), Vector.NM, "x87"),
    (b"\x9b", CpuState(0x8000_0031 | Cr0.MP | Cr0.TS, 0, 0x500, 0), Vector.NM, "wait"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033, 0, 0x500, 0), Vector.UD, "sse"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033 | Cr0.EM, Cr4.OSFXSR, 0x500, 0), Vector.UD, "sse"),
    (b"\x0f\x28\xc1", CpuState(0x8000_0033 | Cr0.TS, Cr4.OSFXSR, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\xef\xc0", CpuState(0x8000_0033 | Cr0.EM, 0, 0x500, 0), Vector.UD, "mmx"),
    (b"\x0f\xef\xc0", CpuState(0x8000_0033 | Cr0.TS, 0, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\xae\x00", CpuState(0x8000_0033 | Cr0.TS, 0, 0x500, 0), Vector.NM, "simd"),
    (b"\x0f\x30", CpuState(0x8000_0033, Cr4.OSFXSR, 0x500, 3), Vector.GP, "priv"),
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
    pf = decide_fault(b"\xf3\x48\x0f\xb8\x03", RING0, raised=14, access=FailedAccess(0x1000_0000_0123, PfError.WRITE))
    assert (pf.vector, pf.error_code, pf.cr2, pf.rule) == (Vector.PF, PfError.WRITE, 0x1000_0000_0123, "page")
    gp = decide_fault(b"\xf3\x48\x0f\xb8\x03", RING0, raised=8, access=FailedAccess(1 << 63, None))
    assert (gp.vector, gp.error_code, gp.cr2, gp.rule) == (Vector.GP, 0, None, "canon")


def test_instruction_checks_come_before_memory() -> None:
    # fnstcw to an unmapped page with CR0.TS set: #NM, not #PF (SDM priority)
    s = CpuState(0x8000_0033 | Cr0.TS, 0, 0x500, 0)
    assert decide_fault(b"\xd9\x3b", s, raised=7, access=FailedAccess(0x2000, 0)).vector == Vector.NM


def test_other_vectors_from_unicorn_get_an_error_code_only_if_they_push_one() -> None:
    align = decide_fault(b"\x48\x0f\xc7\x0b", RING0, raised=13, access=None)   # cmpxchg16b misaligned
    assert (align.vector, align.error_code, align.rule) == (13, 0, "cpu")
    de = decide_fault(b"\x48\xf7\xf1", RING0, raised=0, access=None)
    assert (de.vector, de.error_code) == (0, None)


def test_unknown_to_unicorn_is_not_a_guest_ud() -> None:
    assert decide_fault(b"\x0f\x0b", RING0, raised=None, access=None).vector == Vector.UD
    assert decide_fault(b"\x62\xf1\x7c\x48\x28\xc1", RING0, raised=None, access=None) is None
