"""Which exception a refused instruction raises, so the guest gets it instead of the VMM ending.

When unicorn (``machine/gaps.py``) completes an instruction the host refused and
the instruction faults, the fault belongs to the guest: it is injected with
KVM_SET_VCPU_EVENTS and the VM goes on.  Unicorn says *that* an exception
happened (its interrupt hook gives a vector number) but not its error code nor,
for a page fault, CR2.  The rules below decide vector, error code and CR2 from
the instruction bytes, the CPU state and the memory access that failed; each
follows the Intel SDM's "Protected Mode Exceptions" / "64-Bit Mode Exceptions"
for the instruction class, checked in the SDM's priority order (instruction
checks before memory accesses):

====  =====================================================  ==================
rule  condition                                              exception
====  =====================================================  ==================
x87   x87 escape (D8-DF) and CR0.EM or CR0.TS                #NM
wait  ``fwait`` and CR0.TS and CR0.MP                        #NM
mmx   MMX op (0F 60-7F, D0-FE without 66/F2/F3) and CR0.EM   #UD
sse   SSE op and (CR0.EM or not CR4.OSFXSR)                  #UD
simd  MMX/SSE op and CR0.TS; fxsave/fxrstor and CR0.TS/EM    #NM
priv  privileged instruction and CPL > 0                     #GP(0)
canon memory operand at a non-canonical linear address       #GP(0)
page  memory operand whose page-table walk fails             #PF(walk), CR2
ud    UD0/UD1/UD2                                            #UD
cpu   any other exception unicorn raised (alignment, #DE..)  that vector, error
                                                             code 0 if it has one
====  =====================================================  ==================

Not modelled: VEX/EVEX-encoded (AVX) instructions (their #UD depends on XCR0,
which the guest cannot enable on PVM: ``noxsave``); #SS for a non-canonical
stack reference (reported as #GP(0)); SMAP and protection keys in the walk
(``machine/pagewalk.py``).
An instruction unicorn does not know but the guest's CPU might is *not* a #UD:
that stays an emulation failure (exit status 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from xenkvm.machine.pagewalk import Cr0, Cr4


class Vector(IntEnum):
    DE = 0
    UD = 6
    NM = 7
    SS = 12
    GP = 13
    PF = 14


#: Exceptions that push an error code (SDM Vol. 3 Table 6-1).
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

LEGACY_PREFIXES = frozenset(b"\x66\xf2\xf3\xf0\x2e\x36\x3e\x26\x64\x65\x67")


class InsnClass(Enum):
    X87 = "x87"
    FWAIT = "fwait"
    MMX = "mmx"
    SSE = "sse"
    FXSR = "fxsave/fxrstor"
    PRIVILEGED = "privileged"
    UD = "ud"
    OTHER = "other"


@dataclass(frozen=True)
class CpuState:
    """What the rules read of the vCPU: control registers, EFER, CPL."""

    cr0: int
    cr4: int
    efer: int
    cpl: int


@dataclass(frozen=True)
class FailedAccess:
    """The first memory access of the instruction that could not be translated.

    ``error_code`` is the page walk's #PF error code, or None for a
    non-canonical address (which never reaches the page tables).
    """

    address: int
    error_code: int | None


@dataclass(frozen=True)
class Fault:
    """An exception to deliver to the guest, and the rule that chose it."""

    vector: int
    error_code: int | None
    cr2: int | None = None
    rule: str = ""

    @property
    def name(self) -> str:
        """``#PF``, ``#GP``... (the vector number for those without a name here)."""
        return f"#{Vector(self.vector).name}" if self.vector in Vector._value2member_map_ else f"#{self.vector}"

    def describe(self) -> str:
        err = "" if self.error_code is None else f"({self.error_code:#x})"
        cr2 = "" if self.cr2 is None else f" cr2={self.cr2:#x}"
        return f"{self.name}{err}{cr2}"


def _opcode(code: bytes) -> tuple[set[int], bytes]:
    """Legacy prefixes seen, and the bytes from the opcode on (REX skipped)."""
    prefixes: set[int] = set()
    i = 0
    while i < len(code) and code[i] in LEGACY_PREFIXES:
        prefixes.add(code[i])
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1
    return prefixes, code[i:]


def _modrm_reg_mod(op: bytes, at: int) -> tuple[int, int]:
    m = op[at] if len(op) > at else 0
    return (m >> 3) & 7, m >> 6


