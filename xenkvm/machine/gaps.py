"""Completing instructions the PVM host's ring-0 emulator refuses.

On PVM hosts guest ring-0 code runs in KVM's instruction emulator, which ends
the VM with KVM_EXIT_INTERNAL_ERROR (emulation failure) on some instructions
(research/pvm-host.md lists those met while Debian's kernel boots).  Each is
completed here, then the vCPU resumes:

* a small table of rules for instructions that are trivial or need KVM's help
  (``int3`` must become an injected #BP so the guest's handler runs);
* anything else is executed by unicorn (QEMU's CPU core as a library) on the
  guest's own state: guest RAM mapped zero-copy, control registers, segment
  bases, general and SSE registers loaded, one instruction stepped through the
  guest's page tables, results written back.

One more gap is not a refused instruction: on PVM a ``syscall`` from guest
ring 3 lands on LSTAR with the *user* CS still loaded (CPL 3), so fetching the
kernel's entry code page-faults in user mode and init dies with SIGSEGV.  The
page-fault entry starts with ``clac``, which is refused, so the fault reaches
us: :class:`SyscallFix` recognises its frame (RIP = LSTAR, CS.RPL = 3), drops
it and completes the ``syscall`` instead: kernel CS/SS from STAR, the user RSP
and RFLAGS (already masked) from the frame, and the ``swapgs`` that begins
Linux's entry code.  A hardware breakpoint on LSTAR does not fire there.

An instruction that faults when unicorn completes it (``fnop`` with CR0.TS set,
an operand on an unmapped page...) is the guest's fault, not the VMM's end: the
exception that ``machine/faults.py`` decides (vector, error code, CR2) is
injected and the vCPU resumes at the faulting instruction's handler.

Every distinct instruction is logged once, so a boot's gaps are visible.

One module of ~500 lines on purpose: the rule table, the syscall fix and the
unicorn stepper are the three ways of completing the same exit, and
:class:`Gaps` chooses between them in one place.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.kvm.errors import KvmError
from xenkvm.machine.faults import CpuState, FailedAccess, Fault, decide_fault
from xenkvm.machine.pagewalk import Access, Paging, canonical, cpuid_phys_bits, walk

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

RFLAGS_AC = 1 << 18
BP_VECTOR = 3
MAX_INSN = 15
KERNEL_TEXT = 0xFFFF_FFFF_8000_0000  #: the x86-64 kernel image mapping (-2 GiB) ...
MODULES = 0xFFFF_FFFF_C000_0000      #: ... up to the module area (whose pages get reused)


@dataclass(frozen=True)
class Completion:
    """How a rule completed an instruction: RIP advance, RFLAGS change, exception to inject."""

    length: int
    set_flags: int = 0
    clear_flags: int = 0
    inject: int | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    prefix: bytes
    completion: Completion


#: Instructions completed without an emulator (longest prefixes first).
RULES: tuple[Rule, ...] = (
    Rule("clac", b"\x0f\x01\xca", Completion(3, clear_flags=RFLAGS_AC)),
    Rule("stac", b"\x0f\x01\xcb", Completion(3, set_flags=RFLAGS_AC)),
    # The kernel's int3 self-test: the #BP must reach the guest's own handler,
    # with RIP already past the int3 as after a real trap.
    Rule("int3", b"\xcc", Completion(1, inject=BP_VECTOR)),
    # fwait with no pending x87 exception (the kernel masks them) is a no-op.
    Rule("fwait", b"\x9b", Completion(1)),
)


def match_rule(code: bytes) -> Rule | None:
    for rule in RULES:
        if code.startswith(rule.prefix):
            return rule
    return None


MSR_STAR, MSR_LSTAR, MSR_KERNEL_GS_BASE = 0xC0000081, 0xC0000082, 0xC0000102
SWAPGS = b"\x0f\x01\xf8"
SYSRETQ = b"\x48\x0f\x07"


def kernel_segments(star: int) -> tuple[dict, dict]:
    """The CS and SS a 64-bit ``syscall`` loads: selectors STAR[47:32] and +8, DPL 0."""
    cs_sel = (star >> 32) & 0xFFFC
    cs = dict(selector=cs_sel, base=0, limit=0xFFFF_FFFF, type=0xB, s=1, dpl=0, present=1,
              l=1, db=0, g=1, avl=0, unusable=0)
    ss = dict(selector=cs_sel + 8, base=0, limit=0xFFFF_FFFF, type=0x3, s=1, dpl=0, present=1,
              l=0, db=1, g=1, avl=0, unusable=0)
    return cs, ss


class SyscallFix:
    """Completes ring-3 ``syscall``s that PVM delivers to LSTAR without leaving CPL 3."""

    def __init__(self, machine: "Machine"):
        self.machine = machine
        self.lstar: dict[int, int] = {}   # vcpu id -> LSTAR, once the guest has set it
        self.count = 0

    def _lstar(self, vcpu: "Vcpu") -> int:
        lstar = self.lstar.get(vcpu.id)
        if lstar is None:
            lstar = vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR, 0)
            if lstar >= KERNEL_TEXT:
                self.lstar[vcpu.id] = lstar
        return lstar

    def complete(self, vcpu: "Vcpu", regs, read) -> bool:
        """At a refused ``clac`` on exception entry: is this a #PF frame of a lost syscall?

        ``read(vcpu, gva, n)`` reads guest-virtual memory.  The #PF frame is
        error code, RIP, CS, RFLAGS, RSP, SS from RSP up.
        """
        lstar = self._lstar(vcpu)
        if lstar < KERNEL_TEXT:
            return False
        frame = read(vcpu, regs.rsp, 48)
        if len(frame) < 48:
            return False
        _err, rip, cs, rflags, rsp, _ss = struct.unpack("<6Q", frame)
        if rip != lstar or cs & 3 != 3:
            return False
        regs = vcpu.get_regs()  # a pointer KVM_SET_REGS can take (the sync copy is not)
        sregs = vcpu.get_sregs()
        msrs = vcpu.get_msrs([MSR_STAR, MSR_KERNEL_GS_BASE])
        kcs, kss = kernel_segments(msrs[MSR_STAR])
        for seg, values in ((sregs.cs, kcs), (sregs.ss, kss)):
            for k, v in values.items():
                setattr(seg, k, v)
        regs.rsp, regs.rflags, regs.rip = rsp, rflags, lstar
        if read(vcpu, lstar, 3) == SWAPGS:  # do the entry's swapgs too (GS is still the user's)
            sregs.gs.base, kgs = msrs[MSR_KERNEL_GS_BASE], sregs.gs.base
            vcpu.set_msrs({MSR_KERNEL_GS_BASE: kgs})
            regs.rip += len(SWAPGS)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        self.count += 1
        if self.count == 1:
            log.info("vcpu%d: completing ring-3 syscalls that PVM leaves at CPL 3 (LSTAR %#x)",
                     vcpu.id, lstar)
        return True


def sysret(vcpu: "Vcpu", regs) -> None:
    """``sysretq``: RIP = RCX, RFLAGS = R11, user CS/SS from STAR[63:48] (+16, +8), RPL 3."""
    star = vcpu.get_msrs([MSR_STAR])[MSR_STAR]
    base = (star >> 48) & 0xFFFC
    sregs = vcpu.get_sregs()
    for seg, sel, typ, l, db in ((sregs.cs, base + 16, 0xB, 1, 0), (sregs.ss, base + 8, 0x3, 0, 1)):
        seg.selector, seg.base, seg.limit, seg.type, seg.s, seg.dpl = sel | 3, 0, 0xFFFF_FFFF, typ, 1, 3
        seg.present, seg.l, seg.db, seg.g, seg.avl, seg.unusable = 1, l, db, 1, 0, 0
    regs.rip = regs.rcx
    regs.rflags = (regs.r11 & 0x3C7FD7) | 0x2
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)


class Gaps:
    """Per-machine completion of refused instructions (one unicorn per vCPU thread)."""

    def __init__(self, machine: "Machine"):
        self.machine = machine
        self.syscalls = SyscallFix(machine)
        self._seen: set[str] = set()
        self._local = threading.local()
        self.counts: dict[str, int] = {}
        #: kernel RIP -> guest-physical address of its page offset (the kernel's text mapping
        #: is fixed once paging is up; the bytes themselves are re-read every time).
        self._code_gpa: dict[int, int] = {}

    def complete(self, vcpu: "Vcpu") -> bool:
        """Complete the instruction at RIP; False when it cannot be (the run then stops).

        The common case (``clac`` at every interrupt and exception entry, a few
        hundred times a second) costs no ioctl: the registers come from kvm_run's
        sync area and the code bytes from a per-RIP cache of kernel addresses.
        """
        regs = vcpu.sync_regs()
        rip = regs.rip
        code = self._cached_code(rip)
        if code is None:
            code = self._fetch(vcpu, rip)
        if not code:
            log.error("vcpu%d: refused instruction at %#x is not readable", vcpu.id, rip)
            return False
        rule = match_rule(code)
        if rule is not None and rule.name == "clac" and self.syscalls.complete(vcpu, regs, self.read_virt):
            self._note("syscall-at-cpl3", rip, code)
            return True
        if code.startswith(SYSRETQ):
            sysret(vcpu, vcpu.get_regs())
            self._note("sysretq", rip, code)
            return True
        if rule is not None:
            self._apply(vcpu, regs, rule.completion)
            self._note(rule.name, rip, code)
            return True
        return self._emulate(vcpu, vcpu.get_regs(), code)

    def _cached_code(self, rip: int) -> bytes | None:
        """Code bytes at a kernel RIP seen before, re-read from its cached guest-physical address."""
        gpa = self._code_gpa.get(rip)
        if gpa is None:
            return None
        try:
            return self.machine.mem.read(gpa, min(MAX_INSN, 0x1000 - (rip & 0xFFF)))
        except ValueError:
            return None

    # -- helpers ---------------------------------------------------------------
    def _fetch(self, vcpu: "Vcpu", rip: int) -> bytes:
        """Up to 15 instruction bytes at RIP, through the guest's paging (may cross a page)."""
        out = b""
        addr = rip
        first_gpa = None
        while len(out) < MAX_INSN:
            try:
                gpa = vcpu.translate(addr)
            except KvmError:
                gpa = None
            if gpa is None:
                break
            if first_gpa is None:
                first_gpa = gpa
            n = min(MAX_INSN - len(out), 0x1000 - (addr & 0xFFF))
            try:
                out += self.machine.mem.read(gpa, n)
            except ValueError:
                break
            addr += n
        if first_gpa is not None and KERNEL_TEXT <= rip < MODULES:
            self._code_gpa[rip] = first_gpa
        return out

    def read_virt(self, vcpu: "Vcpu", gva: int, n: int) -> bytes:
        """Up to ``n`` bytes of guest-virtual memory (short where it stops being mapped)."""
        out = b""
        while len(out) < n:
            try:
                gpa = vcpu.translate(gva)
            except KvmError:
                gpa = None
            if gpa is None:
                break
            k = min(n - len(out), 0x1000 - (gva & 0xFFF))
            try:
                out += self.machine.mem.read(gpa, k)
            except ValueError:
                break
            gva += k
        return out

    def _apply(self, vcpu: "Vcpu", regs, c: Completion) -> None:
        regs.rip += c.length
        regs.rflags = (regs.rflags | c.set_flags) & ~c.clear_flags
        vcpu.mark_regs_dirty(regs)
        if c.inject is not None:
            vcpu.inject_exception(c.inject)

    def _note(self, name: str, rip: int, code: bytes) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if name not in self._seen:
            self._seen.add(name)
            log.info("completing refused instruction %s at %#x (%s); further ones not logged",
                     name, rip, code[:8].hex(" "))

    def _emulate(self, vcpu: "Vcpu", regs, code: bytes) -> bool:
        emu = getattr(self._local, "emu", None)
        if emu is None:
            try:
                emu = self._local.emu = UnicornStep(self.machine.mem)
            except ImportError:
                log.error("unicorn is not installed: cannot complete %s", code[:8].hex(" "))
                return False
        rip = regs.rip
        outcome = emu.step(vcpu, regs, code)
        if outcome is None:
            return False
        if isinstance(outcome, Fault):
            vcpu.inject_exception(outcome.vector, outcome.error_code, cr2=outcome.cr2)
            self._note(f"fault:{outcome.name}:{code[:4].hex()}", rip, code)
            log.debug("vcpu%d: %s at %#x delivered to the guest (rule %s)", vcpu.id, outcome.describe(),
                      rip, outcome.rule)
            return True
        self._note(outcome, rip, code)
        return True


