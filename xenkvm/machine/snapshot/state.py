"""The state a snapshot holds for the machine itself: vCPUs, the in-kernel chips and clock, devices.

vCPU state is read and written on the vCPU's own thread (KVM requires it) while the vCPU is
out of KVM_RUN with its last exit completed (machine/snapshot/pause.py).  Each piece is the
kernel's struct as bytes (layouts from <linux/kvm.h> through the kvm cffi module), so nothing
here counts offsets; a restore on a host whose struct sizes differ is refused by the binding.

Order on restore follows what KVM needs: special registers (APIC base, EFER) before the
LAPIC and MSRs; MSRs before events; MP state last but one; debug registers last (as QEMU's
kvm_arch_put_registers).  MSRs: KVM_GET_MSR_INDEX_LIST's list; one the host refuses to read
is left out (logged), and one it refuses to write is reported by name, never skipped silently.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.errors import KvmError
from xenkvm.kvm.vcpu import Vcpu
from xenkvm.machine.snapshot.format import SnapshotError, b64, unb64

if TYPE_CHECKING:
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

IRQCHIPS = {"pic_master": "KVM_IRQCHIP_PIC_MASTER", "pic_slave": "KVM_IRQCHIP_PIC_SLAVE",
            "ioapic": "KVM_IRQCHIP_IOAPIC"}
MSR_IA32_TSC = 0x10


def vcpu_kinds(vcpu: Vcpu) -> list[str]:
    """The state pieces this host offers, in restore order (SREGS2 and XSAVE2 when present)."""
    cap = vcpu.vm.check_extension
    kinds = ["sregs2" if cap(lib.KVM_CAP_SREGS2) else "sregs", "regs"]
    kinds.append("xsave2" if cap(lib.KVM_CAP_XSAVE2) else "xsave" if cap(lib.KVM_CAP_XSAVE) else "fpu")
    if cap(lib.KVM_CAP_XCRS):
        kinds.append("xcrs")
    return kinds + ["msrs", "events", "mp_state", "lapic"] + (["debugregs"] if cap(lib.KVM_CAP_DEBUGREGS) else [])


def read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """Every readable MSR of ``indices``: KVM_GET_MSRS stops at the first it refuses; skip it, go on."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.update(got)
        if len(got) == len(rest):
            break
        log.debug("vcpu%d: MSR %#x not readable, not saved", vcpu.id, rest[len(got)])
        rest = rest[len(got) + 1:]
    return values


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> dict[str, Any]:
    """One vCPU's whole state (its own thread, out of KVM_RUN, last exit completed)."""
    st: dict[str, Any] = {"id": vcpu.id, "order": vcpu_kinds(vcpu)}
    for kind in st["order"]:
        if kind == "msrs":
            st["msrs"] = {f"{i:#x}": v for i, v in read_msrs(vcpu, msr_indices).items()}
        else:
            st[kind] = b64(vcpu.get_state_blob(kind))
    st["tsc_khz"] = vcpu.get_tsc_khz()
    if vcpu.has_tsc_offset():
        st["tsc_offset"] = vcpu.get_tsc_offset()
    return st


def apply_vcpus(vcpus: list[Vcpu], states: list[dict[str, Any]]) -> None:
    """Load saved vCPU states into fresh vCPUs of the same configuration, in order."""
    shift = TscShift()
    for vcpu, st in zip(vcpus, states):
        apply_vcpu(vcpu, st, shift)


def apply_vcpu(vcpu: Vcpu, st: dict[str, Any], shift: "TscShift | None" = None) -> None:
    """Load a saved vCPU state into a fresh vCPU: the TSC's rate, then its value, then the rest."""
    _match_tsc_rate(vcpu, int(st["tsc_khz"]))
    msrs = {int(k, 16): int(v) for k, v in st["msrs"].items()}
    if MSR_IA32_TSC in msrs and vcpu.has_tsc_offset():
        (shift or TscShift()).apply(vcpu, msrs.pop(MSR_IA32_TSC), st.get("tsc_offset"))
    for kind in st["order"]:
        if kind == "msrs":
            _write_msrs(vcpu, msrs)
        else:
            vcpu.set_state_blob(kind, unb64(st[kind]))