def classify(code: bytes) -> InsnClass:
    """The instruction class the rules care about (64-bit mode decoding, no VEX)."""
    prefixes, op = _opcode(code)
    if not op:
        return InsnClass.OTHER
    b0 = op[0]
    if 0xD8 <= b0 <= 0xDF:
        return InsnClass.X87
    if b0 == 0x9B:
        return InsnClass.FWAIT
    if b0 == 0xF4:
        return InsnClass.PRIVILEGED  # hlt
    if b0 != 0x0F or len(op) < 2:
        return InsnClass.OTHER
    b1 = op[1]
    simd_prefix = bool(prefixes & {0x66, 0xF2, 0xF3})
    if b1 in (0x0B, 0xB9, 0xFF):
        return InsnClass.UD
    if b1 in (0x06, 0x07, 0x08, 0x09, 0x20, 0x21, 0x22, 0x23, 0x30, 0x32):
        return InsnClass.PRIVILEGED  # clts sysret invd wbinvd mov-cr/dr wrmsr rdmsr
    if b1 == 0x00:
        reg, _ = _modrm_reg_mod(op, 2)
        return InsnClass.PRIVILEGED if reg in (2, 3) else InsnClass.OTHER  # lldt ltr
    if b1 == 0x01:
        reg, mod = _modrm_reg_mod(op, 2)
        if mod != 3 and reg in (2, 3, 6, 7) or mod == 3 and reg == 6:
            return InsnClass.PRIVILEGED  # lgdt lidt lmsw invlpg
        if len(op) > 2 and op[2] == 0xF8:
            return InsnClass.PRIVILEGED  # swapgs
        return InsnClass.OTHER
    if b1 == 0xAE:
        reg, mod = _modrm_reg_mod(op, 2)
        if mod != 3 and not simd_prefix:
            if reg in (0, 1):
                return InsnClass.FXSR
            if reg in (2, 3):
                return InsnClass.SSE  # ldmxcsr stmxcsr
        return InsnClass.OTHER
    if (0x60 <= b1 <= 0x7F or 0xD0 <= b1 <= 0xFE) and not simd_prefix:
        return InsnClass.MMX
    if (0x10 <= b1 <= 0x17 or 0x28 <= b1 <= 0x2F or 0x50 <= b1 <= 0x7F or b1 in (0xC2, 0xC4, 0xC5, 0xC6)
            or 0xD0 <= b1 <= 0xFE):
        return InsnClass.SSE
    if b1 in (0x38, 0x3A) and len(op) > 2 and not (b1 == 0x38 and op[2] >= 0xF0):
        return InsnClass.SSE if simd_prefix or b1 == 0x3A else InsnClass.MMX
    return InsnClass.OTHER


def _instruction_rule(cls: InsnClass, s: CpuState) -> Fault | None:
    """Checks made before any memory access: device-not-available, #UD, privilege."""
    if cls is InsnClass.X87 and s.cr0 & (Cr0.EM | Cr0.TS):
        return Fault(Vector.NM, None, rule="x87")
    if cls is InsnClass.FWAIT and s.cr0 & Cr0.TS and s.cr0 & Cr0.MP:
        return Fault(Vector.NM, None, rule="wait")
    if cls is InsnClass.MMX and s.cr0 & Cr0.EM:
        return Fault(Vector.UD, None, rule="mmx")
    if cls is InsnClass.SSE and (s.cr0 & Cr0.EM or not s.cr4 & Cr4.OSFXSR):
        return Fault(Vector.UD, None, rule="sse")
    if cls in (InsnClass.MMX, InsnClass.SSE) and s.cr0 & Cr0.TS:
        return Fault(Vector.NM, None, rule="simd")
    if cls is InsnClass.FXSR and s.cr0 & (Cr0.TS | Cr0.EM):
        return Fault(Vector.NM, None, rule="simd")
    if cls is InsnClass.PRIVILEGED and s.cpl > 0:
        return Fault(Vector.GP, 0, rule="priv")
    return None


def decide_fault(code: bytes, state: CpuState, raised: int | None, access: FailedAccess | None) -> Fault | None:
    """The exception the guest must see, or None when the rules find none.

    ``raised`` is unicorn's vector (None: it called the instruction invalid);
    ``access`` the first memory access that failed translation, if any.
    """
    cls = classify(code)
    fault = _instruction_rule(cls, state)
    if fault is not None:
        return fault
    if access is not None:
        if access.error_code is None:
            return Fault(Vector.GP, 0, rule="canon")
        return Fault(Vector.PF, access.error_code, cr2=access.address, rule="page")
    if raised is None:
        return Fault(Vector.UD, None, rule="ud") if cls is InsnClass.UD else None
    return Fault(raised, 0 if raised in HAS_ERROR_CODE else None, rule="cpu")
