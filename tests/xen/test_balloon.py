"""``xenkvm mem-set``: the host moves memory/target, the guest (guests/xen_balloon.c) balloons to it.

The guest touches a 32 MiB pool of its RAM, then follows memory/target with
XENMEM_decrease_reservation / populate_physmap as Linux's balloon driver does.
Giving frames back must shrink the VMM process's resident memory on the host
(VmRSS); taking them again must give zero pages.  Plus mem-set's refusals.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.xen.test_shutdown import RunningGuest, built_guests, sock, xenkvm  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kvm
MIB = 1 << 20


def vm_rss(pid: int) -> int:
    """The process's resident set in bytes (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_line(g: RunningGuest, text: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in g.out):
            return True
        if g.proc.poll() is not None:
            break
        time.sleep(0.1)
    return any(text in line for line in g.out)


def test_mem_set_balloons_the_guest_and_the_host_gets_memory_back(built_guests, sock):
    g = RunningGuest("xen_balloon.yaml", "xk.trap=page xk.host_balloon", sock)
    try:
        assert g.wait_for("XS-BALLOON-READY"), "guest never got ready:\n" + "".join(g.out)
        before = vm_rss(g.proc.pid)
        r = xenkvm("mem-set", "--socket", sock, "32M")
        assert r.returncode == 0, r.stderr
        assert wait_line(g, "balloon: current_kb=32768"), "".join(g.out)
        after = vm_rss(g.proc.pid)
        print(f"\nVMM VmRSS: {before / MIB:.1f} MiB before, {after / MIB:.1f} MiB after ballooning "
              f"32 MiB out ({(before - after) / MIB:.1f} MiB given back)")
        assert before - after >= 24 * MIB, (before, after)
        r = xenkvm("mem-set", "--socket", sock, "64M")
        assert r.returncode == 0, r.stderr
        rc, out, err = g.finish()
    finally:
        g.kill()
    assert "balloon: current_kb=65536" in out, out
    assert "PASS balloon.round_trip" in out and "PASS balloon.pool_consistent" in out, out
    assert "FAIL" not in out and rc == 0, f"exit {rc}\n{out}\n{err}"


def test_mem_set_refusals(built_guests, sock, tmp_path):
    r = xenkvm("mem-set", "--socket", str(tmp_path / "none.sock"), "32M")
    assert r.returncode == 2 and "no xenstored" in r.stderr, r.stderr
    r = xenkvm("mem-set", "--socket", sock, "lots")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    g = RunningGuest("xen_balloon.yaml", "xk.trap=page xk.host_balloon", sock)
    try:
        assert g.wait_for("XS-BALLOON-READY"), "".join(g.out)
        r = xenkvm("mem-set", "--socket", sock, "128M")            # above static-max (64 MiB)
        assert r.returncode == 2 and "static maximum of 64 MiB" in r.stderr, r.stderr
        r = xenkvm("mem-set", "--socket", sock, "--domid", "7", "32M")
        assert r.returncode == 2 and "no domain 7" in r.stderr, r.stderr
        r = xenkvm("mem-set", "--socket", sock, "6K")               # not whole pages
        assert r.returncode == 2 and "4 KiB pages" in r.stderr, r.stderr
        assert not any(re.match(r"balloon: current_kb", line) for line in g.out)
    finally:
        g.kill()
