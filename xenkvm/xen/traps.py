"""How a guest's hypercall reaches the dispatcher (ARCHITECTURE.md, "Hypercall traps").

* ``kvm-xen``: the host KVM has KVM_CAP_XEN_HVM with INTERCEPT_HCALL; KVM fills
  the hypercall page and exits with KVM_EXIT_XEN for every vmcall/vmmcall.
* ``hypercall-page``: the guest writes the hypercall MSR (CPUID base+2); the
  write exits to userspace and we fill the page with 32-byte stubs
  ``mov eax, nr; out HYPERCALL_PORT, eax; ret``, so a hypercall is one port
  exit with the arguments in registers.
* ``breakpoint``: Linux since XSA-466 calls ``xen_hypercall_intel``/``_amd``
  (a bare vmcall/vmmcall) and never uses a page.  We find those instructions
  in the image (xen/trapsites.py: ELF symbols, else byte patterns) and put hardware execute
  breakpoints on them; the debug exit is emulated and RIP stepped past.
* ``patch``: the same sites, rewritten in guest memory before the first
  instruction into ``out %eax, HYPERCALL_PORT; nop`` (3 bytes, as long as the
  vmcall), so each call is the port exit the page stubs make: no debug
  registers (they stay the guest's), any host.

All four end in :func:`hypercall_result`, which applies Xen's privilege
rule (only CPL 0 may make hypercalls; privilege.py) before
``Dispatcher.dispatch``.  With KVM_CAP_SYNC_REGS the registers are read and
written through kvm_run, so a trap costs no extra ioctl.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.config import HypercallTrap
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.kvm.vm import MsrRange
from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.memory import GuestMemoryError
from xenkvm.machine.pagewalk import Access, Paging, cpuid_phys_bits, walk
from xenkvm.xen import sendstub
from xenkvm.xen.abi import Errno, Hypercall
from xenkvm.xen.cpuid import HYPERCALL_MSR
from xenkvm.xen.privilege import PF_VECTOR, caller_cpl
from xenkvm.xen.trapsites import INSN_LEN, VMCALL, VMMCALL, Site, find_sites, site_gpa

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

#: what a patched site holds: ``out %eax, $HYPERCALL_PORT`` (EAX already has the number) + ``nop``
PATCHED = bytes([0xE7, layout.HYPERCALL_PORT, 0x90])
STUB_SIZE = 32
STUBS = 4096 // STUB_SIZE
EFER_LMA = 1 << 10
MASK64 = (1 << 64) - 1
EPERM_RESULT = -Errno.EPERM & MASK64


class TrapError(BootError):
    """The guest cannot be run safely with the chosen trap (reported before it starts)."""


# --- the traps ------------------------------------------------------------------------
def _args64(regs) -> tuple[int, ...]:
    return (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)


def _args32(regs) -> tuple[int, ...]:
    m = 0xFFFFFFFF
    return (regs.rbx & m, regs.rcx & m, regs.rdx & m, regs.rsi & m, regs.rdi & m, regs.rbp & m)


def hypercall_result(domain: "XenDomain", vcpu: "Vcpu", cpl: int, nr: int, args: tuple[int, ...],
                     long_mode: bool) -> int:
    """RAX for a hypercall made at ``cpl``: every trap's calls come through here.

    Xen's rule (xen/arch/x86/hvm/hypercall.c, hvm_hypercall): a call made
    with ``hvm_get_cpl(curr)`` non-zero gets ``regs->rax = -EPERM`` and
    nothing else happens -- no handler runs, no state changes.  A guest
    user process that reaches a trap (a stub page it can execute, a
    breakpointed vmcall, IOPL 3) must not shut the domain down or remap its
    memory.
    """
    if cpl:
        log.debug("vcpu%d: hypercall %d at CPL %d refused: -EPERM", vcpu.id, nr, cpl)
        return EPERM_RESULT
    return domain.dispatcher.dispatch(vcpu, nr, args, long_mode)


def dispatch_from_registers(domain: "XenDomain", vcpu: "Vcpu", rip_advance: int = 0) -> None:
    """Take number and arguments from the vCPU's registers, dispatch, put the result in RAX.

    The CPL comes from the segment state KVM saved at the exit (sync sregs).
    """
    regs = vcpu.sync_regs()
    cpl = caller_cpl(vcpu.sync_sregs(), regs.rflags)
    long_mode = domain.machine.long_mode(vcpu)
    args = _args64(regs) if long_mode else _args32(regs)
    regs.rax = hypercall_result(domain, vcpu, cpl, regs.rax & 0xFFFFFFFF, args, long_mode)
    regs.rip += rip_advance
    vcpu.mark_regs_dirty(regs)


def _stub_page() -> bytes:
    """128 stubs `mov eax, nr; out HYPERCALL_PORT, eax; ret`, int3 padding between them."""
    page = bytearray(b"\xcc" * 4096)  # a stray jump into the padding traps
    for nr in range(STUBS):
        stub = b"\xb8" + nr.to_bytes(4, "little") + bytes([0xE7, layout.HYPERCALL_PORT]) + b"\xc3"
        page[nr * STUB_SIZE:nr * STUB_SIZE + len(stub)] = stub
    return bytes(page)


STUB_PAGE = _stub_page()


class HypercallPageTrap:
    """Fill the page the guest names through the hypercall MSR with port-I/O stubs."""

    name = "hypercall-page"

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self.pages = 0

    def install(self) -> None:
        vm = self.domain.vm
        vm.enable_user_space_msr(klib.KVM_MSR_EXIT_REASON_FILTER | klib.KVM_MSR_EXIT_REASON_UNKNOWN)
        vm.set_msr_filter([MsrRange(HYPERCALL_MSR, 1)])
        m = self.domain.machine
        m.register_exit(klib.KVM_EXIT_X86_WRMSR, self.on_wrmsr)
        m.register_exit(klib.KVM_EXIT_X86_RDMSR, self.on_rdmsr)
        m.register_port_hook(layout.HYPERCALL_PORT, self.on_port)

    @staticmethod
    def stubs() -> bytes:
        return STUB_PAGE

    def on_wrmsr(self, vcpu: "Vcpu") -> None:
        msr = vcpu.exit_msr
        if msr.index != HYPERCALL_MSR or msr.data & 0xFFF:  # only page index 0 exists
            msr.error = 1  # #GP, as Xen does for an unknown MSR or page index
            return
        try:
            self.domain.mem.write(msr.data & ~0xFFF, self.stubs())
        except GuestMemoryError:
            msr.error = 1
            return
        msr.error = 0
        self.pages += 1
        log.info("vcpu%d: hypercall page at %#x", vcpu.id, msr.data)

    def on_rdmsr(self, vcpu: "Vcpu") -> None:
        vcpu.exit_msr.error = 1

    def on_port(self, vcpu: "Vcpu") -> None:
        port_hypercall(self.domain, vcpu)


def port_hypercall(domain: "XenDomain", vcpu: "Vcpu") -> None:
    """The `out %eax, HYPERCALL_PORT` of a page stub or a patched site, EAX = the number.

    KVM completes the `out` (on PVM before the exit, RIP already past it; on VMX/SVM at the
    next KVM_RUN, stepping RIP over it while it is unchanged): a stub's `ret` or a patched
    site's `nop` runs next, with the result in RAX.  At CPL 3 hardware #GPs the `out`
    unless IOPL or the TSS I/O bitmap allow it (PVM #GPs it always: its outer rings run
    with IOPL 0); when one does reach us, the CPL check in :func:`hypercall_result`
    refuses it.
    """
    io = vcpu.exit_io
    if io.direction != klib.KVM_EXIT_IO_OUT or io.size != 4:
        return
    dispatch_from_registers(domain, vcpu)


def stub_send(domain: "XenDomain", vcpu: "Vcpu", stub_vaddr: int) -> None:
    """A send the send stub made and KVM did not match (the port has no ioeventfd): finish it
    as the ``EVTCHNOP_send`` it is (the argument is still at RSI), RAX = the result, RIP at the
    stub's ``ret`` past the ``xor``.  RIP at the exit is the ``out``'s own on VMX/SVM (KVM
    steps over it at the next KVM_RUN unless RIP changed) and already past it on PVM: either
    is the stub's; an ``out`` to this port from anywhere else is ignored."""
    io = vcpu.exit_io
    if io.direction != klib.KVM_EXIT_IO_OUT or io.size != 4 or io.count != 1:
        return
    regs = vcpu.sync_regs()
    cpl = caller_cpl(vcpu.sync_sregs(), regs.rflags)
    at = regs.rip - stub_vaddr
    if at not in (sendstub.SEND_OUT, sendstub.SEND_OUT_END) or cpl != 0 or not domain.machine.long_mode(vcpu):
        log.warning("vcpu %d: out to the send port at %#x (CPL %d), not from the send stub: ignored",
                    vcpu.id, regs.rip, cpl)
        return
    regs.rax = hypercall_result(domain, vcpu, cpl, Hypercall.event_channel_op, _args64(regs), True)
    regs.rip = stub_vaddr + sendstub.SEND_RESUME
    vcpu.mark_regs_dirty(regs)


