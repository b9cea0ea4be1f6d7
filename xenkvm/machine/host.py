"""What this host's KVM is and can do, decided once and asked by everything else.

Flavours: hardware KVM (``kvm_intel``/``kvm_amd``: VT-x or SVM) or PVM
(``kvm_pvm``: guest ring 0 is emulated, slowly, and the emulator refuses some
instructions).  From the flavour and the capabilities follow the CPU profile,
the kernel parameters a Linux guest needs here, which hypercall traps are
possible, and whether emulation failures go to ``machine.gaps``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.system import Kvm
from xenkvm.machine.cpu import HARDWARE, CpuProfile, FeatureMask, Reg


class Flavour(str, Enum):
    VMX = "vmx"
    SVM = "svm"
    PVM = "pvm"
    UNKNOWN = "unknown"


#: Capabilities reported by ``xenkvm info`` (name -> KVM_CAP_* number).
REPORTED_CAPS = {
    name: getattr(lib, f"KVM_CAP_{name}") for name in (
        "IRQCHIP", "USER_MEMORY", "NR_MEMSLOTS", "MAX_VCPUS", "PIT2", "SIGNAL_MSI", "IOEVENTFD",
        "SET_GUEST_DEBUG", "IMMEDIATE_EXIT", "SYNC_REGS", "X86_USER_SPACE_MSR",
        "X86_MSR_FILTER", "XEN_HVM", "EXIT_HYPERCALL", "TSC_CONTROL", "GET_TSC_KHZ",
        "VCPU_EVENTS", "ADJUST_CLOCK", "SPLIT_IRQCHIP", "X2APIC_API")
}

#: Guest TSC frequency the kernel is told on PVM (``tsc_early_khz``): ~15x the real one of
#: today's hosts, so guest time runs ~15x slower than wall time (see PVM_PROFILE).
PVM_DILATED_TSC_KHZ = 39_000_000

#: PVM's emulator refuses cmpxchg16b (SLUB uses it when CPUID says CX16); hiding CX16 works there.
PVM_PROFILE = CpuProfile(
    "pvm",
    masks=(FeatureMask(1, Reg.ECX, 1 << 13, why="cmpxchg16b is refused by the PVM emulator"),),
    kernel_params=(
        # CPUID cannot hide XSAVE/SSSE3/... on PVM (KVM forces them back), so the kernel is told:
        # noxsave (xsaves/xrstor refused), clearcpuid= PCLMULQDQ(129) SSSE3(137) SSE4.1(147)
        # SSE4.2(148) AES(153) so the kernel picks generic code over SIMD at CPL0, and no
        # soft-lockup watchdog (emulated ring 0 is ~1.5 M instructions/s).
        "noxsave", "clearcpuid=129,137,147,148,153", "nosoftlockup",
        # Time dilation.  A timer tick costs ~5-15 ms of emulated ring 0, so at HZ=250 the
        # guest livelocks in its tick handler.  With kvmclock off the kernel's clock is the
        # TSC at the frequency it is told, ~15x the real one: the TSC-deadline LAPIC timer
        # then ticks every ~60 ms of wall time and the boot makes progress between ticks.
        # pmtmr= points the ACPI PM timer at an unclaimed port, so the TSC is never
        # "refined" back to its real frequency; tsc=reliable skips the clocksource watchdog.
        "no-kvmclock", f"tsc_early_khz={PVM_DILATED_TSC_KHZ}", "tsc=reliable", "pmtmr=0x6f0",
    ),
)


def _detect_flavour(modules_dir: str = "/sys/module") -> Flavour:
    for module, flavour in (("kvm_pvm", Flavour.PVM), ("kvm_intel", Flavour.VMX), ("kvm_amd", Flavour.SVM)):
        if os.path.isdir(os.path.join(modules_dir, module)):
            return flavour
    return Flavour.UNKNOWN


@dataclass(frozen=True)
class Host:
    flavour: Flavour
    caps: dict[str, int] = field(default_factory=dict)
    xen_hvm_flags: int = 0

    @classmethod
    def probe(cls, kvm: Kvm, modules_dir: str = "/sys/module") -> "Host":
        caps = {name: kvm.check_extension(num) for name, num in REPORTED_CAPS.items()}
        return cls(_detect_flavour(modules_dir), caps, caps.get("XEN_HVM", 0))

    @property
    def emulates_ring0(self) -> bool:
        """True on PVM: ring-0 code runs in KVM's instruction emulator."""
        return self.flavour is Flavour.PVM

    @property
    def cpu_profile(self) -> CpuProfile:
        return PVM_PROFILE if self.flavour is Flavour.PVM else HARDWARE

    @property
    def dilated_tsc_khz(self) -> int | None:
        """The TSC rate guests are told on this host (time dilation), or None for the real one."""
        return PVM_DILATED_TSC_KHZ if self.flavour is Flavour.PVM else None

    @property
    def kernel_params(self) -> tuple[str, ...]:
        return self.cpu_profile.kernel_params

    @property
    def has_ioeventfd(self) -> bool:
        """KVM_IOEVENTFD: a guest's port write can signal an eventfd inside KVM (xen/sendstub.py)."""
        return bool(self.caps.get("IOEVENTFD"))

    def hypercall_traps(self) -> list[str]:
        """The Xen hypercall traps this host supports, best first."""
        traps = []
        if self.xen_hvm_flags & lib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL:
            traps.append("kvm-xen")
        if self.caps.get("X86_USER_SPACE_MSR") and self.caps.get("X86_MSR_FILTER"):
            traps.append("hypercall-page")
        traps.append("patch")  # port-I/O exits need no capability
        if self.caps.get("SET_GUEST_DEBUG"):
            traps.append("breakpoint")
        return traps

    def auto_trap(self) -> str:
        """What ``hypercall_trap: auto`` picks on this host, and why (for ``xenkvm info``)."""
        traps = self.hypercall_traps()
        if "kvm-xen" in traps:
            return "kvm-xen (KVM_CAP_XEN_HVM with INTERCEPT_HCALL: KVM catches every vmcall/vmmcall)"
        page = ("hypercall-page for guests that ask for one, "
                if "hypercall-page" in traps else "no hypercall page (no user-space MSR filter), ")
        fallback = ("; breakpoint only where a site lies outside the loaded segments, or when asked for"
                    if "breakpoint" in traps else "")
        return (page + "patch for an image's own vmcall/vmmcall sites (no KVM_XEN here; the port exit "
                "needs no debug registers)" + fallback)

    def describe(self) -> list[str]:
        """Lines for ``xenkvm info``."""
        names = {Flavour.PVM: "PVM (kvm_pvm: ring 0 emulated in software)",
                 Flavour.VMX: "hardware (Intel VT-x, kvm_intel)",
                 Flavour.SVM: "hardware (AMD SVM, kvm_amd)",
                 Flavour.UNKNOWN: "unknown"}
        lines = [f"KVM flavour: {names[self.flavour]}",
                 f"CPU profile: {self.cpu_profile.name}"]
        for m in self.cpu_profile.masks:
            lines.append(f"  hides CPUID.{m.leaf:#x}.{m.reg.name} {m.bits:#x}: {m.why}")
        if self.kernel_params:
            lines.append(f"Linux guest parameters added: {' '.join(self.kernel_params)}")
        lines.append("hypercall traps possible: " + (", ".join(self.hypercall_traps()) or "none"))
        lines.append("hypercall trap auto picks: " + self.auto_trap())
        lines.append("capabilities:")
        lines.extend(f"  KVM_CAP_{name:<20} {value:#x}" for name, value in self.caps.items())
        return lines
