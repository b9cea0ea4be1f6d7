"""Hypercall traps: finding the guest's hypercall instructions, the page stubs, the choice."""
from __future__ import annotations

import struct

import pytest

import guestgen
from xenkvm.config import HypercallTrap
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.machine import layout
from xenkvm.xen import traps
from xenkvm.xen.traps import (BreakpointTrap, HypercallPageTrap, KvmXenTrap, Site, TrapError, choose,
                              find_sites, pattern_sites)

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
    sites = traps.symbol_sites(out.read_bytes())
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


def test_choose_forced_refuses_guests_that_would_hang():
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
    handlers = {}
    domain = type("D", (), {"vm": vm, "machine": type("M", (), {"exit_handlers": handlers})()})()
    KvmXenTrap(domain).install()
    assert vm.calls == [("KVM_XEN_HVM_CONFIG", klib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, 0x40000000)]
    assert klib.KVM_EXIT_XEN in handlers
