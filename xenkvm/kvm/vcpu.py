"""A KVM vCPU: the shared ``kvm_run`` page and the register/state ioctls.

Exit-specific members of ``kvm_run`` are exposed as typed cffi pointers
(``exit_io``, ``exit_debug`` ...) that all alias the same union, so a run-loop
reads them without copying.  With KVM_CAP_SYNC_REGS the general registers
also live in ``kvm_run``: :meth:`sync_regs` gives them after any exit and
:meth:`mark_regs_dirty` hands changes back on the next KVM_RUN, which makes a
trap-and-fixup one ioctl instead of three.
"""
from __future__ import annotations

import logging
import mmap
import os

from xenkvm.kvm._kvm_cffi import ffi, lib
from xenkvm.kvm.errors import KvmError, check, new_varstruct
from xenkvm.kvm.vm import Vm, xen_attr_buffer

log = logging.getLogger(__name__)

EINTR = 4
EAGAIN = 11

#: Debug register 7 bits for an execute breakpoint in slot n: local enable.
DR7_LOCAL_ENABLE = (1 << 0, 1 << 2, 1 << 4, 1 << 6)
DR7_GE = 1 << 9


class Vcpu:
    """One vCPU of a VM.  ``run()`` must be called from a single thread."""

    def __init__(self, vm: Vm, vcpu_id: int, sync_regs: bool = True):
        self.vm = vm
        self.id = vcpu_id
        self.fd = vm.create_vcpu_fd(vcpu_id)
        size = vm.kvm.vcpu_mmap_size
        self._mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ffi.from_buffer(self._mm)
        self._base = base
        self.run_struct = ffi.cast("struct kvm_run *", base)
        #: kvm_run's host address, for C loops built as other cffi modules (xen/fastpath.py)
        self.run_address = int(ffi.cast("uintptr_t", base))
        exit_ptr = base + lib.XK_RUN_EXIT_OFFSET
        self.exit_io = ffi.cast("xk_exit_io *", exit_ptr)
        self.exit_mmio = ffi.cast("xk_exit_mmio *", exit_ptr)
        self.exit_debug = ffi.cast("xk_exit_debug *", exit_ptr)
        self.exit_internal = ffi.cast("xk_exit_internal *", exit_ptr)
        self.exit_system_event = ffi.cast("xk_exit_system_event *", exit_ptr)
        self.exit_msr = ffi.cast("xk_exit_msr *", exit_ptr)
        self.exit_fail_entry = ffi.cast("xk_exit_fail_entry *", exit_ptr)
        self.exit_hw = ffi.cast("xk_exit_hw *", exit_ptr)
        self.exit_hypercall = ffi.cast("xk_exit_hypercall *", exit_ptr)
        self.exit_xen = ffi.cast("xk_exit_xen *", exit_ptr)
        self.exit_xen_hcall = ffi.cast("xk_xen_hcall *", exit_ptr + lib.XK_XEN_HCALL_OFFSET)
        self._sync = ffi.cast("struct kvm_sync_regs *", base + lib.XK_RUN_SYNC_OFFSET)
        self.has_sync_regs = bool(sync_regs and vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS)
                                  & lib.KVM_SYNC_X86_REGS)
        if self.has_sync_regs:
            self.run_struct.kvm_valid_regs = lib.KVM_SYNC_X86_REGS
        self.has_sync_sregs = False

    def close(self) -> None:
        if self.fd >= 0:
            self.exit_io = self.exit_mmio = self.exit_debug = None  # drop views into the mmap
            self.run_struct = self._sync = self._base = None
            try:
                self._mm.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, name: str, req: int, arg: object) -> int:
        return check(name, lib.xk_ioctl(self.fd, req, arg))

    # -- running -------------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN once (GIL released); returns the exit reason, KVM_EXIT_INTR on a signal.

        On EINTR ``kvm_run.exit_reason`` is made KVM_EXIT_INTR too: KVM leaves the previous
        exit's reason there when ``immediate_exit`` makes it return right after completing
        that exit, and readers of ``run_struct`` (snapshot parking) must see this return.
        """
        return self.exit_of(lib.xk_ioctl(self.fd, lib.KVM_RUN, ffi.NULL))

    def exit_of(self, ret: int) -> int:
        """The exit reason for KVM_RUN's result ``ret`` (also a C loop's that ran it, xen/fastpath.py)."""
        if ret < 0:
            if ret in (-EINTR, -EAGAIN):
                self.run_struct.exit_reason = lib.KVM_EXIT_INTR
                return lib.KVM_EXIT_INTR
            raise KvmError("KVM_RUN", -ret, f"vcpu {self.id}")
        return self.run_struct.exit_reason

    def set_immediate_exit(self, value: bool) -> None:
        """While set, KVM_RUN returns -EINTR at once (a stop request cannot be missed)."""
        self.run_struct.immediate_exit = 1 if value else 0

    def io_data(self) -> memoryview:
        """The data bytes of the current KVM_EXIT_IO (size * count bytes, in kvm_run)."""
        io = self.exit_io
        off = io.data_offset
        n = io.size * io.count
        if off + n > len(self._mm):
            raise KvmError("KVM_RUN", 0, "io data outside kvm_run")
        return memoryview(self._mm)[off:off + n]

    # -- registers -------------------------------------------------------------
    def sync_regs(self):
        """The general registers after an exit (in kvm_run when sync regs are on)."""
        if self.has_sync_regs:
            return self._sync.regs
        return self.get_regs()

    def enable_sync_sregs(self) -> bool:
        """Have KVM also publish the special registers in kvm_run at every exit.

        Hypercall traps need the CPU mode per call; reading it from kvm_run
        saves a KVM_GET_SREGS ioctl each time.  Never marked dirty: set_sregs()
        remains the only way to change them.
        """
        caps = self.vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS)
        if self.has_sync_regs and caps & lib.KVM_SYNC_X86_SREGS:
            self.run_struct.kvm_valid_regs |= lib.KVM_SYNC_X86_SREGS
            self.has_sync_sregs = True
        return self.has_sync_sregs

    def sync_sregs(self):
        """The special registers after an exit (in kvm_run once enable_sync_sregs() succeeded); read-only."""
        if self.has_sync_sregs:
            return self._sync.sregs
        return self.get_sregs()

    def efer(self) -> int:
        """EFER after the last exit (from kvm_run when synced, else KVM_GET_SREGS)."""
        if self.has_sync_sregs:
            return self._sync.sregs.efer
        return self.get_sregs().efer

    def mark_regs_dirty(self, regs=None) -> None:
        """Hand register changes back: via kvm_run's dirty bit, or KVM_SET_REGS."""
        if self.has_sync_regs:
            self.run_struct.kvm_dirty_regs |= lib.KVM_SYNC_X86_REGS
        else:
            self.set_regs(regs)

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        self._ioctl("KVM_GET_REGS", lib.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        self._ioctl("KVM_SET_REGS", lib.KVM_SET_REGS, regs)
        if self.has_sync_regs:  # keep the copy in kvm_run from overwriting ours
            self.run_struct.kvm_dirty_regs &= ~lib.KVM_SYNC_X86_REGS
            ffi.memmove(ffi.addressof(self._sync.regs), regs, ffi.sizeof("struct kvm_regs"))

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl("KVM_GET_SREGS", lib.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        self._ioctl("KVM_SET_SREGS", lib.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        self._ioctl("KVM_GET_FPU", lib.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu) -> None:
        self._ioctl("KVM_SET_FPU", lib.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        _owner, buf = new_varstruct("struct kvm_msrs", "entries", len(indices))
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = self._ioctl("KVM_GET_MSRS", lib.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        _owner, buf = new_varstruct("struct kvm_msrs", "entries", len(values))
        buf.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        n = self._ioctl("KVM_SET_MSRS", lib.KVM_SET_MSRS, buf)
        if n != len(values):
            bad = list(values)[n]
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {bad:#x} rejected")

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        _owner, buf = new_varstruct("struct kvm_cpuid2", "entries", len(entries))
        buf.nent = len(entries)
        for i, (fn, idx, flags, a, b, c, d) in enumerate(entries):
            e = buf.entries[i]
            e.function, e.index, e.flags = fn, idx, flags
            e.eax, e.ebx, e.ecx, e.edx = a, b, c, d
        self._ioctl("KVM_SET_CPUID2", lib.KVM_SET_CPUID2, buf)

    def get_cpuid(self, max_entries: int = 256) -> list[tuple[int, int, int, int, int, int, int]]:
        _owner, buf = new_varstruct("struct kvm_cpuid2", "entries", max_entries)
        buf.nent = max_entries
        self._ioctl("KVM_GET_CPUID2", lib.KVM_GET_CPUID2, buf)
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (buf.entries[i] for i in range(buf.nent))]

    def get_lapic(self) -> bytes:
        st = ffi.new("struct kvm_lapic_state *")
        self._ioctl("KVM_GET_LAPIC", lib.KVM_GET_LAPIC, st)
        return bytes(ffi.buffer(st.regs))

    def set_lapic(self, regs: bytes) -> None:
        st = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(st.regs, regs, min(len(regs), ffi.sizeof(st.regs)))
        self._ioctl("KVM_SET_LAPIC", lib.KVM_SET_LAPIC, st)

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        self._ioctl("KVM_GET_MP_STATE", lib.KVM_GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        st = ffi.new("struct kvm_mp_state *")
        st.mp_state = state
        self._ioctl("KVM_SET_MP_STATE", lib.KVM_SET_MP_STATE, st)

    def get_events(self):
        ev = ffi.new("struct kvm_vcpu_events *")
        self._ioctl("KVM_GET_VCPU_EVENTS", lib.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_events(self, ev) -> None:
        self._ioctl("KVM_SET_VCPU_EVENTS", lib.KVM_SET_VCPU_EVENTS, ev)

    def inject_exception(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Queue an exception for delivery on the next entry (e.g. #BP, #UD, #GP).

        ``cr2`` (a #PF's faulting address) is written with KVM_SET_SREGS first:
        the fault is delivered at the next entry, before the guest runs, so the
        handler reads it exactly as after a hardware page fault.
        """
        if cr2 is not None:
            sregs = self.get_sregs()
            sregs.cr2 = cr2
            self.set_sregs(sregs)
        ev = self.get_events()
        ev.exception.injected = 0
        ev.exception.pending = 0
        ev.exception.nr = vector
        ev.exception.has_error_code = 0 if error_code is None else 1
        ev.exception.error_code = error_code or 0
        ev.exception.injected = 1
        ev.flags = 0
        self.set_events(ev)

    def translate(self, gva: int) -> int | None:
        """Guest-virtual to guest-physical through the vCPU's current paging, or None."""
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = gva
        self._ioctl("KVM_TRANSLATE", lib.KVM_TRANSLATE, tr)
        return tr.physical_address if tr.valid else None

    def set_guest_debug(self, breakpoints: list[int], single_step: bool = False) -> None:
        """Hardware execute breakpoints at up to four guest-virtual addresses."""
        if len(breakpoints) > 4:
            raise ValueError("at most 4 hardware breakpoints")
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = lib.KVM_GUESTDBG_ENABLE if breakpoints or single_step else 0
        if breakpoints:
            dbg.control |= lib.KVM_GUESTDBG_USE_HW_BP
        if single_step:
            dbg.control |= lib.KVM_GUESTDBG_SINGLESTEP
        dr7 = DR7_GE if breakpoints else 0
        for i, addr in enumerate(breakpoints):
            dbg.arch.debugreg[i] = addr
            dr7 |= DR7_LOCAL_ENABLE[i]  # R/W=00 (execute), LEN=00: the upper bits stay 0
        dbg.arch.debugreg[7] = dr7
        self._ioctl("KVM_SET_GUEST_DEBUG", lib.KVM_SET_GUEST_DEBUG, dbg)

    def set_tsc_khz(self, khz: int) -> None:
        check("KVM_SET_TSC_KHZ", lib.xk_ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz))

    def get_tsc_khz(self) -> int:
        return check("KVM_GET_TSC_KHZ", lib.xk_ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0))

    # -- the TSC offset as a vCPU attribute (devices/vcpu.rst, KVM_VCPU_TSC_CTRL) ---------
    def _tsc_attr(self, value=None):
        attr = ffi.new("struct kvm_device_attr *")
        attr.group = lib.KVM_VCPU_TSC_CTRL
        attr.attr = lib.KVM_VCPU_TSC_OFFSET
        attr.addr = int(ffi.cast("uintptr_t", value)) if value is not None else 0
        return attr

    def has_tsc_offset(self) -> bool:
        """Whether this host lets userspace read and write the guest's TSC offset (Linux 5.16+)."""
        return lib.xk_ioctl(self.fd, lib.KVM_HAS_DEVICE_ATTR, self._tsc_attr()) == 0

    def get_tsc_offset(self) -> int:
        """The L1 TSC offset: guest TSC = the host's TSC (scaled to the guest's rate) + this, mod 2**64."""
        val = ffi.new("uint64_t *")
        self._ioctl("KVM_GET_DEVICE_ATTR", lib.KVM_GET_DEVICE_ATTR, self._tsc_attr(val))
        return int(val[0])

    def set_tsc_offset(self, offset: int) -> None:
        """Set the offset exactly.  Unlike a host write of MSR_IA32_TSC, KVM never "matches" this
        to another vCPU's offset (kvm_synchronize_tsc's one-second window)."""
        val = ffi.new("uint64_t *", offset % (1 << 64))
        self._ioctl("KVM_SET_DEVICE_ATTR", lib.KVM_SET_DEVICE_ATTR, self._tsc_attr(val))

    # -- whole state, as the kernel's struct bytes (snapshots) ------------------------
    def _get_raw(self, name: str, req: int, ctype: str, size: int | None = None) -> bytes:
        n = max(size or 0, ffi.sizeof(ctype))
        buf = ffi.new("char[]", n)
        self._ioctl(name, req, buf)
        return bytes(ffi.buffer(buf, n))

    def _set_raw(self, name: str, req: int, ctype: str, data: bytes, size: int | None = None) -> None:
        n = max(size or 0, ffi.sizeof(ctype))
        if len(data) != n:
            raise KvmError(name, 22, f"{len(data)} bytes of state, this host's {ctype} takes {n}")
        self._ioctl(name, req, ffi.from_buffer(bytearray(data)))

    def get_state_blob(self, kind: str) -> bytes:
        """One piece of vCPU state as raw bytes: ``kind`` is a key of :data:`STATE_IOCTLS`."""
        get, _set, ctype = STATE_IOCTLS[kind]
        return self._get_raw(get, getattr(lib, get), ctype, self._xsave_size(kind))

    def set_state_blob(self, kind: str, data: bytes) -> None:
        _get, set_, ctype = STATE_IOCTLS[kind]
        self._set_raw(set_, getattr(lib, set_), ctype, data, self._xsave_size(kind))

    def _xsave_size(self, kind: str) -> int | None:
        """KVM_CAP_XSAVE2 gives the XSAVE area size when it exceeds struct kvm_xsave (AMX)."""
        return self.vm.check_extension(lib.KVM_CAP_XSAVE2) or None if kind == "xsave2" else None

    def xen_set_attr(self, attr_type: int, payload: bytes) -> None:
        buf = xen_attr_buffer(lib.XK_XEN_VCPU_ATTR_SIZE, lib.XK_XEN_VCPU_ATTR_U_OFFSET, attr_type, payload)
        self._ioctl("KVM_XEN_VCPU_SET_ATTR", lib.KVM_XEN_VCPU_SET_ATTR, buf)


#: vCPU state pieces a snapshot saves: kind -> (get ioctl, set ioctl, struct).  "xsave2" reads
#: with KVM_GET_XSAVE2 (any size) and writes with KVM_SET_XSAVE, as api.rst documents.
STATE_IOCTLS = {
    "regs": ("KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
    "sregs": ("KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
    "sregs2": ("KVM_GET_SREGS2", "KVM_SET_SREGS2", "struct kvm_sregs2"),
    "fpu": ("KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu"),
    "xsave": ("KVM_GET_XSAVE", "KVM_SET_XSAVE", "struct kvm_xsave"),
    "xsave2": ("KVM_GET_XSAVE2", "KVM_SET_XSAVE", "struct kvm_xsave"),
    "xcrs": ("KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
    "lapic": ("KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state"),
    "events": ("KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    "debugregs": ("KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
    "mp_state": ("KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "struct kvm_mp_state"),
}
