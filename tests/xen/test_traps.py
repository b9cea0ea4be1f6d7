"""Hypercall traps: finding the guest's hypercall instructions, the page stubs, the choice."""
from __future__ import annotations

import struct

import pytest

import guestgen
from xenkvm.config import HypercallTrap
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.machine import layout
from xenkvm.xen import trapsites
from xenkvm.machine.boot.elf import load_elf
from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.traps import (PATCHED, BreakpointTrap, HypercallPageTrap, KvmXenTrap, PatchSite, PatchTrap, TrapError,
                              choose, patch_sites)
from xenkvm.xen.trapsites import Site, find_sites, pattern_sites, site_gpa

LINUX_LIKE = (b"\x90" * 16 + b"\x58\x74\x05\xeb\x13\x0f\x1f\x00" + b"\x90" * 8
              + b"\x0f\x01\xd9\xe9\x00\x00\x00\x00" + b"\xcc" * 8      # xen_hypercall_amd (16-aligned)
              + b"\x0f\x01\xc1\xe9\x00\x00\x00\x00" + b"\xcc" * 8)     # xen_hypercall_intel


def test_pattern_finds_linux_stub_pair():
    elf = guestgen.pvh_elf(LINUX_LIKE)
    sites = find_sites(elf)
    names = {s.name: s.vaddr for s in sites}
    assert names["xen_hypercall_intel"] - names["xen_hypercall_amd"] == 16
    assert names["xen_hypercall_amd"] % 16 == 0


def test_pattern_finds_lone_vmcall_ret():
    elf = guestgen.pvh_elf(b"\x90\x90" + b"\x0f\x01\xc1\xc3")
    assert find_sites(elf) == [Site("xen_hypercall_intel", guestgen.LOAD_ADDR + 2)]


def test_no_sites_in_plain_code_or_garbage():
    assert find_sites(guestgen.pvh_elf(guestgen.SPIN)) == []
    assert find_sites(b"not an elf") == []
    assert pattern_sites(b"\x7fELF" + b"\x02" + b"\xff" * 100) == []


def test_symbols_preferred(tmp_path):
    import subprocess
    src = tmp_path / "s.S"
    src.write_text(".globl xen_hypercall_intel\n.text\nnop\nxen_hypercall_intel: vmcall\nret\n"
                   ".globl _start\n_start: ret\n")
    out = tmp_path / "s.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x200000", "-o", str(out), str(src)], check=True)
    sites = trapsites.symbol_sites(out.read_bytes())
    assert sites == [Site("xen_hypercall_intel", 0x200001)]


def test_stub_page_layout():
    page = HypercallPageTrap.stubs()
    assert len(page) == 4096
    for nr in (0, 17, 127):
        stub = page[nr * 32: nr * 32 + 8]
        assert stub[0] == 0xB8 and struct.unpack_from("<I", stub, 1)[0] == nr
        assert stub[5:7] == bytes([0xE7, layout.HYPERCALL_PORT]) and stub[7] == 0xC3


class FakeHost:
    def __init__(self, traps_available):
        self._t = traps_available

    def hypercall_traps(self):
        return self._t


class FakeDomain:
    def __init__(self, available):
        self.machine = type("M", (), {"host": FakeHost(available)})()


ELF_WITH_SITE = guestgen.pvh_elf(b"\x0f\x01\xc1\xc3")
ELF_PLAIN = guestgen.pvh_elf(guestgen.SPIN)


def kinds(ts):
    return [type(t) for t in ts]


def test_choose_auto():
    both = ["hypercall-page", "breakpoint"]
    assert kinds(choose(FakeDomain(both), HypercallTrap.AUTO, ELF_PLAIN)) == [HypercallPageTrap]
    assert kinds(choose(FakeDomain(both), HypercallTrap.AUTO, ELF_WITH_SITE)) == [HypercallPageTrap, BreakpointTrap]
    assert kinds(choose(FakeDomain(["kvm-xen"] + both), HypercallTrap.AUTO, ELF_WITH_SITE)) == [KvmXenTrap]
    with pytest.raises(TrapError, match="neither"):
        choose(FakeDomain(["hypercall-page"]), HypercallTrap.AUTO, ELF_WITH_SITE)


# what Host.hypercall_traps() lists: PVM here, hardware KVM without KVM_XEN, with it, no MSR filter
PVM = ["hypercall-page", "patch", "breakpoint"]
NO_MSR_FILTER = ["patch", "breakpoint"]
WITH_KVM_XEN = ["kvm-xen"] + PVM