@dataclass(frozen=True)
class PatchSite:
    """A hypercall site and where the loader put it in guest-physical memory."""

    site: Site
    gpa: int


def patch_sites(mem, sites: list[PatchSite]) -> None:
    """Rewrite each site's vmcall/vmmcall into :data:`PATCHED`; all or nothing.

    Every site is checked first: bytes that are not exactly a vmcall or vmmcall
    (a wrong symbol, a relocated or already-changed image) refuse the guest, since
    writing there would corrupt code the guest runs.
    """
    for p in sites:
        try:
            found = bytes(mem.read(p.gpa, INSN_LEN))
        except GuestMemoryError:
            raise TrapError(f"patch trap: {p.site.name} at {p.site.vaddr:#x} (GPA {p.gpa:#x}) "
                            "is not in guest memory") from None
        if found not in (VMCALL, VMMCALL):
            raise TrapError(f"patch trap: {p.site.name} at {p.site.vaddr:#x} (GPA {p.gpa:#x}) holds "
                            f"{found.hex(' ')}, not vmcall/vmmcall; refusing to patch")
    for p in sites:
        mem.write(p.gpa, PATCHED)


class PatchTrap:
    """The guest's own vmcall/vmmcall rewritten into port-I/O exits before it runs; Linux's
    pair of hypercall functions later into the send stub, when kicks go to KVM (xen/sendstub.py)."""

    name = "patch"

    def __init__(self, domain: "XenDomain", sites: list[PatchSite], send_stub: bool = False):
        self.domain = domain
        self.sites = sites
        self.send_stub = send_stub      #: the pair holds the send stub now
        self.upgrade: sendstub.StubUpgrade | None = None

    def install(self) -> None:
        fits = self._stub_fits()        # the original bytes: read before patching
        patch_sites(self.domain.mem, self.sites)
        for p in self.sites:
            log.info("patch trap on %s at %#x (GPA %#x)", p.site.name, p.site.vaddr, p.gpa)
        self.hook()
        if fits:
            self.plan_stub()

    def hook(self) -> None:
        """The port exits the patched code makes (the bytes are in place: install or a restore)."""
        self.domain.machine.register_port_hook(layout.HYPERCALL_PORT, self.on_port)
        if self.send_stub:
            self._stub_installed()

    def plan_stub(self) -> None:
        """Write the send stub when the first backend binds a ring port (if kicks go to KVM)."""
        amd = self.pair()
        if self.send_stub or amd is None or not self._stub_wanted():
            return
        self.upgrade = sendstub.StubUpgrade(self.domain, amd.gpa, amd.site.vaddr, PATCHED, self.stub_bytes(),
                                            self._stub_installed)
        self.domain.fast.on_register = self.upgrade.request
        if self.domain.fast.ports:          # a restore: the backends bound theirs already
            self.upgrade.request()

    def _stub_installed(self) -> None:
        """The stub is (about to be) in guest memory, every vCPU parked or none running yet."""
        self.send_stub = True
        stub_vaddr = self.pair().site.vaddr
        self.domain.machine.register_port_hook(
            layout.SEND_PORT, lambda vcpu: stub_send(self.domain, vcpu, stub_vaddr))
        with self.domain.lock:
            self.domain.fast.on_register = None
            self.domain.fast.use_kernel_kicks(self.domain.machine.vm, layout.SEND_PORT)

    def expected(self) -> list[tuple[int, bytes]]:
        """(GPA, bytes) the patched guest memory holds."""
        if self.send_stub:
            return [(self.pair().gpa, self.stub_bytes())]
        return [(p.gpa, PATCHED) for p in self.sites]

    @staticmethod
    def stub_bytes() -> bytes:
        return sendstub.stub(layout.HYPERCALL_PORT, layout.SEND_PORT)

    def pair(self) -> PatchSite | None:
        """xen_hypercall_amd when the sites are Linux's pair: it 16-byte aligned, _intel 16 bytes
        after it in both virtual and guest-physical memory."""
        by_name = {p.site.name: p for p in self.sites}
        amd, intel = by_name.get("xen_hypercall_amd"), by_name.get("xen_hypercall_intel")
        if len(self.sites) != 2 or amd is None or intel is None or amd.site.vaddr % 16:
            return None
        step = sendstub.INTEL_ENTRY
        if intel.site.vaddr != amd.site.vaddr + step or intel.gpa != amd.gpa + step:
            return None
        return amd

    def _stub_wanted(self) -> bool:
        cfg = getattr(self.domain, "cfg", None)
        return bool(getattr(cfg, "kernel_kicks", False) and cfg.fast_path
                    and not self.domain.machine.trace and self.domain.machine.host.has_ioeventfd)

    def _stub_fits(self) -> bool:
        """The unpatched pair is Linux's two functions and their padding, nothing else."""
        amd = self.pair()
        if amd is None:
            return False
        try:
            code = bytes(self.domain.mem.read(amd.gpa, sendstub.STUB_LEN))
        except GuestMemoryError:
            return False
        return sendstub.is_linux_pair(code)

    def on_port(self, vcpu: "Vcpu") -> None:
        port_hypercall(self.domain, vcpu)


