"""Hypercalls from outside ring 0: the CPL check every trap shares, and the fetch fault a breakpoint stands for.

The traps run here on fake vCPUs whose registers are real ``struct kvm_regs``
/ ``kvm_sregs`` (cffi), and on real guest memory holding real page tables;
guests/xen_userpriv.c checks the same end to end under /dev/kvm.  The walk
itself is tested in tests/unit/test_pagewalk.py.
"""
from __future__ import annotations

import pytest

from xenkvm.kvm._kvm_cffi import ffi, lib as klib
from xenkvm.machine.memory import GuestMemory
from xenkvm.machine.pagewalk import Cr0, Cr4, Efer, PfError, Pte
from xenkvm.xen.privilege import RFLAGS_VM, caller_cpl
from xenkvm.xen.traps import EPERM_RESULT, BreakpointTrap, HypercallPageTrap, KvmXenTrap, Site

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
SITE = 0x200000 + 0x2000           # a kernel hypercall site, mapped by PT entry 2
USER_SITE = SITE + 0x1000          # ... and one in a user page (PT entry 3)
LONG = dict(cr0=int(Cr0.PE | Cr0.PG), cr3=PML4, cr4=int(Cr4.PAE), efer=int(Efer.LMA) | (1 << 8))
P_RW = Pte.P | Pte.RW
U, P = PfError.USER, PfError.PRESENT


# --- the CPL ------------------------------------------------------------------------------
def sregs_at(cpl: int, cr0: int = Cr0.PE | Cr0.PG):
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.cr3, s.cr4, s.efer = cr0, PML4, LONG["cr4"], LONG["efer"]
    s.ss.dpl = s.cs.dpl = cpl
    s.cs.selector, s.ss.selector = 0x10 | cpl, 0x18 | cpl
    return s


def test_caller_cpl():
    assert caller_cpl(sregs_at(3), 0x2) == 3
    assert caller_cpl(sregs_at(1), 0x2) == 1
    assert caller_cpl(sregs_at(0), 0x2) == 0
    assert caller_cpl(sregs_at(3, cr0=0), 0x2) == 0       # real mode: CPL 0, whatever SS says
    assert caller_cpl(sregs_at(0), 0x2 | RFLAGS_VM) == 3  # virtual-8086 mode


# --- the traps ------------------------------------------------------------------------------
class FakeVcpu:
    """The parts of Vcpu the traps use, with real kvm structs."""

    id = 0

    def __init__(self, cpl: int, rax: int, rip: int):
        self.regs = ffi.new("struct kvm_regs *")
        self.regs.rax, self.regs.rip, self.regs.rflags = rax, rip, 0x2
        self.regs.rdi, self.regs.rsi = 7, 0x1000
        self.sregs = sregs_at(cpl)
        self.injected: list[tuple[int, int | None]] = []
        self.dirty = False
        self.exit_debug = ffi.new("xk_exit_debug *")
        self.exit_debug.pc = rip
        self.exit_io = ffi.new("xk_exit_io *")
        self.exit_io.direction, self.exit_io.size = klib.KVM_EXIT_IO_OUT, 4

    def sync_regs(self):
        return self.regs

    def sync_sregs(self):
        return self.sregs

    def get_sregs(self):
        copy = ffi.new("struct kvm_sregs *")
        ffi.memmove(copy, self.sregs, ffi.sizeof("struct kvm_sregs"))
        return copy

    def set_sregs(self, sregs):
        ffi.memmove(self.sregs, sregs, ffi.sizeof("struct kvm_sregs"))

    def mark_regs_dirty(self, regs=None):
        self.dirty = True

    def inject_exception(self, vector, error_code=None):
        self.injected.append((vector, error_code))

    def get_cpuid(self):
        return [(0x80000008, 0, 0, 40, 0, 0, 0)]


class RecordingDispatcher:
    def __init__(self):
        self.calls: list[tuple[int, tuple]] = []

    def dispatch(self, vcpu, nr, args, long_mode=True):
        self.calls.append((nr, args))
        return 0


class FakeDomain:
    def __init__(self, mem: GuestMemory | None = None):
        self.dispatcher = RecordingDispatcher()
        self.mem = mem
        self.machine = type("M", (), {"long_mode": staticmethod(lambda vcpu: True)})()


SCHEDOP, SHUTDOWN = 29, 2