class TscShift:
    """Puts each restored vCPU's TSC back through the TSC offset attribute, not MSR_IA32_TSC.

    A host write of MSR_IA32_TSC goes through KVM's kvm_synchronize_tsc, which takes a value
    within one second's worth of cycles of "the last write plus the time since" as an attempt
    to synchronise with it and keeps the *old* offset instead.  The last write of a fresh VM is
    vCPU creation's zero, so a guest saved less than about a second of TSC after it started came
    back with its TSC counting from vCPU creation: backwards (seen under Linux 6.1; newer KVM
    only matches after a first user write).  The offset attribute is applied as given.

    The first vCPU's TSC continues from its saved value; every other one keeps its saved
    offset's distance from the first, so TSCs in step before the snapshot stay in step (their
    values were read at slightly different instants while the vCPUs parked).
    """

    def __init__(self) -> None:
        self.delta: int | None = None   #: new offset - saved offset, set by the first vCPU

    def apply(self, vcpu: Vcpu, saved_tsc: int, saved_offset: int | None) -> None:
        if self.delta is None or saved_offset is None:
            current = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
            offset = vcpu.get_tsc_offset() + saved_tsc - current
            if saved_offset is not None:
                self.delta = offset - saved_offset
        else:
            offset = saved_offset + self.delta
        vcpu.set_tsc_offset(offset)


def _match_tsc_rate(vcpu: Vcpu, khz: int) -> None:
    """The guest's TSC must tick at the saved rate: set it (KVM_CAP_TSC_CONTROL) or refuse."""
    if vcpu.get_tsc_khz() == khz:
        return
    try:
        vcpu.set_tsc_khz(khz)
        why = "" if vcpu.get_tsc_khz() == khz else "it did not take"
    except KvmError as e:
        why = str(e)
    if why:
        raise SnapshotError(f"vcpu{vcpu.id}: saved with a {khz} kHz TSC, this host runs "
                            f"{vcpu.get_tsc_khz()} kHz and cannot set that rate ({why})")


def _write_msrs(vcpu: Vcpu, values: dict[int, int]) -> None:
    # the TSC first (when it is written as an MSR): KVM derives TSC_ADJUST and the TSC deadline from it
    ordered = dict(sorted(values.items(), key=lambda kv: kv[0] != MSR_IA32_TSC))
    try:
        vcpu.set_msrs(ordered)
    except KvmError as e:
        raise SnapshotError(f"vcpu{vcpu.id}: this host refuses a saved MSR ({e})") from None


def capture_vm(machine: "Machine") -> dict[str, Any]:
    """The VM-wide in-kernel state: PIC master/slave, IOAPIC, PIT and the kvmclock."""
    vm = machine.vm
    st: dict[str, Any] = {name: b64(vm.get_irqchip(getattr(lib, chip))) for name, chip in IRQCHIPS.items()}
    st["pit2"] = b64(vm.get_pit2())
    st["kvmclock_ns"] = vm.get_clock()
    st["guest_ns"] = machine.clock.ns()
    return st


def apply_vm(machine: "Machine", st: dict[str, Any]) -> None:
    vm = machine.vm
    for name in IRQCHIPS:
        vm.set_irqchip(unb64(st[name]))
    vm.set_pit2(unb64(st["pit2"]))
    vm.set_clock(int(st["kvmclock_ns"]))


DEVICES = ("serial", "pm", "rtc", "pci")


def capture_devices(machine: "Machine") -> dict[str, Any]:
    return {name: getattr(machine, name).to_state() for name in DEVICES}


def apply_devices(machine: "Machine", st: dict[str, Any]) -> None:
    for name in DEVICES:
        getattr(machine, name).from_state(st[name])
