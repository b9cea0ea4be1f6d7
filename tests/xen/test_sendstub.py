"""The send stub (xen/sendstub.py): its code, when the patch trap writes it, what the VMM does
with a send KVM did not match, and how snapshots keep it.

Real guests run it under /dev/kvm in tests/backends (test_send_stub_kicks_inside_kvm, the
hostile frontend and netfront with ``xk.trap=direct``, test_blk_restored_with_its_send_stub).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
from types import SimpleNamespace

import pytest

import guestgen
from test_traps import LINUX_LIKE, RecordingMachine, _loaded
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.machine import layout
from xenkvm.xen import sendstub, snapshot as xensnap, traps
from xenkvm.xen.abi import EvtchnOp, Hypercall
from xenkvm.xen.snapshot import SnapshotError
from xenkvm.xen.traps import PATCHED, PatchSite, PatchTrap
from xenkvm.xen.trapsites import find_sites, site_gpa

#: Debian 12's 6.1 kernel, from xen_hypercall_amd: vmmcall; jmp __x86_return_thunk; nopl; and
#: xen_hypercall_intel: vmcall; jmp; int3 x 8
DEBIAN = bytes.fromhex("0f01d9 e938e13f00 0f1f840000000000 0f01c1 e928e13f00 cccccccccccccccc")
#: guests/ firmware (xen_hcall.S): ret and GAS's 11-byte nop + nop
FIRMWARE = bytes.fromhex("0f01d9 c3 66662e0f1f840000000000 90 0f01c1 c3 66662e0f1f840000000000 90")
STUB = sendstub.stub(layout.HYPERCALL_PORT, layout.SEND_PORT)


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump (binutils)")
def test_the_stub_is_the_documented_code(tmp_path):
    (tmp_path / "stub.bin").write_bytes(STUB)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", "--no-show-raw-insn",
                          str(tmp_path / "stub.bin")], capture_output=True, text=True, check=True).stdout
    insns = {int(m.group(1), 16): " ".join(m.group(2).split())
             for m in re.finditer(r"^\s*([0-9a-f]+):\t(.*)$", out, re.M)}
    assert insns[0] == "jmp 0x4" and insns[2] == insns[3] == "ret"
    assert insns[4] == "cmp $0x20,%eax" and insns[7] == "jne 0x1b"
    assert insns[9] == "cmp $0x4,%edi" and insns[12] == "jne 0x1b" and insns[14] == "jmp 0x14"
    assert insns[16] == "jmp 0x4" and insns[18] == insns[19] == "ret"        # the intel entry
    assert insns[20] == "mov (%rsi),%eax"
    assert insns[22] == f"out %eax,${layout.SEND_PORT:#x}" and insns[24] == "xor %eax,%eax"
    assert insns[26] == "ret" and insns[27] == f"out %eax,${layout.HYPERCALL_PORT:#x}" and insns[29] == "ret"
    assert (sendstub.SEND_OUT, sendstub.SEND_OUT_END, sendstub.SEND_RESUME) == (22, 24, 26)
    assert (Hypercall.event_channel_op, EvtchnOp.send) == (0x20, 4)
    # wherever a parked vCPU may be in the plain-patched pair, the stub returns or starts over
    for off in sendstub.SAFE_OFFSETS:
        assert insns[off] in ("ret", "jmp 0x4")


@pytest.mark.parametrize("code", [DEBIAN, FIRMWARE, LINUX_LIKE[32:64]], ids=["debian", "firmware", "test-image"])
def test_linux_pairs_are_recognised(code):
    assert sendstub.is_linux_pair(code)


@pytest.mark.parametrize("change", [
    lambda c: c[16:] + c[:16],                          # intel first
    lambda c: c[:26] + b"\x55" + c[27:],               # an instruction (push) in the padding
    lambda c: c[:3] + b"\x90" + c[4:],                 # no return after the vmmcall
    lambda c: c[:31],                                  # short
    lambda c: c[:8] + b"\x0f\x1f\xc8" + c[11:],        # 0f 1f with a reg field: not a nop
])
def test_anything_else_is_not_overwritten(change):
    assert not sendstub.is_linux_pair(change(DEBIAN))


class FakeFast:
    def __init__(self):
        self.kernel = None
        self.ports: dict[int, int] = {}
        self.on_register = None
        self.sends = 3

    def use_kernel_kicks(self, vm, io_port):
        self.kernel = (vm, io_port)


def _domain(mem, kernel_kicks=True, fast_path=True, trace=False, ioeventfd=True):
    machine = RecordingMachine()
    machine.trace, machine.vm, machine.stopping, machine.runners = trace, object(), False, []
    machine.host = SimpleNamespace(has_ioeventfd=ioeventfd)
    cfg = SimpleNamespace(kernel_kicks=kernel_kicks, fast_path=fast_path)
    return SimpleNamespace(mem=mem, machine=machine, cfg=cfg, fast=FakeFast(), lock=threading.RLock(), domid=1)


def _trap(mem, elf, domain):
    return PatchTrap(domain, [PatchSite(s, site_gpa(elf, s.vaddr)) for s in find_sites(elf)])


#: the pair after the plain patch and the kernel's own boot patching (apply_returns, no thunk)
RETURNS_DONE = bytes.fromhex("e7ea90 c3cccccccc 0f1f840000000000 e7ea90 c3cccccccc cccccccccccccccc")


def test_install_patches_plainly_and_plans_the_stub_for_the_first_ring_port():
    """At boot the stub would trip the kernel's own return-site patching: the plain patch
    goes in, and the stub waits for the first backend binding (FastSend.on_register)."""
    mem, elf = _loaded(LINUX_LIKE)
    d = _domain(mem)
    trap = _trap(mem, elf, d)
    trap.install()
    amd = trap.pair()
    assert amd.gpa == guestgen.LOAD_ADDR + 32 and not trap.send_stub
    for p in trap.sites:
        assert bytes(mem.read(p.gpa, 3)) == PATCHED
    assert set(d.machine.port_hooks) == {layout.HYPERCALL_PORT} and d.fast.kernel is None
    up = trap.upgrade
    assert d.fast.on_register == up.request and (up.gpa, up.vaddr, up.code) == (amd.gpa, amd.site.vaddr, STUB)


@pytest.mark.parametrize("why", ["kernel_kicks off", "fast path off", "--trace", "no ioeventfd", "not the pair"])
def test_otherwise_no_stub_is_planned(why):
    code = LINUX_LIKE[:40] + b"\x55" + LINUX_LIKE[41:] if why == "not the pair" else LINUX_LIKE
    mem, elf = _loaded(code)
    d = _domain(mem, kernel_kicks=why != "kernel_kicks off", fast_path=why != "fast path off",
                trace=why == "--trace", ioeventfd=why != "no ioeventfd")
    trap = _trap(mem, elf, d)
    trap.install()
    assert trap.upgrade is None and d.fast.on_register is None and not trap.send_stub
    for p in trap.sites:
        assert bytes(mem.read(p.gpa, 3)) == PATCHED


def test_upgradable_only_once_the_kernel_made_its_returns_plain():
    assert sendstub.upgradable(RETURNS_DONE, PATCHED)
    thunk = RETURNS_DONE[:3] + bytes.fromhex("e938e13f00") + RETURNS_DONE[8:]      # the return thunk kept
    assert not sendstub.upgradable(thunk, PATCHED)
    assert not sendstub.upgradable(RETURNS_DONE[:16] + DEBIAN[16:], PATCHED)     # intel not patched
    assert not sendstub.upgradable(RETURNS_DONE[:28] + b"\x55" + RETURNS_DONE[29:], PATCHED)
    assert not sendstub.upgradable(STUB, PATCHED)


def test_parked_vcpus_may_be_at_the_entries_or_returns_only():
    base = 0xFFFF_FFFF_8100_0000
    assert all(sendstub.rip_allows(base + off, base) for off in (0, 2, 3, 16, 18, 19))
    assert sendstub.rip_allows(base - 1, base) and sendstub.rip_allows(base + 32, base)
    assert not any(sendstub.rip_allows(base + off, base) for off in (1, 4, 8, 17, 20, 31))


class FakeParking:
    """Parking as StubUpgrade uses it: every vCPU parked at ``rips``."""
    rips: dict[int, int] = {}
    log: list[str] = []

    def __init__(self, runners):
        pass

    def start(self):
        FakeParking.log.append("start")

    def wait(self, timeout):
        FakeParking.log.append("wait")

    def run_parked(self, work):
        return dict(FakeParking.rips)

    def release(self):
        FakeParking.log.append("release")


@pytest.fixture
def parked(monkeypatch):
    monkeypatch.setattr(sendstub, "Parking", FakeParking)
    FakeParking.log = []
    return FakeParking


def _planned(mem_code=LINUX_LIKE):
    mem, elf = _loaded(mem_code)
    d = _domain(mem)
    trap = _trap(mem, elf, d)
    trap.install()
    amd = trap.pair()
    mem.write(amd.gpa, RETURNS_DONE)            # what the kernel's boot patching leaves
    return mem, d, trap, amd


def test_the_stub_goes_in_with_the_vcpus_parked(parked):
    mem, d, trap, amd = _planned()
    parked.rips = {0: amd.site.vaddr + 2, 1: 0x1234}          # one just after the old `out`
    trap.upgrade._install()
    assert bytes(mem.read(amd.gpa, 32)) == STUB and trap.send_stub and trap.upgrade.done
    assert layout.SEND_PORT in d.machine.port_hooks and d.fast.kernel == (d.machine.vm, layout.SEND_PORT)
    assert d.fast.on_register is None and parked.log == ["start", "wait", "release"]


def test_a_vcpu_inside_the_pair_where_the_stub_differs_defers_it(parked):
    mem, d, trap, amd = _planned()
    parked.rips = {0: amd.site.vaddr + 8}
    trap.upgrade._install()
    assert bytes(mem.read(amd.gpa, 32)) == RETURNS_DONE and not trap.send_stub and not trap.upgrade.done
    assert layout.SEND_PORT not in d.machine.port_hooks and parked.log[-1] == "release"


def test_a_kernel_keeping_its_return_thunk_keeps_the_plain_patch(parked):
    mem, d, trap, amd = _planned()
    mem.write(amd.gpa + 3, bytes.fromhex("e938e13f00"))
    parked.rips = {0: 0x1234}
    trap.upgrade._install()
    assert bytes(mem.read(amd.gpa, 3)) == PATCHED and not trap.send_stub and trap.upgrade.done


class FakeVcpu:
    """The state on_send_port reads: the exit's I/O, registers, CPL and mode."""

    def __init__(self, rip, cpl=0, size=4, long_mode=True):
        self.id = 0
        self.exit_io = SimpleNamespace(direction=klib.KVM_EXIT_IO_OUT, size=size, count=1)
        self.regs = SimpleNamespace(rip=rip, rax=7, rdi=EvtchnOp.send, rsi=0x5000, rdx=1, r10=2, r8=3, r9=4,
                                    rflags=2)
        self.sregs = SimpleNamespace(cr0=1, ss=SimpleNamespace(dpl=cpl), cs=SimpleNamespace(dpl=cpl))
        self.long_mode, self.dirty = long_mode, False

    def sync_regs(self):
        return self.regs

    def sync_sregs(self):
        return self.sregs

    def mark_regs_dirty(self, regs=None):
        self.dirty = True