@pytest.mark.parametrize("cpl", [1, 2, 3])
def test_port_trap_refuses_outer_rings(cpl):
    """The stub's `out` reached us from CPL > 0 (IOPL 3 on hardware KVM): -EPERM, nothing dispatched."""
    domain, vcpu = FakeDomain(), FakeVcpu(cpl, rax=SCHEDOP, rip=0x1007)
    HypercallPageTrap(domain).on_port(vcpu)
    assert domain.dispatcher.calls == []
    assert vcpu.regs.rax == EPERM_RESULT == (1 << 64) - 1 and vcpu.dirty
    assert vcpu.regs.rip == 0x1007  # KVM already stepped past the out


def test_port_trap_serves_ring_0():
    domain, vcpu = FakeDomain(), FakeVcpu(0, rax=SCHEDOP, rip=0x1007)
    HypercallPageTrap(domain).on_port(vcpu)
    assert domain.dispatcher.calls == [(SCHEDOP, (7, 0x1000, 0, 0, 0, 0))]
    assert vcpu.regs.rax == 0


@pytest.fixture
def kernel_memory():
    """4 MiB of guest RAM with a long-mode page table: SITE supervisor-only, USER_SITE a user page."""
    mem = GuestMemory(4 << 20)
    upper = P_RW | Pte.US
    for gpa, value in [(PML4, PDPT | upper), (PDPT, PD | upper), (PD + 8, PT | upper),  # VA 2 MiB..4 MiB
                       (PT + 2 * 8, 0x5000 | P_RW), (PT + 3 * 8, 0x6000 | P_RW | Pte.US)]:
        mem.write_u64(gpa, value)
    return mem


def breakpoint_trap(mem, cpl: int, rip: int):
    domain = FakeDomain(mem)
    trap = BreakpointTrap(domain, [Site("xen_hypercall_intel", SITE), Site("xen_hypercall_amd", USER_SITE)])
    vcpu = FakeVcpu(cpl, rax=SCHEDOP, rip=rip)
    trap.on_debug(vcpu)
    return domain, vcpu


def test_breakpoint_at_cpl3_on_a_kernel_page_injects_the_fetch_fault(kernel_memory):
    domain, vcpu = breakpoint_trap(kernel_memory, 3, SITE)
    assert domain.dispatcher.calls == []
    assert vcpu.injected == [(14, P | U)]
    assert vcpu.sregs.cr2 == SITE
    assert vcpu.regs.rip == SITE and vcpu.regs.rax == SCHEDOP  # as if the fetch had faulted


def test_breakpoint_at_cpl3_on_a_missing_page_injects_not_present(kernel_memory):
    kernel_memory.write_u64(PT + 2 * 8, 0)
    domain, vcpu = breakpoint_trap(kernel_memory, 3, SITE)
    assert vcpu.injected == [(14, int(U))] and vcpu.sregs.cr2 == SITE
    assert domain.dispatcher.calls == []


def test_breakpoint_at_cpl3_on_a_user_page_runs_the_call_as_eperm(kernel_memory):
    domain, vcpu = breakpoint_trap(kernel_memory, 3, USER_SITE)
    assert vcpu.injected == [] and domain.dispatcher.calls == []
    assert vcpu.regs.rax == EPERM_RESULT and vcpu.regs.rip == USER_SITE + 3


def test_breakpoint_at_cpl1_executes_kernel_page_as_eperm(kernel_memory):
    domain, vcpu = breakpoint_trap(kernel_memory, 1, SITE)
    assert vcpu.injected == [] and domain.dispatcher.calls == []
    assert vcpu.regs.rax == EPERM_RESULT and vcpu.regs.rip == SITE + 3


def test_breakpoint_at_cpl0_dispatches(kernel_memory):
    domain, vcpu = breakpoint_trap(kernel_memory, 0, SITE)
    assert domain.dispatcher.calls == [(SCHEDOP, (7, 0x1000, 0, 0, 0, 0))]
    assert vcpu.regs.rip == SITE + 3 and vcpu.injected == []


@pytest.mark.parametrize("cpl, dispatched", [(0, True), (3, False)])
def test_kvm_xen_trap_uses_the_exits_cpl(cpl, dispatched):
    domain = FakeDomain()
    vcpu = FakeVcpu(0, rax=0, rip=0)
    vcpu.exit_xen = ffi.new("xk_exit_xen *")
    vcpu.exit_xen.type = klib.KVM_EXIT_XEN_HCALL
    vcpu.exit_xen_hcall = ffi.new("xk_xen_hcall *")
    h = vcpu.exit_xen_hcall
    h.longmode, h.cpl, h.input, h.result = 1, cpl, SCHEDOP, 12345
    h.params[0], h.params[1] = SHUTDOWN, 0x1000
    KvmXenTrap(domain).on_xen(vcpu)
    assert bool(domain.dispatcher.calls) == dispatched
    assert h.result == (0 if dispatched else EPERM_RESULT)