def test_choose_auto_patches_direct_sites_without_kvm_xen():
    assert kinds(choose(FakeDomain(PVM), HypercallTrap.AUTO, ELF_WITH_SITE)) == [HypercallPageTrap, PatchTrap]
    assert kinds(choose(FakeDomain(PVM), HypercallTrap.AUTO, ELF_PLAIN)) == [HypercallPageTrap]
    assert kinds(choose(FakeDomain(NO_MSR_FILTER), HypercallTrap.AUTO, ELF_WITH_SITE)) == [PatchTrap]
    assert kinds(choose(FakeDomain(WITH_KVM_XEN), HypercallTrap.AUTO, ELF_WITH_SITE)) == [KvmXenTrap]
    [_, trap] = choose(FakeDomain(PVM), HypercallTrap.AUTO, ELF_WITH_SITE)
    assert trap.sites == [PatchSite(Site("xen_hypercall_intel", guestgen.LOAD_ADDR), guestgen.LOAD_ADDR)]


def _elf_with_symbol_outside(tmp_path) -> bytes:
    """An ELF whose xen_hypercall_intel symbol names an address no segment loads."""
    import subprocess
    src = tmp_path / "s.S"
    src.write_text(".globl xen_hypercall_intel\n.set xen_hypercall_intel, 0x900000\n"
                   ".globl _start\n.text\n_start: ret\n")
    out = tmp_path / "s.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x200000", "-o", str(out), str(src)],
                   check=True)
    return out.read_bytes()


def test_choose_auto_breakpoints_a_site_outside_the_loaded_segments(tmp_path):
    elf = _elf_with_symbol_outside(tmp_path)
    assert find_sites(elf) == [Site("xen_hypercall_intel", 0x900000)]
    assert kinds(choose(FakeDomain(PVM), HypercallTrap.AUTO, elf)) == [HypercallPageTrap, BreakpointTrap]
    with pytest.raises(TrapError, match="neither"):
        choose(FakeDomain(["hypercall-page", "patch"]), HypercallTrap.AUTO, elf)
    with pytest.raises(TrapError, match="outside the image's loaded segments"):
        choose(FakeDomain(PVM), HypercallTrap.PATCH, elf)


def test_choose_forced_patch():
    assert kinds(choose(FakeDomain(PVM), HypercallTrap.PATCH, ELF_WITH_SITE)) == [PatchTrap]
    with pytest.raises(TrapError, match="no xen_hypercall"):
        choose(FakeDomain(PVM), HypercallTrap.PATCH, ELF_PLAIN)


def _elf_at(code: bytes, vaddr: int, paddr: int) -> bytes:
    """guestgen's PVH ELF with its PT_LOAD moved to ``vaddr`` (linked high, loaded at ``paddr``)."""
    elf = bytearray(guestgen.pvh_elf(code))
    struct.pack_into("<QQ", elf, 64 + 16, vaddr, paddr)  # first phdr: p_vaddr, p_paddr
    return bytes(elf)


def test_site_gpa_through_the_segment():
    elf = _elf_at(b"\x90" * 8 + b"\x0f\x01\xc1\xc3", 0xFFFFFFFF81000000, 0x1000000)
    [site] = find_sites(elf)
    assert site.vaddr == 0xFFFFFFFF81000008
    assert site_gpa(elf, site.vaddr) == 0x1000008
    assert site_gpa(elf, 0xFFFFFFFF81000000 + 11) is None  # the 3 bytes would run past the file bytes
    assert site_gpa(elf, 0x1000008) is None                  # a physical address is not a vaddr
    assert site_gpa(b"not an elf", 0) is None


CODE = b"\x55" * 16 + b"\x0f\x01\xd9\xc3" + b"\xaa" * 12 + b"\x0f\x01\xc1\xc3" + b"\x66" * 8


def _loaded(code: bytes) -> tuple[GuestMemory, bytes]:
    mem = GuestMemory(4 * 1024 * 1024)
    elf = guestgen.pvh_elf(code)
    load_elf(mem, elf)
    return mem, elf


def test_patch_rewrites_exactly_the_sites():
    mem, elf = _loaded(CODE)
    sites = [PatchSite(s, site_gpa(elf, s.vaddr)) for s in find_sites(elf)]
    assert [p.gpa - guestgen.LOAD_ADDR for p in sites] == [16, 32]
    before = bytes(mem.read(0, 4 * 1024 * 1024))
    patch_sites(mem, sites)
    after = bytes(mem.read(0, 4 * 1024 * 1024))
    assert PATCHED == b"\xe7\xea\x90"
    base = guestgen.LOAD_ADDR
    assert after[base:base + len(CODE)] == (b"\x55" * 16 + PATCHED + b"\xc3" + b"\xaa" * 12 + PATCHED + b"\xc3"
                                          + b"\x66" * 8)
    changed = [i for i in range(len(before)) if before[i] != after[i]] if before != after else []
    assert changed == [base + 16, base + 17, base + 18, base + 32, base + 33, base + 34]