STUB_VADDR = 0xFFFF_FFFF_8100_0000


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def result(domain, vcpu, cpl, nr, args, long_mode):
        seen.append((cpl, nr, args[:2], long_mode))
        return -22 & (1 << 64) - 1

    monkeypatch.setattr(traps, "hypercall_result", result)
    return seen


def _on_send(vcpu):
    d = SimpleNamespace(machine=SimpleNamespace(long_mode=lambda v: v.long_mode))
    traps.stub_send(d, vcpu, STUB_VADDR)


@pytest.mark.parametrize("at", [sendstub.SEND_OUT, sendstub.SEND_OUT_END], ids=["vmx-svm", "pvm"])
def test_an_unmatched_send_is_the_hypercall_with_its_result_past_the_xor(calls, at):
    """RIP at the exit: still at the ``out`` on hardware KVM, past it on PVM; either way the
    vCPU goes on at the stub's ``ret`` (a RIP KVM sees changed, so it skips nothing more)."""
    v = FakeVcpu(STUB_VADDR + at)
    _on_send(v)
    assert calls == [(0, Hypercall.event_channel_op, (EvtchnOp.send, 0x5000), True)]
    assert v.regs.rax == -22 & (1 << 64) - 1 and v.regs.rip == STUB_VADDR + 26 and v.dirty   # the ret


