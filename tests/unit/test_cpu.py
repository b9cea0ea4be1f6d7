"""CPUID composition and the entry-state descriptors."""
from __future__ import annotations

from xenkvm.machine.cpu import (HARDWARE, CpuProfile, FeatureMask, Reg, Segment, build_cpuid)
from xenkvm.machine.host import PVM_PROFILE, Flavour, _detect_flavour

SUPPORTED = [
    (0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
    (1, 0, 0, 0xA0671, 0x00000800, 0x00002000 | (1 << 26), 0x1F8BFBFF),
    (0xB, 0, 1, 1, 1, 0x100, 7),
    (0xB, 1, 1, 4, 1, 0x201, 7),
    (0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
    (0x4000_0001, 0, 0, 0x1, 0, 0, 0),
]


def leaf(entries, fn, index=0):
    return next(e for e in entries if e[0] == fn and e[1] == index)


def test_topology_per_vcpu():
    out = build_cpuid(SUPPORTED, 3, 4, HARDWARE)
    l1 = leaf(out, 1)
    assert l1[Reg.EBX] >> 24 == 3 and (l1[Reg.EBX] >> 16) & 0xFF == 4
    assert l1[Reg.ECX] & (1 << 31)  # hypervisor present
    assert leaf(out, 0xB, 1)[Reg.EDX] == 3


def test_profile_masks_features():
    out = build_cpuid(SUPPORTED, 0, 1, PVM_PROFILE)
    assert not leaf(out, 1)[Reg.ECX] & (1 << 13)  # CX16 hidden
    assert leaf(out, 1)[Reg.ECX] & (1 << 26)      # XSAVE untouched (handled by noxsave)
    custom = CpuProfile("x", (FeatureMask(0xB, Reg.ECX, 0x100, index=0),))
    out = build_cpuid(SUPPORTED, 0, 1, custom)
    assert leaf(out, 0xB, 0)[Reg.ECX] == 0 and leaf(out, 0xB, 1)[Reg.ECX] == 0x201


def test_hypervisor_leaves_replaced_when_given():
    mine = [(0x4000_0000, 0, 0, 0x4000_0002, 1, 2, 3)]
    out = build_cpuid(SUPPORTED, 0, 1, HARDWARE, mine)
    hv = [e for e in out if e[0] >> 8 == 0x400000]
    assert hv == mine
    kept = build_cpuid(SUPPORTED, 0, 1, HARDWARE)
    assert len([e for e in kept if e[0] >> 8 == 0x400000]) == 2


def test_segment_descriptors():
    # Well-known encodings: flat 32-bit code 0x00cf9b000000ffff, 64-bit code 0x00af9b000000ffff,
    # flat data 0x00cf93000000ffff.
    assert Segment(0x10, 0xB).descriptor() == 0x00CF9B000000FFFF
    assert Segment(0x10, 0xB, db=0, l=1).descriptor() == 0x00AF9B000000FFFF
    assert Segment(0x18, 0x3).descriptor() == 0x00CF93000000FFFF
    assert Segment(0x20, 0xB, s=0, db=0, limit=0x67, g=0).descriptor() == 0x00008B0000000067


def test_flavour_detection(tmp_path):
    (tmp_path / "kvm_pvm").mkdir()
    assert _detect_flavour(str(tmp_path)) is Flavour.PVM
    (tmp_path / "kvm_pvm").rmdir()
    (tmp_path / "kvm_amd").mkdir()
    assert _detect_flavour(str(tmp_path)) is Flavour.SVM
    (tmp_path / "kvm_amd").rmdir()
    assert _detect_flavour(str(tmp_path)) is Flavour.UNKNOWN
