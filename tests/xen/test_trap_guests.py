"""Raw guests that make real hypercalls through each trap available on this host."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import guestgen

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]
VERSION_417 = bytes([17, 4])  # minor, major as the guest prints them


def run(tmp_path, code: bytes, *flags: str, verbose: bool = False) -> subprocess.CompletedProcess:
    k = tmp_path / "g.elf"
    k.write_bytes(guestgen.pvh_elf(code))
    pre = ["-v"] if verbose else []
    return subprocess.run([sys.executable, "-m", "xenkvm", *pre, "run", "--kernel", str(k), "--memory", "32M", *flags],
                          capture_output=True, timeout=120, cwd=ROOT)


def test_hypercall_page_trap(tmp_path):
    r = run(tmp_path, guestgen.xen_version_via_page_program(3), "--xen")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == VERSION_417


@pytest.mark.breakpoint
def test_breakpoint_trap(tmp_path):
    r = run(tmp_path, guestgen.xen_version_via_vmcall_program(3), "--hypercall-trap", "breakpoint")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == VERSION_417


def test_patch_trap(tmp_path):
    r = run(tmp_path, guestgen.xen_version_via_vmcall_program(3), "--hypercall-trap", "patch", verbose=True)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == VERSION_417
    assert b"patch trap on xen_hypercall_intel" in r.stderr


def test_auto_patches_direct_vmcall(tmp_path):
    r = run(tmp_path, guestgen.xen_version_via_vmcall_program(2), "--xen", verbose=True)
    assert r.returncode == 0 and r.stdout == VERSION_417
    assert b"hypercall traps: hypercall-page, patch" in r.stderr


def test_patch_trap_refuses_a_symbol_on_other_bytes(tmp_path):
    """xen_hypercall_intel names `nop; nop; nop; vmcall`: the patch trap will not write over
    the nops, and the guest never starts (one line, exit 2)."""
    src = tmp_path / "g.S"
    src.write_text(".globl xen_hypercall_intel\n.globl _start\n.text\n_start: hlt\n"
                   "xen_hypercall_intel: nop; nop; nop; vmcall; ret\n"
                   # XEN_ELFNOTE_PHYS32_ENTRY (18) = _start, so it boots as PVH
                   ".section .note.Xen, \"a\", @note\n.p2align 2\n.long 4, 4, 18\n.asciz \"Xen\"\n.long _start\n")
    k = tmp_path / "g.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x200000", "-o", str(k), str(src)],
                   check=True)
    r = subprocess.run([sys.executable, "-m", "xenkvm", "run", "--kernel", str(k), "--boot", "pvh",
                        "--memory", "32M", "--hypercall-trap", "patch"], capture_output=True, timeout=120, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "90 90 90, not vmcall/vmmcall" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_page_trap_refuses_a_guest_that_would_hang(tmp_path):
    r = run(tmp_path, guestgen.xen_version_via_vmcall_program(1), "--hypercall-trap", "hypercall-page")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "vmcall" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_kvm_xen_refused_where_absent(tmp_path):
    from xenkvm.kvm.system import Kvm
    from xenkvm.machine.host import Host
    with Kvm() as kvm:
        if "kvm-xen" in Host.probe(kvm).hypercall_traps():
            pytest.skip("this host has KVM_XEN")
    r = run(tmp_path, guestgen.xen_version_via_page_program(1), "--hypercall-trap", "kvm-xen")
    assert r.returncode == 2 and b"not available" in r.stderr
