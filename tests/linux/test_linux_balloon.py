"""Debian's kernel balloons to memory/target: ``xenkvm mem-set`` down and up again, host RSS measured.

A PVH guest with 384 MiB and one vCPU boots to the marker (the usual xenstore
round trip), writes and frees ``FILL_MIB`` of page cache so most of its free RAM
is resident on the host, then prints its balloon driver's ``current_kb`` and
``target_kb`` on every change (``xenkvm.end=balloon``, xenkvm/images.py).  The
host lowers memory/target to 256 MiB with ``xenkvm mem-set``: the guest's
balloon driver (built into the cloud kernel) must reach its new target through
XENMEM_decrease_reservation, and the VMM's VmRSS must drop by at least half of
what was given back (the frames are released with MADV_DONTNEED).  Raising the
target to 384 MiB again must bring current_kb back (XENMEM_populate_physmap).
Then ``xenkvm shutdown`` powers the guest off; its dmesg must be clean (the
driver BUG()s if a decrease_reservation call does not do every extent).

The sizes are small because on PVM hosts the guest's fill runs through emulated ring 0
(minutes for a few hundred MiB); there the test is one of ``make test-linux``'s
(``linux_more``), and in the nested rig it is part of the ``hw`` selection.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.linux.test_linux_xen import PVH, TIMEOUT, _check, _need, _report
from tests.linux.xenboot import ROOT, boot
from xenkvm.images import BALLOON_LINE, DMESG_END

pytestmark = [pytest.mark.linux, pytest.mark.linux_more, pytest.mark.hw, pytest.mark.timeout(TIMEOUT + 1800)]
MEMORY_MIB, LOW_MIB, FILL_MIB = 384, 256, 192
PHASE_TIMEOUT = float(os.environ.get("XENKVM_BALLOON_TIMEOUT", "1200"))
LINE = re.compile(rf"^{re.escape(BALLOON_LINE)} current_kb=(\d+) target_kb=(\d+)", re.M)


@dataclass(frozen=True)
class State:
    current_kb: int
    target_kb: int
    wall_s: float


def vm_rss(pid: int) -> int:
    """Resident bytes of a process (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_state(console: Path, proc: subprocess.Popen, done, after: int = 0,
               timeout: float = PHASE_TIMEOUT) -> tuple[State, int]:
    """The first balloon line (from the ``after``-th on) for which ``done(current_kb, target_kb)``,
    and its index among the balloon lines."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        lines = LINE.findall(console.read_text(errors="replace"))
        for i in range(after, len(lines)):
            cur, tgt = int(lines[i][0]), int(lines[i][1])
            if done(cur, tgt):
                return State(cur, tgt, time.monotonic() - t0), i
        if proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"no balloon line satisfying the condition within {timeout:.0f} s; last lines: "
                         f"{LINE.findall(console.read_text(errors='replace'))[-3:]}")


def xenkvm(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"xenkvm {' '.join(args)}: exit {r.returncode}: {r.stderr}"


def test_pvh_balloon_follows_memory_target(tmp_path: Path) -> None:
    fig: dict[str, object] = {}

    def host(proc: subprocess.Popen, console: Path, sock: Path) -> None:
        start, i = wait_state(console, proc, lambda cur, tgt: cur == tgt)
        fig["start"], fig["rss_start"] = start, vm_rss(proc.pid)
        xenkvm("mem-set", "--socket", str(sock), f"{LOW_MIB}M")
        low, i = wait_state(console, proc, lambda cur, tgt: tgt < start.target_kb and cur == tgt, i)
        fig["low"], fig["rss_low"] = low, vm_rss(proc.pid)
        xenkvm("mem-set", "--socket", str(sock), f"{MEMORY_MIB}M")
        back, _ = wait_state(console, proc, lambda cur, tgt: tgt == start.target_kb and cur == tgt, i)
        fig["back"], fig["rss_back"] = back, vm_rss(proc.pid)
        xenkvm("shutdown", "--socket", str(sock), "poweroff")

    r = boot(_need(PVH), tmp_path, vcpus=1, timeout=TIMEOUT + 1500, memory=f"{MEMORY_MIB}M", host=host,
             cmdline_extra=f"xenkvm.end=balloon xenkvm.fill={FILL_MIB} xen_scrub_pages=0")
    _report(f"PVH, 1 vCPU, {MEMORY_MIB} MiB, balloon to {LOW_MIB} MiB and back", r)
    print("balloon lines:", LINE.findall(r.console)[:3], "...", LINE.findall(r.console)[-3:])
    start, low, back = fig.get("start"), fig.get("low"), fig.get("back")
    mib = lambda b: b / (1 << 20)  # noqa: E731
    if "rss_low" in fig:
        given = (start.current_kb - low.current_kb) << 10
        drop = fig["rss_start"] - fig["rss_low"]
        print(f"guest current_kb {start.current_kb} -> {low.current_kb} in {low.wall_s:.0f} s "
              f"({mib(given):.0f} MiB given back); VMM VmRSS {mib(fig['rss_start']):.0f} -> "
              f"{mib(fig['rss_low']):.0f} MiB (dropped {mib(drop):.0f} MiB)")
    if back is not None:
        print(f"back to current_kb {back.current_kb} in {back.wall_s:.0f} s; "
              f"VMM VmRSS then {mib(fig['rss_back']):.0f} MiB")
    _check(r)
    after = r.console[r.console.find(DMESG_END):]
    assert not re.search(r"\bBUG\b|Oops|WARNING", after), after[-3000:]
    assert start is not None and low is not None and back is not None, f"host step: {r.host_errors}"
    given = (start.current_kb - low.current_kb) << 10
    drop = fig["rss_start"] - fig["rss_low"]
    assert low.target_kb <= LOW_MIB * 1024 and low.current_kb == low.target_kb
    assert drop >= given // 2, f"VmRSS dropped {mib(drop):.0f} MiB for {mib(given):.0f} MiB given back"
    assert back.current_kb == start.current_kb
