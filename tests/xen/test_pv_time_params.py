"""``xen.pv_time: false``: the Linux command line carries the TSC rate the hidden pvclock would give.

Without it Debian's PVH kernel in the nested rig fails every TSC calibration (each PIT and PM
timer read is a slow VM exit), marks the TSC unstable and stops after "Poking KASLR"
(docs/linux-xen.md, "PV time").
"""
from __future__ import annotations

import dataclasses

import pytest

import guestgen
from xenkvm.build import build_machine, xen_domain
from xenkvm.config import GuestConfig, XenConfig
from xenkvm.machine import loader
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.xen.shinfo import native_clock_params

CMDLINE_PADDR = 24   # struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr


def _boot_cmdline(tmp_path, pv_time: bool, guest_os: bytes | None = b"linux",
                  user: str = "quiet") -> tuple[str, tuple[str, ...]]:
    """Load a PVH ELF into a Xen machine: the command line the guest finds in hvm_start_info,
    and the host's own parameters (PVM adds some)."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(guestgen.pvh_elf(guestgen.SPIN, guest_os=guest_os))
    cfg = GuestConfig(name="t", kernel=kernel, memory=32 << 20, vcpus=2, console="none", cmdline=user,
                      xen=XenConfig(pv_time=pv_time))
    m = build_machine(cfg, sink=ConsoleSink(None))
    try:
        xen_domain(m)
        entry = loader.prepare(m)
        gpa = m.mem.read_u64(entry.rbx + CMDLINE_PADDR)
        raw = m.mem.read(gpa, 512)
        return raw[:raw.index(b"\0")].decode(), m.host.kernel_params
    finally:
        m.close()


def test_pv_time_off_tells_linux_its_tsc_rate(tmp_path):
    """pv_time false: the pvclock's TSC rate is on the command line, after the host's words and
    before the user's (so a user's own tsc_early_khz wins)."""
    line, host = _boot_cmdline(tmp_path, pv_time=False)
    params = line.split()
    assert params[:len(host)] == list(host) and params[-1] == "quiet"
    added = params[len(host):-1]
    assert added and added[0].startswith("tsc_early_khz=") and int(added[0].split("=")[1]) > 0
    assert set(added[1:]) <= {"tsc=reliable"}


def test_pv_time_on_adds_no_clock_parameter(tmp_path):
    """The default keeps the pvclock: the line is the host's parameters and the user's, no more."""
    line, host = _boot_cmdline(tmp_path, pv_time=True)
    assert line == " ".join((*host, "quiet"))


def test_non_linux_guest_gets_no_parameters(tmp_path):
    """A PVH image that is not Linux gets its command line untouched."""
    assert _boot_cmdline(tmp_path, pv_time=False, guest_os=None)[0] == "quiet"


def test_domain_params_follow_the_pvclock(xen_machine):
    """The rate is the pvclock's own (shinfo.tsc_khz: dilated on PVM), reliable only where its
    stable bit would be set."""
    xen = xen_machine.xen
    assert xen.kernel_params() == ()
    xen.cfg = dataclasses.replace(xen.cfg, pv_time=False)
    expect = (f"tsc_early_khz={xen.shinfo.tsc_khz}",) + (("tsc=reliable",) if xen.shinfo.tsc_stable else ())
    assert xen.kernel_params() == expect


def test_native_clock_params():
    assert native_clock_params(2_596_113, True) == ("tsc_early_khz=2596113", "tsc=reliable")
    assert native_clock_params(2_596_113, False) == ("tsc_early_khz=2596113",)
    with pytest.raises(ValueError):
        native_clock_params(0, True)
