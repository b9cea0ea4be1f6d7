"""A KVM virtual machine fd: memory slots, in-kernel irqchip/PIT, MSI, MSR filters, KVM_XEN."""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from xenkvm.kvm._kvm_cffi import ffi, lib
from xenkvm.kvm.errors import KvmError, check
from xenkvm.kvm.system import Kvm

log = logging.getLogger(__name__)

#: KVM's documented minimum when KVM_CAP_NR_MEMSLOTS is not reported (api.rst: "assume 32").
MIN_MEMSLOTS = 32


class MappedRegion(Protocol):
    """What :meth:`Vm.map_region` needs of a memory region (machine.memory.Region)."""

    gpa: int
    size: int
    host_addr: int
    slot: int


@dataclass(frozen=True)
class MsrRange:
    """MSRs [base, base+count) whose reads/writes are sent to userspace."""

    base: int
    count: int
    read: bool = True
    write: bool = True


class Vm:
    """One VM.  Owns its fd; vCPUs are created from it."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self._next_slot = 0
        self._free_slots: list[int] = []   #: slot numbers deleted and free for reuse
        self.nr_memslots = self.check_extension(lib.KVM_CAP_NR_MEMSLOTS) or MIN_MEMSLOTS
        self._keepalive: list[object] = []  # cffi buffers the kernel keeps pointers to

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, name: str, req: int, arg: object) -> int:
        return check(name, lib.xk_ioctl(self.fd, req, arg))

    def check_extension(self, cap: int) -> int:
        """Per-VM KVM_CHECK_EXTENSION (some answers differ from the system fd's)."""
        return check("KVM_CHECK_EXTENSION", lib.xk_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    # -- memory --------------------------------------------------------------
    @property
    def slots_used(self) -> int:
        """Memory slots in use now (each one costs KVM a memslot and the VMM its mapping)."""
        return self._next_slot - len(self._free_slots)

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if self._next_slot >= self.nr_memslots:
            raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOSPC,
                           f"all {self.nr_memslots} memory slots in use")
        self._next_slot += 1
        return self._next_slot - 1

    def set_memory_region(self, gpa: int, size: int, host_addr: int, slot: int | None = None) -> int:
        """Map ``size`` bytes at host address ``host_addr`` to guest-physical ``gpa``.

        Without ``slot`` a free slot is taken, and given back if KVM refuses the
        region, so a failed call leaves the VM as it was.
        """
        if slot is None:
            slot = self._take_slot()
            try:
                return self._set_region(slot, gpa, size, host_addr)
            except KvmError:
                self._free_slots.append(slot)
                raise
        return self._set_region(slot, gpa, size, host_addr)

    def delete_memory_region(self, slot: int) -> None:
        """Remove memslot ``slot`` (size 0, as KVM's API defines) and free its number."""
        if not 0 <= slot < self._next_slot or slot in self._free_slots:
            raise ValueError(f"memslot {slot} is not in use")
        self._set_region(slot, 0, 0, 0)
        self._free_slots.append(slot)

    def map_region(self, region: MappedRegion) -> None:
        """GuestMemory listener: back ``region`` with a new memslot (recorded in ``region.slot``)."""
        region.slot = self.set_memory_region(region.gpa, region.size, region.host_addr)

    def unmap_region(self, region: MappedRegion) -> None:
        """GuestMemory listener: drop ``region``'s memslot (the guest no longer reaches it)."""
        if region.slot >= 0:
            self.delete_memory_region(region.slot)
            region.slot = -1

    def _set_region(self, slot: int, gpa: int, size: int, host_addr: int) -> int:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = 0
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_addr
        self._ioctl("KVM_SET_USER_MEMORY_REGION", lib.KVM_SET_USER_MEMORY_REGION, region)
        log.debug("memslot %d: gpa %#x size %#x", slot, gpa, size)
        return slot

    def set_tss_addr(self, addr: int) -> None:
        check("KVM_SET_TSS_ADDR", lib.xk_ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr))

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    # -- interrupts ------------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs."""
        check("KVM_CREATE_IRQCHIP", lib.xk_ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0))

    def create_pit2(self) -> None:
        self._ioctl("KVM_CREATE_PIT2", lib.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *"))

    def irq_line(self, irq: int, level: int) -> None:
        arg = ffi.new("struct kvm_irq_level *")
        arg.irq = irq
        arg.level = level
        self._ioctl("KVM_IRQ_LINE", lib.KVM_IRQ_LINE, arg)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI; returns >0 when delivered, 0 when the guest blocked it."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data
        return self._ioctl("KVM_SIGNAL_MSI", lib.KVM_SIGNAL_MSI, msi)

    def port_eventfd(self, port: int, size: int, value: int, fd: int, assign: bool = True) -> None:
        """KVM_IOEVENTFD: a guest ``out`` of ``size`` bytes of ``value`` to I/O ``port`` signals
        eventfd ``fd`` inside KVM (no exit); ``assign=False`` removes that binding again."""
        arg = ffi.new("struct kvm_ioeventfd *")
        arg.datamatch, arg.addr, arg.len, arg.fd = value, port, size, fd
        arg.flags = lib.KVM_IOEVENTFD_FLAG_PIO | lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if not assign:
            arg.flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        self._ioctl("KVM_IOEVENTFD", lib.KVM_IOEVENTFD, arg)

    def signal_lapic_vector(self, apic_id: int, vector: int) -> int:
        """Fixed, edge, physical-destination MSI of ``vector`` to one LAPIC."""
        return self.signal_msi(0xFEE0_0000 | (apic_id & 0xFF) << 12, vector & 0xFF)

    # -- capabilities and MSRs --------------------------------------------------
    def enable_cap(self, cap: int, *args: int) -> None:
        arg = ffi.new("struct kvm_enable_cap *")
        arg.cap = cap
        for i, a in enumerate(args):
            arg.args[i] = a
        self._ioctl("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, arg)

    def enable_user_space_msr(self, reasons: int) -> None:
        """Send MSR accesses KVM would fault (``reasons``: KVM_MSR_EXIT_REASON_*) to userspace."""
        self.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, reasons)

    def set_msr_filter(self, ranges: list[MsrRange], default_allow: bool = True) -> None:
        """Deny the listed MSRs in-kernel, so that (with user-space MSR exits) they reach us."""
        filt = ffi.new("struct kvm_msr_filter *")
        filt.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else lib.KVM_MSR_FILTER_DEFAULT_DENY
        if len(ranges) > len(filt.ranges):
            raise ValueError(f"at most {len(filt.ranges)} MSR filter ranges")
        bitmaps = []
        for i, r in enumerate(ranges):
            bitmap = ffi.new("unsigned char[]", (r.count + 7) // 8)  # zero bits = deny = exit
            bitmaps.append(bitmap)
            fr = filt.ranges[i]
            fr.flags = (lib.KVM_MSR_FILTER_READ if r.read else 0) | (lib.KVM_MSR_FILTER_WRITE if r.write else 0)
            fr.nmsrs = r.count
            fr.base = r.base
            fr.bitmap = bitmap
        self._ioctl("KVM_X86_SET_MSR_FILTER", lib.KVM_X86_SET_MSR_FILTER, filt)
        self._keepalive.extend(bitmaps)

    # -- KVM_XEN (hosts that have KVM_CAP_XEN_HVM) --------------------------------
    def xen_hvm_config(self, flags: int, msr: int) -> None:
        cfg = ffi.new("struct kvm_xen_hvm_config *")
        cfg.flags = flags
        cfg.msr = msr
        self._ioctl("KVM_XEN_HVM_CONFIG", lib.KVM_XEN_HVM_CONFIG, cfg)

    def xen_hvm_set_attr(self, attr_type: int, payload: bytes) -> None:
        """KVM_XEN_HVM_SET_ATTR: ``payload`` fills the attribute's union ``u``."""
        buf = xen_attr_buffer(lib.XK_XEN_HVM_ATTR_SIZE, lib.XK_XEN_ATTR_U_OFFSET, attr_type, payload)
        self._ioctl("KVM_XEN_HVM_SET_ATTR", lib.KVM_XEN_HVM_SET_ATTR, buf)

    def xen_evtchn_send(self, payload: bytes) -> None:
        """KVM_XEN_HVM_EVTCHN_SEND with a packed ``struct kvm_irq_routing_xen_evtchn``."""
        buf = ffi.new("char[]", lib.XK_XEN_EVTCHN_SIZE)
        ffi.memmove(buf, payload, min(len(payload), lib.XK_XEN_EVTCHN_SIZE))
        self._ioctl("KVM_XEN_HVM_EVTCHN_SEND", lib.KVM_XEN_HVM_EVTCHN_SEND, buf)

    # -- whole state (snapshots) ----------------------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP for one chip (KVM_IRQCHIP_PIC_MASTER/_SLAVE/_IOAPIC), as struct bytes."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        self._ioctl("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, chip)
        return bytes(ffi.buffer(chip))

    def set_irqchip(self, data: bytes) -> None:
        self._ioctl("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP, _struct_from("struct kvm_irqchip", data))

    def get_pit2(self) -> bytes:
        pit = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", lib.KVM_GET_PIT2, pit)
        return bytes(ffi.buffer(pit))

    def set_pit2(self, data: bytes) -> None:
        self._ioctl("KVM_SET_PIT2", lib.KVM_SET_PIT2, _struct_from("struct kvm_pit_state2", data))

    def get_clock(self) -> int:
        """The kvmclock's current value in ns (KVM_GET_CLOCK)."""
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", lib.KVM_GET_CLOCK, data)
        return data.clock

    def set_clock(self, ns: int) -> None:
        """Make the kvmclock read ``ns`` now (KVM_SET_CLOCK, no flags: the value applies at once)."""
        data = ffi.new("struct kvm_clock_data *")
        data.clock = ns
        self._ioctl("KVM_SET_CLOCK", lib.KVM_SET_CLOCK, data)

    # -- vCPUs --------------------------------------------------------------------
    def create_vcpu_fd(self, vcpu_id: int) -> int:
        return check("KVM_CREATE_VCPU", lib.xk_ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id))


def _struct_from(ctype: str, data: bytes) -> object:
    """A ``ctype *`` holding ``data``, which must be exactly this host's struct size."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise KvmError(ctype, 22, f"{len(data)} bytes of state, this host's struct takes {size}")
    p = ffi.new(f"{ctype} *")
    ffi.memmove(p, data, size)
    return p


def xen_attr_buffer(size: int, u_offset: int, attr_type: int, payload: bytes) -> object:
    """A zeroed kvm_xen_*_attr of the header's size: type (u16) then ``payload`` at ``u``."""
    if u_offset + len(payload) > size:
        raise ValueError("KVM_XEN attribute payload too large")
    buf = ffi.new("char[]", size)
    ffi.memmove(buf, attr_type.to_bytes(2, "little"), 2)
    ffi.memmove(buf + u_offset, payload, len(payload))
    return buf