def test_patch_refuses_bytes_that_are_not_vmcall():
    mem, elf = _loaded(CODE)
    good = PatchSite(Site("xen_hypercall_amd", guestgen.LOAD_ADDR + 16), guestgen.LOAD_ADDR + 16)
    bad = PatchSite(Site("xen_hypercall_intel", guestgen.LOAD_ADDR + 20), guestgen.LOAD_ADDR + 20)  # 0xaa bytes
    before = bytes(mem.read(guestgen.LOAD_ADDR, len(CODE)))
    with pytest.raises(TrapError, match="aa aa aa, not vmcall/vmmcall"):
        patch_sites(mem, [good, bad])
    assert bytes(mem.read(guestgen.LOAD_ADDR, len(CODE))) == before  # all or nothing: the good one untouched
    with pytest.raises(TrapError, match="not in guest memory"):
        patch_sites(mem, [PatchSite(good.site, 1 << 40)])
    patch_sites(mem, [good])
    with pytest.raises(TrapError, match="e7 ea 90"):  # patching twice is refused too
        patch_sites(mem, [good])


class RecordingMachine:
    """The registration half of a Machine: what a trap's install() registers."""

    def __init__(self):
        self.port_hooks, self.exit_handlers = {}, {}

    def register_port_hook(self, port, handler):
        self.port_hooks[port] = handler

    def register_exit(self, reason, handler):
        self.exit_handlers[reason] = handler


def test_patch_trap_install_hooks_the_hypercall_port():
    mem, elf = _loaded(CODE)
    machine = RecordingMachine()
    hooks = machine.port_hooks
    domain = type("D", (), {"mem": mem, "machine": machine})()
    trap = PatchTrap(domain, [PatchSite(s, site_gpa(elf, s.vaddr)) for s in find_sites(elf)])
    trap.install()
    assert hooks[layout.HYPERCALL_PORT] == trap.on_port
    assert bytes(mem.read(guestgen.LOAD_ADDR + 16, 3)) == PATCHED


def test_choose_forced_refuses_guests_that_would_hang():
    with pytest.raises(TrapError, match="use patch, breakpoint or auto"):
        choose(FakeDomain(PVM), HypercallTrap.HYPERCALL_PAGE, ELF_WITH_SITE)
    both = ["hypercall-page", "breakpoint"]
    with pytest.raises(TrapError, match="cannot catch"):
        choose(FakeDomain(both), HypercallTrap.HYPERCALL_PAGE, ELF_WITH_SITE)
    with pytest.raises(TrapError, match="no xen_hypercall"):
        choose(FakeDomain(both), HypercallTrap.BREAKPOINT, ELF_PLAIN)
    with pytest.raises(TrapError, match="not available"):
        choose(FakeDomain(both), HypercallTrap.KVM_XEN, ELF_PLAIN)


class RecordingVm:
    """Records the KVM_XEN ioctl sequence the kvm-xen trap issues."""

    def __init__(self):
        self.calls = []

    def xen_hvm_config(self, flags, msr):
        self.calls.append(("KVM_XEN_HVM_CONFIG", flags, msr))


def test_kvm_xen_trap_ioctl_sequence():
    vm = RecordingVm()
    machine = RecordingMachine()
    handlers = machine.exit_handlers
    domain = type("D", (), {"vm": vm, "machine": machine})()
    KvmXenTrap(domain).install()
    assert vm.calls == [("KVM_XEN_HVM_CONFIG", klib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, 0x40000000)]
    assert klib.KVM_EXIT_XEN in handlers


def test_host_trap_list_and_what_auto_picks():
    """Host.hypercall_traps() per capability set, and the `xenkvm info` line saying what auto picks."""
    from xenkvm.machine.host import Flavour, Host
    pvm = Host(Flavour.PVM, {"X86_USER_SPACE_MSR": 1, "X86_MSR_FILTER": 1, "SET_GUEST_DEBUG": 1})
    bare = Host(Flavour.SVM, {})
    xen = Host(Flavour.VMX, {"X86_USER_SPACE_MSR": 1, "X86_MSR_FILTER": 1, "SET_GUEST_DEBUG": 1},
               klib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL)
    assert pvm.hypercall_traps() == PVM
    assert bare.hypercall_traps() == ["patch"]
    assert xen.hypercall_traps() == WITH_KVM_XEN
    assert pvm.auto_trap().startswith("hypercall-page for guests that ask for one, patch for")
    assert "breakpoint only where a site lies outside the loaded segments" in pvm.auto_trap()
    assert bare.auto_trap().startswith("no hypercall page") and "breakpoint" not in bare.auto_trap()
    assert xen.auto_trap().startswith("kvm-xen")
    assert any(line.startswith("hypercall trap auto picks: hypercall-page") for line in pvm.describe())
