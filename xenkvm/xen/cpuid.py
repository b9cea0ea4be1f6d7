"""Xen's CPUID leaves (``arch-x86/cpuid.h``), replacing KVM's own hypervisor leaves.

Linux picks the hypervisor with the highest base, so KVM's ``KVMKVMKVM``
leaves must not remain above ours; ``machine.cpu.build_cpuid`` drops every
KVM leaf when these are given.
"""
from __future__ import annotations

from xenkvm.xen.abi import lib

BASE = 0x4000_0000
MAX_LEAF = BASE + 5
HYPERCALL_MSR = 0x4000_0000


def xen_leaves(vcpu_id: int, version: tuple[int, int], domid: int) -> list[tuple[int, int, int, int, int, int, int]]:
    """(function, index, flags, eax, ebx, ecx, edx) entries for one vCPU."""
    major, minor = version
    hvm_flags = (lib.XEN_HVM_CPUID_VCPU_ID_PRESENT | lib.XEN_HVM_CPUID_DOMID_PRESENT
                 | lib.XEN_HVM_CPUID_UPCALL_VECTOR)
    return [
        (BASE, 0, 0, MAX_LEAF, lib.XEN_CPUID_SIGNATURE_EBX, lib.XEN_CPUID_SIGNATURE_ECX,
         lib.XEN_CPUID_SIGNATURE_EDX),
        (BASE + 1, 0, 0, major << 16 | minor, 0, 0, 0),
        (BASE + 2, 0, 0, 1, HYPERCALL_MSR, 0, 0),      # one hypercall page, written via this MSR
        (BASE + 3, 0, 1, 0, 0, 0, 0),                  # TSC leaf (sub-leaf 0: mode default)
        (BASE + 4, 0, 1, hvm_flags, vcpu_id, domid, 0),
        (BASE + 5, 0, 0, 0, 0, 0, 0),                  # PV-only leaf: empty for HVM/PVH
    ]