class BreakpointTrap:
    """Hardware execute breakpoints on the guest's own vmcall/vmmcall instructions."""

    name = "breakpoint"

    def __init__(self, domain: "XenDomain", sites: list[Site]):
        self.domain = domain
        self.sites = sites
        self.addresses = {s.vaddr for s in sites}

    def install(self) -> None:
        for vcpu in self.domain.machine.vcpus:
            vcpu.set_guest_debug(sorted(self.addresses))
        self.domain.machine.register_exit(klib.KVM_EXIT_DEBUG, self.on_debug)
        for s in self.sites:
            log.info("breakpoint trap on %s at %#x", s.name, s.vaddr)

    def on_debug(self, vcpu: "Vcpu") -> None:
        pc = vcpu.exit_debug.pc
        if pc not in self.addresses:
            self.domain.machine.stop_vmm_error(vcpu, f"debug exit at {pc:#x}, not a hypercall site")
            return
        cpl = caller_cpl(vcpu.sync_sregs(), vcpu.sync_regs().rflags)
        if cpl and self._fetch_faulted(vcpu, pc, cpl):
            return
        dispatch_from_registers(self.domain, vcpu, rip_advance=INSN_LEN)

    def _fetch_faulted(self, vcpu: "Vcpu", pc: int, cpl: int) -> bool:
        """Give the guest the #PF that fetching ``pc`` at ``cpl`` takes, if it does.

        The breakpoint fired before the fetch; without it a user process
        jumping to a kernel site gets an instruction-fetch #PF (CR2 = the
        address, error code from the page tables), which is what the guest
        must see.  Only walked at CPL > 0: the kernel runs its own text.
        """
        sregs = vcpu.get_sregs()  # a copy KVM_SET_SREGS takes (the sync area is read-only)
        paging = Paging.from_sregs(sregs, cpuid_phys_bits(vcpu.get_cpuid()))
        gpa, error = walk(self._read_entry, paging, pc, Access.FETCH, cpl)
        if gpa is not None:
            return False
        sregs.cr2 = pc  # no exception payload: CR2 is set directly, then the #PF injected
        vcpu.set_sregs(sregs)
        vcpu.inject_exception(PF_VECTOR, error)
        log.debug("vcpu%d: CPL %d fetch at hypercall site %#x faults: #PF error %#x", vcpu.id, cpl, pc, error)
        return True

    def _read_entry(self, gpa: int, size: int) -> int | None:
        try:
            return int.from_bytes(self.domain.mem.read(gpa, size), "little")
        except GuestMemoryError:
            return None


