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

Every distinct instruction is logged once, so a boot's gaps are visible.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.kvm.errors import KvmError

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

RFLAGS_AC = 1 << 18
BP_VECTOR = 3
MAX_INSN = 15


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


class Gaps:
    """Per-machine completion of refused instructions (one unicorn per vCPU thread)."""

    def __init__(self, machine: "Machine"):
        self.machine = machine
        self._seen: set[str] = set()
        self._local = threading.local()
        self.counts: dict[str, int] = {}

    def complete(self, vcpu: "Vcpu") -> bool:
        """Complete the instruction at RIP; False when it cannot be (the run then stops)."""
        regs = vcpu.get_regs()
        code = self._fetch(vcpu, regs.rip)
        if not code:
            log.error("vcpu%d: refused instruction at %#x is not readable", vcpu.id, regs.rip)
            return False
        rule = match_rule(code)
        if rule is not None:
            self._apply(vcpu, regs, rule.completion)
            self._note(rule.name, regs.rip, code)
            return True
        return self._emulate(vcpu, regs, code)

    # -- helpers ---------------------------------------------------------------
    def _fetch(self, vcpu: "Vcpu", rip: int) -> bytes:
        """Up to 15 instruction bytes at RIP, through the guest's paging (may cross a page)."""
        out = b""
        addr = rip
        while len(out) < MAX_INSN:
            try:
                gpa = vcpu.translate(addr)
            except KvmError:
                gpa = None
            if gpa is None:
                break
            n = min(MAX_INSN - len(out), 0x1000 - (addr & 0xFFF))
            try:
                out += self.machine.mem.read(gpa, n)
            except ValueError:
                break
            addr += n
        return out

    def _apply(self, vcpu: "Vcpu", regs, c: Completion) -> None:
        regs.rip += c.length
        regs.rflags = (regs.rflags | c.set_flags) & ~c.clear_flags
        vcpu.set_regs(regs)
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
        name = emu.step(vcpu, regs, code)
        if name is None:
            return False
        self._note(name, regs.rip, code)
        return True


class UnicornStep:
    """Executes one guest instruction with unicorn on the vCPU's state."""

    def __init__(self, mem):
        import unicorn
        from unicorn import x86_const as x

        self.uc_mod, self.x = unicorn, x
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        for r in mem.regions:
            self.uc.mem_map_ptr(r.gpa, r.size, unicorn.UC_PROT_ALL, r.host_addr)
        self._mapped = {r.gpa for r in mem.regions}
        self.mem = mem
        self.gpr: list[tuple[str, int]] = [
            (n, getattr(x, f"UC_X86_REG_{n.upper()}")) for n in (
                "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                "r11", "r12", "r13", "r14", "r15")]

    def _sync_regions(self) -> None:
        for r in self.mem.regions:
            if r.gpa not in self._mapped:
                self.uc.mem_map_ptr(r.gpa, r.size, self.uc_mod.UC_PROT_ALL, r.host_addr)
                self._mapped.add(r.gpa)

    def step(self, vcpu: "Vcpu", regs, code: bytes) -> str | None:
        """Run the instruction at regs.rip; returns a name for the log, None on failure."""
        x, uc = self.x, self.uc
        sregs = vcpu.get_sregs()
        if not sregs.efer & (1 << 10):
            log.error("vcpu%d: refused instruction outside long mode at %#x: %s",
                      vcpu.id, regs.rip, code[:8].hex(" "))
            return None
        self._sync_regions()
        fpu = vcpu.get_fpu()
        uc.reg_write(x.UC_X86_REG_CR0, sregs.cr0)
        uc.reg_write(x.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(x.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(x.UC_X86_REG_MSR, (0xC0000080, sregs.efer))
        uc.reg_write(x.UC_X86_REG_FS_BASE, sregs.fs.base)
        uc.reg_write(x.UC_X86_REG_GS_BASE, sregs.gs.base)
        for name, reg in self.gpr:
            uc.reg_write(reg, getattr(regs, name))
        uc.reg_write(x.UC_X86_REG_RFLAGS, regs.rflags)
        uc.reg_write(x.UC_X86_REG_MXCSR, fpu.mxcsr)
        for i in range(16):
            uc.reg_write(x.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]), "little"))
        try:
            uc.emu_start(regs.rip, 0xFFFF_FFFF_FFFF_FFFF, count=1)
        except self.uc_mod.UcError as e:
            log.error("vcpu%d: unicorn could not complete %s at %#x: %s",
                      vcpu.id, code[:8].hex(" "), regs.rip, e)
            return None
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