class UnicornStep:
    """Executes one guest instruction with unicorn on the vCPU's state."""

    def __init__(self, mem):
        import unicorn
        from unicorn import x86_const as x

        self.uc_mod, self.x = unicorn, x
        self.mem = mem
        self._new_uc()
        self.gpr: list[tuple[str, int]] = [
            (n, getattr(x, f"UC_X86_REG_{n.upper()}")) for n in (
                "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                "r11", "r12", "r13", "r14", "r15")]

    def _new_uc(self) -> None:
        """A fresh unicorn over guest RAM (after a fault: its exception delivery changed its CPU state)."""
        u = self.uc_mod
        self.uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
        for r in self.mem.regions:
            self.uc.mem_map_ptr(r.gpa, r.size, u.UC_PROT_ALL, r.host_addr)
        self._mapped = {r.gpa for r in self.mem.regions}

    def _sync_regions(self) -> None:
        for r in self.mem.regions:
            if r.gpa not in self._mapped:
                self.uc.mem_map_ptr(r.gpa, r.size, self.uc_mod.UC_PROT_ALL, r.host_addr)
                self._mapped.add(r.gpa)

    def _load(self, uc, sregs, regs, fpu) -> None:
        """The vCPU's state into ``uc``: control registers, EFER, segment bases, GPRs, SSE."""
        x = self.x
        uc.reg_write(x.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(x.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(x.UC_X86_REG_MSR, (0xC0000080, sregs.efer))
        uc.reg_write(x.UC_X86_REG_CR0, sregs.cr0)   # last: its MP/EM/TS flags stay as written
        uc.reg_write(x.UC_X86_REG_FS_BASE, sregs.fs.base)
        uc.reg_write(x.UC_X86_REG_GS_BASE, sregs.gs.base)
        for name, reg in self.gpr:
            uc.reg_write(reg, getattr(regs, name))
        uc.reg_write(x.UC_X86_REG_RFLAGS, regs.rflags)
        uc.reg_write(x.UC_X86_REG_MXCSR, fpu.mxcsr)
        for i in range(16):
            uc.reg_write(x.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]), "little"))

    def step(self, vcpu: "Vcpu", regs, code: bytes) -> "str | Fault | None":
        """Run the instruction at regs.rip: a name for the log, the guest's Fault, or None on failure."""
        x, uc = self.x, self.uc
        sregs = vcpu.get_sregs()
        if not sregs.efer & (1 << 10):
            log.error("vcpu%d: refused instruction outside long mode at %#x: %s",
                      vcpu.id, regs.rip, code[:8].hex(" "))
            return None
        self._sync_regions()
        fpu = vcpu.get_fpu()
        self._load(uc, sregs, regs, fpu)
        raised: list[int] = []
        hook = uc.hook_add(self.uc_mod.UC_HOOK_INTR, lambda u, intno, _d: (raised.append(intno), u.emu_stop()))
        try:
            uc.emu_start(regs.rip, 0xFFFF_FFFF_FFFF_FFFF, count=1)
        except self.uc_mod.UcError as e:
            self._new_uc()
            if e.errno != self.uc_mod.UC_ERR_INSN_INVALID:
                log.error("vcpu%d: unicorn could not complete %s at %#x: %s",
                          vcpu.id, code[:8].hex(" "), regs.rip, e)
                return None
            return self._fault(vcpu, sregs, regs, fpu, code, None)
        uc.hook_del(hook)
        if raised:
            self._new_uc()
            return self._fault(vcpu, sregs, regs, fpu, code, raised[0])
        for name, reg in self.gpr:
            setattr(regs, name, uc.reg_read(reg))
        regs.rflags = uc.reg_read(x.UC_X86_REG_RFLAGS)
        regs.rip = uc.reg_read(x.UC_X86_REG_RIP)
        fpu.mxcsr = uc.reg_read(x.UC_X86_REG_MXCSR)
        for i in range(16):
            value = uc.reg_read(x.UC_X86_REG_XMM0 + i)
            fpu.xmm[i] = list(value.to_bytes(16, "little"))
        vcpu.set_regs(regs)
        vcpu.set_fpu(fpu)
        return "emulated:" + code[:4].hex()

    def _fault(self, vcpu: "Vcpu", sregs, regs, fpu, code: bytes, raised: int | None) -> Fault | None:
        """The instruction faulted in unicorn (``raised``: its vector, None: invalid opcode).

        The guest's registers are left as they were (faults are precise); the
        rules of ``machine/faults.py`` decide what the guest sees.
        """
        cpl = sregs.cs.selector & 3
        paging = Paging.from_sregs(sregs, cpuid_phys_bits(vcpu.get_cpuid()))
        access = None
        if raised is not None:
            access = FaultProbe(self).first_failed_access(sregs, regs, fpu, paging, cpl)
        fault = decide_fault(code, CpuState(sregs.cr0, sregs.cr4, sregs.efer, cpl), raised, access)
        if fault is None:
            log.error("vcpu%d: unicorn does not know %s at %#x (not a #UD the guest's CPU would raise)",
                      vcpu.id, code[:8].hex(" "), regs.rip)
        elif raised is not None and fault.vector != raised:
            log.warning("vcpu%d: %s at %#x: unicorn raised vector %d, the rules chose %s",
                        vcpu.id, code[:8].hex(" "), regs.rip, raised, fault.describe())
        return fault


class FaultProbe:
    """Re-runs a faulting instruction to find the first memory access that cannot be translated.

    A second unicorn in virtual-TLB mode: every page the instruction touches is
    translated by :func:`pagewalk.walk` over the guest's page tables and backed by
    a private copy (a failing page by zeros), so the probe never writes guest
    memory and every access completes; the memory hooks then give the exact
    address and kind of each access, in order.  The first that touches a failing
    page is the fault: CR2 is its address (or the start of that page when the
    access began on the page before), the error code the walk's.
    """

    SCRATCH = 0x1_0000_0000_0000   #: private "physical" pages, far above any guest RAM
    PAGES = 32

    def __init__(self, step: UnicornStep):
        u = step.uc_mod
        self.step, self.uc_mod = step, u
        self.uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
        self.uc.ctl_set_tlb_mode(u.UC_TLB_VIRTUAL)
        self.uc.mem_map(self.SCRATCH, self.PAGES << 12)
        self.uc.hook_add(u.UC_HOOK_TLB_FILL, self._fill)
        self.uc.hook_add(u.UC_HOOK_MEM_READ | u.UC_HOOK_MEM_WRITE, self._access)
        self.uc.hook_add(u.UC_HOOK_INTR, lambda uc, _intno, _d: uc.emu_stop())
        self._reset(None, 0)

    def _reset(self, paging: Paging | None, cpl: int) -> None:
        """Forget the last probe (one FaultProbe is made per fault: faults are rare)."""
        self.paging, self.cpl = paging, cpl
        self.pages: dict[tuple[int, bool], int] = {}   # (page, write) -> scratch page
        self.slot_page: dict[int, int] = {}            # scratch page -> virtual page
        self.failed: dict[int, int | None] = {}        # page -> #PF error code (None: non-canonical)
        self.accesses: list[tuple[int, int, bool]] = []

    def _read_entry(self, gpa: int, size: int) -> int | None:
        try:
            return int.from_bytes(self.step.mem.read(gpa, size), "little")
        except ValueError:
            return None

    def _fill(self, uc, vaddr: int, access: int, entry, _data) -> bool:
        u = self.uc_mod
        page = vaddr & ~0xFFF
        write = access == u.UC_MEM_WRITE
        kind = Access.WRITE if write else Access.FETCH if access == u.UC_MEM_FETCH else Access.READ
        slot = self.pages.get((page, write))
        if slot is None:
            if len(self.pages) >= self.PAGES:
                return False
            slot = self.SCRATCH + (len(self.pages) << 12)
            self.pages[(page, write)] = slot
            self.slot_page[slot] = page
            gpa, err = (None, None) if not canonical(page) else self._walk(page, kind)
            data = bytes(0x1000)
            if gpa is None:
                self.failed.setdefault(page, err)
            else:
                try:
                    data = self.step.mem.read(gpa & ~0xFFF, 0x1000)
                except ValueError:
                    return False   # MMIO: not a page fault, and nothing the probe can read
            uc.mem_write(slot, data)
        entry.paddr = slot
        entry.perms = u.UC_PROT_ALL if write else u.UC_PROT_READ | u.UC_PROT_EXEC
        return True

    def _access(self, _uc, access: int, addr: int, size: int, _value: int, _data) -> None:
        """Record an access by its virtual address (unicorn may report the scratch page's)."""
        slot = addr & ~0xFFF
        if self.SCRATCH <= slot < self.SCRATCH + (self.PAGES << 12):
            addr = self.slot_page[slot] | (addr & 0xFFF)
        self.accesses.append((addr, size, access == self.uc_mod.UC_MEM_WRITE))

    def _walk(self, page: int, kind: Access) -> tuple[int | None, int]:
        """The guest's translation of ``page`` for this access, at the faulting instruction's CPL."""
        return walk(self._read_entry, self.paging, page, kind, self.cpl)

    def _error_code(self, page: int) -> int | None:
        """The walk's error code for ``page``, as a write if the instruction writes it at all.

        A read-modify-write instruction (``add [m], r``, ``cmpxchg16b``) is
        checked for write access when it reads (SDM 4.7: W reflects the access
        type), though unicorn performs its read first.
        """
        if self.failed[page] is None:
            return None
        write = any(w for a, n, w in self.accesses if a & ~0xFFF <= page <= (a + n - 1) & ~0xFFF)
        return self._walk(page, Access.WRITE if write else Access.READ)[1]

    def first_failed_access(self, sregs, regs, fpu, paging: Paging, cpl: int) -> FailedAccess | None:
        self._reset(paging, cpl)
        self.step._load(self.uc, sregs, regs, fpu)
        try:
            self.uc.emu_start(regs.rip, regs.rip + 16, count=1)
        except self.uc_mod.UcError:
            pass
        for addr, size, _write in self.accesses:
            for page in sorted({addr & ~0xFFF, (addr + size - 1) & ~0xFFF}):
                if page in self.failed:
                    return FailedAccess(max(addr, page), self._error_code(page))
        for page, err in self.failed.items():  # an instruction fetch (no memory hook fires for those)
            return FailedAccess(max(page, regs.rip), err)
        return None