class KvmXenTrap:
    """KVM intercepts vmcall/vmmcall itself and exits with KVM_EXIT_XEN (hosts with KVM_XEN)."""

    name = "kvm-xen"

    def __init__(self, domain: "XenDomain"):
        self.domain = domain

    def install(self) -> None:
        flags = klib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
        # KVM only enables its Xen paths with a non-zero MSR (linux.md 2.1).
        self.domain.vm.xen_hvm_config(flags, HYPERCALL_MSR)
        self.domain.machine.register_exit(klib.KVM_EXIT_XEN, self.on_xen)

    def on_xen(self, vcpu: "Vcpu") -> None:
        if vcpu.exit_xen.type != klib.KVM_EXIT_XEN_HCALL:
            return
        h = vcpu.exit_xen_hcall
        args = tuple(h.params[i] for i in range(6))
        # the exit carries the caller's CPL (KVM itself accelerates CPL-0 calls only)
        h.result = hypercall_result(self.domain, vcpu, h.cpl, h.input & 0xFFFFFFFF, args, bool(h.longmode))


# --- choosing ---------------------------------------------------------------------------
def _patch_sites(image: bytes, sites: list[Site]) -> list[PatchSite] | None:
    """Each site with its guest-physical address, or None if one has none (not loaded)."""
    located = [PatchSite(s, gpa) for s in sites if (gpa := site_gpa(image, s.vaddr)) is not None]
    return located if len(located) == len(sites) else None