@pytest.mark.parametrize("vcpu", [FakeVcpu(STUB_VADDR + 20), FakeVcpu(STUB_VADDR + 26), FakeVcpu(STUB_VADDR + 24, cpl=3),
                                  FakeVcpu(STUB_VADDR + 24, size=1), FakeVcpu(STUB_VADDR + 24, long_mode=False)],
                         ids=["elsewhere", "after", "cpl3", "byte", "not-long-mode"])
def test_an_out_to_the_port_from_anything_else_is_ignored(calls, vcpu):
    _on_send(vcpu)
    assert calls == [] and vcpu.regs.rax == 7 and not vcpu.dirty


def test_snapshots_keep_the_stub_and_check_it_is_there(parked):
    mem, d, trap, amd = _planned()
    parked.rips = {}
    trap.upgrade._install()
    doc = xensnap._trap_doc(trap)
    assert doc["send_stub"] is True
    d2 = _domain(mem)
    again = xensnap._trap_from(d2, doc)
    assert again.send_stub and again.expected() == [(amd.gpa, STUB)]
    xensnap.reinstall(d2, again)
    assert layout.SEND_PORT in d2.machine.port_hooks and d2.fast.kernel is not None and again.upgrade is None
    mem.write(amd.gpa + 22, b"\x90\x90")                           # not the stub any more
    with pytest.raises(SnapshotError, match="not patched"):
        xensnap.reinstall(_domain(mem), xensnap._trap_from(d, doc))


def test_a_snapshot_before_the_stub_plans_it_again_on_restore():
    mem, d, trap, amd = _planned()
    doc = xensnap._trap_doc(trap)
    assert doc["send_stub"] is False
    d2 = _domain(mem)
    again = xensnap._trap_from(d2, doc)
    xensnap.reinstall(d2, again)
    assert not again.send_stub and d2.fast.on_register == again.upgrade.request
    del doc["send_stub"]                                            # an older snapshot's doc
    assert xensnap._trap_from(d, doc).send_stub is False
    bad = dict(doc, send_stub=True, sites=doc["sites"][:1])
    with pytest.raises(ValueError, match="not Linux's hypercall pair"):
        xensnap._trap_from(d, bad)
