"""Debian's unmodified cloud kernel as a Xen guest: PVH (2 vCPUs) and HVM (bzImage + platform PCI).

Run by ``make test-linux`` after ``make linux-xen-image`` has written guests/linux-pvh.yaml,
guests/linux-hvm.yaml and .cache/linux/initramfs-xen.cpio.gz.  Each boot goes to the
initramfs marker after a xenstore round trip with the host (the guest writes
``data/guest-hello``, this process reads it through the embedded xenstored's socket and
writes ``data/host-reply``, which the guest prints after the marker), then the guest powers
off (or, in the shutdown variant, the host asks it to through ``control/shutdown``).  The
guest's dmesg, dumped on hvc0 between markers, must show the Xen clocksource and timer and
the grant table, and no BUG/Oops/WARNING/panic.  On PVM hosts each boot takes minutes
(docs/linux-xen.md); the measured times are printed.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.linux.xenboot import ROOT, XenBoot, boot

PVH = ROOT / "guests" / "linux-pvh.yaml"
HVM = ROOT / "guests" / "linux-hvm.yaml"
TIMEOUT = float(os.environ.get("XENKVM_LINUX_BOOT_TIMEOUT", "2400"))

pytestmark = [pytest.mark.linux, pytest.mark.timeout(TIMEOUT + 120)]


def _need(guest: Path) -> Path:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    if not guest.is_file() or not (ROOT / ".cache" / "linux" / "initramfs-xen.cpio.gz").is_file():
        pytest.skip("no Xen Linux image: run `make linux-xen-image` first")
    return guest


def _report(what: str, r: XenBoot) -> None:
    marker = f"{r.marker_s:.1f}s" if r.marker_s is not None else "never"
    print(f"\n{what}: marker at {marker}, exit {r.returncode} at {r.elapsed:.1f}s wall; "
          f"guest wrote {r.guest_hello!r}, host replied {r.host_reply!r}")


def _check(r: XenBoot, status: int = 0) -> None:
    ctx = f"\nstderr:\n{r.stderr[-2000:]}\nconsole tail:\n{r.console[-3000:]}"
    assert not r.host_errors, f"host side: {r.host_errors}{ctx}"
    assert r.marker_line is not None, f"marker missing{ctx}"
    assert r.guest_hello and r.guest_hello.startswith("hello from "), f"guest key {r.guest_hello!r}{ctx}"
    assert r.marker_line.split(maxsplit=1)[1:] == [r.host_reply], \
        f"guest printed {r.marker_line!r}, host wrote {r.host_reply!r}{ctx}"
    assert "xenkvm: hypervisor xen" in r.console, ctx
    assert "xenkvm: clocksource xen" in r.console, ctx
    problems = r.dmesg_problems()
    assert not problems, "dmesg: " + "; ".join(problems[:10]) + ctx
    assert r.returncode == status, f"exit status {r.returncode}, expected {status}{ctx}"


@pytest.mark.hw
def test_pvh_two_vcpus(tmp_path: Path) -> None:
    """`auto` on a host without KVM_XEN: the kernel's xen_hypercall_amd/_intel are patched."""
    r = boot(_need(PVH), tmp_path, vcpus=2, timeout=TIMEOUT, verbose=True)
    _report("PVH, 2 vCPUs", r)
    _check(r)
    assert "smpboot: Total of 2 processors activated" in r.dmesg, r.dmesg[-3000:]
    assert "hypercall traps: hypercall-page, patch\n" in r.stderr, r.stderr[-3000:]


@pytest.mark.hw
def test_hvm_platform_device(tmp_path: Path) -> None:
    """The bzImage runs as its extracted vmlinux, entered at startup_64, with its sites patched."""
    r = boot(_need(HVM), tmp_path, timeout=TIMEOUT, verbose=True)
    _report("HVM (bzImage as vmlinux, 64-bit entry, platform PCI)", r)
    _check(r)
    assert "vmlinux via the 64-bit boot protocol" in r.stderr, r.stderr[-3000:]
    assert "hypercall traps: hypercall-page, patch\n" in r.stderr, r.stderr[-3000:]
    assert "[5853:0001]" in r.dmesg, "the platform device was not enumerated:\n" + r.dmesg[-3000:]
    assert "Xen HVM callback vector" in r.dmesg or "Xen Platform PCI" in r.dmesg, r.dmesg[-3000:]


@pytest.mark.linux_more
@pytest.mark.breakpoint
def test_pvh_host_shutdown_request(tmp_path: Path) -> None:
    """One vCPU; the guest waits after the marker and the host powers it off via control/shutdown.
    The breakpoint trap, chosen explicitly, keeps its Debian-kernel boot here."""
    r = boot(_need(PVH), tmp_path, vcpus=1, timeout=TIMEOUT, cmdline_extra="xenkvm.end=wait",
             shutdown="poweroff", trap="breakpoint", verbose=True)
    _report("PVH, 1 vCPU, host shutdown request, breakpoint trap", r)
    _check(r)
    assert "hypercall traps: breakpoint\n" in r.stderr, r.stderr[-3000:]


@pytest.mark.linux_more
@pytest.mark.parametrize("end,status,check", [
    ("reboot", 3, "guest shut down (reboot) via SCHEDOP_shutdown"),
    ("crash", 6, "guest shut down (crash) via SCHEDOP_shutdown\nlast console lines:"),
])
def test_pvh_guest_ends(tmp_path: Path, end: str, status: int, check: str) -> None:
    """One vCPU; after the marker the guest reboots or panics: distinct exit statuses, and a
    crash reports the guest's last console lines."""
    r = boot(_need(PVH), tmp_path, vcpus=1, timeout=TIMEOUT, cmdline_extra=f"xenkvm.end={end}")
    _report(f"PVH, 1 vCPU, guest {end}", r)
    assert r.marker_line is not None, r.console[-3000:]
    assert r.returncode == status, f"exit status {r.returncode}, expected {status}\n{r.stderr[-2000:]}"
    assert check in r.stderr, r.stderr[-2000:]