def _direct_trap(domain: "XenDomain", available: list[str], image: bytes, sites: list[Site]):
    """`auto`'s trap for the guest's own vmcall/vmmcall sites: patch where each site is in
    the loaded image, else breakpoints; TrapError if neither can catch them."""
    located = _patch_sites(image, sites) if "patch" in available else None
    if located is not None:
        return PatchTrap(domain, located)
    if "breakpoint" in available:
        return BreakpointTrap(domain, sites)
    raise TrapError("the guest calls vmcall/vmmcall directly and this host can trap neither "
                    "with KVM_XEN, nor by patching the loaded image, nor with breakpoints")


def choose(domain: "XenDomain", requested: HypercallTrap, image: bytes | None) -> list:
    """The traps for this guest and host; raises TrapError for a guest that would hang.

    ``image`` is the ELF the guest runs, loaded at its physical addresses (the
    loader boots a Xen guest's bzImage as its extracted vmlinux for this).
    """
    available = domain.machine.host.hypercall_traps()
    sites = find_sites(image) if image is not None else []
    if requested is HypercallTrap.AUTO:
        if "kvm-xen" in available:
            return [KvmXenTrap(domain)]
        traps: list = [HypercallPageTrap(domain)] if "hypercall-page" in available else []
        if sites:
            traps.append(_direct_trap(domain, available, image, sites))
        if not traps:
            raise TrapError("this host offers no way to trap Xen hypercalls")
        return traps
    if requested.value not in available:
        raise TrapError(f"hypercall trap {requested.value} is not available on this host "
                        f"(available: {', '.join(available) or 'none'})")
    if requested is HypercallTrap.KVM_XEN:
        return [KvmXenTrap(domain)]
    if requested is HypercallTrap.HYPERCALL_PAGE:
        if sites:
            raise TrapError("the guest issues vmcall/vmmcall directly ("
                            + ", ".join(f"{s.name} at {s.vaddr:#x}" for s in sites)
                            + "), which the hypercall-page trap cannot catch; use patch, breakpoint or auto")
        return [HypercallPageTrap(domain)]
    if not sites:
        raise TrapError(f"{requested.value} trap: no xen_hypercall_intel/_amd instruction found in the guest image")
    if requested is HypercallTrap.PATCH:
        located = _patch_sites(image, sites)
        if located is None:
            raise TrapError("patch trap: a hypercall site is outside the image's loaded segments; "
                            "use breakpoint or auto")
        return [PatchTrap(domain, located)]
    return [BreakpointTrap(domain, sites)]
