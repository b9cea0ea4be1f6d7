"""``make run``'s own command, driven as a user would at a terminal.

``make run`` runs ``python -m xenkvm.quickstart guests/debian-pvh.cfg`` (after building what it
needs).  This test runs exactly that, from the repository root, under a pseudo-terminal:

1. the launcher prints how to detach, list and stop the domain and becomes
   ``xenkvm create -c --progress``: Debian's kernel as a Xen PVH guest, root on ``xvda`` (a copy
   of the pristine image it makes on first run), eth0 on the host bridge it creates as root;
2. the guest's shell comes up on the PV console; a command typed into it is answered;
3. the guest pings the host over the vif and the host pings the guest (root only);
4. Ctrl-] detaches: ``xenkvm list`` shows the domain running; ``xenkvm shutdown --wait``
   powers it off (``on_poweroff = destroy``: it is gone from the list).

Markers ``linux``, ``hw`` (the rig: ``flock /tmp/xenkvm-rig.lock .venv/bin/python -m xenkvm.rig
test tests/linux/test_make_run.py``) and ``linux_more`` (not among ``make test``'s PVM boots).
Outside the rig it refuses to touch a root disk the user already has (it skips).
With ``XENKVM_MAKERUN_TRANSCRIPT=FILE`` the console transcript is kept in FILE.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenkvm.quickstart import DEFAULT_GUEST, read_plan
from xenkvm.rootfs import ROOTFS_ERROR, SHELL_BANNER

ROOT = Path(__file__).resolve().parents[2]
#: Seconds for the boot to the shell: well under a minute in an idle rig; far more when busy.
TIMEOUT = float(os.environ.get("XENKVM_MAKERUN_TIMEOUT", "1200"))
pytestmark = [pytest.mark.linux, pytest.mark.linux_more, pytest.mark.hw, pytest.mark.timeout(TIMEOUT * 2)]

CACHE = ROOT / ".cache" / "linux"
#: The command line in the Makefile's run target (tests/unit/test_quickstart.py checks the Makefile).
MAKE_RUN = [sys.executable, "-m", "xenkvm.quickstart", "guests/debian-pvh.cfg"]
#: busybox ash's prompt; its line editing then asks the terminal where the cursor is (ESC [6n).
PROMPT = re.compile(rb"(^|\n)[^\n]*# (\x1b\[6n)?$")


class Terminal:
    """A child process on a pseudo-terminal; everything it wrote in ``out``."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.out = bytearray()

    def read_until(self, rx: re.Pattern[bytes], timeout: float, start: int = 0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while (m := rx.search(self.out, start)) is None:
            tail = self.out[-3000:].decode(errors="replace")
            assert ROOTFS_ERROR.encode() not in self.out, tail
            assert time.monotonic() < deadline, f"no {rx.pattern!r} within {timeout:g} s:\n{tail}"
            if select.select([self.master], [], [], 1.0)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:            # EIO: the child closed the terminal
                    assert False, f"the command ended before {rx.pattern!r}:\n{tail}"
        return m

    def type(self, text: bytes) -> int:
        """Send keystrokes; the offset of the output that follows them."""
        start = len(self.out)
        os.write(self.master, text)
        return start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def xenkvm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def listing(env: dict[str, str]) -> dict[str, dict]:
    r = xenkvm(env, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def _need(plan) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    for f in ("vmlinuz", "initramfs-disk.cpio.gz", "rootfs.ext4"):
        if not (CACHE / f).is_file():
            pytest.skip("no root file system image: run `make rootfs-image` first")
    if not os.environ.get("XENKVM_RIG") and plan.root_disk.exists():
        pytest.skip(f"{plan.root_disk} is the user's make run disk: not booting it from a test")


def test_make_run_boots_to_a_shell_detaches_lists_and_shuts_down(tmp_path: Path) -> None:
    plan = read_plan(DEFAULT_GUEST)
    _need(plan)
    env = {**os.environ, "XENKVM_RUN_DIR": str(tmp_path / "run"), "TERM": "xterm"}
    is_root = os.geteuid() == 0
    t0 = time.monotonic()
    term = Terminal(MAKE_RUN, env)
    try:
        times = _drive(term, env, is_root, t0)
    finally:
        term.close()
        xenkvm(env, "destroy", plan.name)
        xenkvm(env, "xenstored", "--shared", "--stop")      # create started it for this run directory
        if not os.environ.get("XENKVM_RIG"):
            plan.root_disk.unlink(missing_ok=True)
        if keep := os.environ.get("XENKVM_MAKERUN_TRANSCRIPT"):
            Path(keep).write_bytes(bytes(term.out))
    print(f"\nmake run, rig={bool(os.environ.get('XENKVM_RIG'))}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    assert plan.name not in listing(env), "the domain is still listed after shutdown --wait"


def _drive(term: Terminal, env: dict[str, str], is_root: bool, t0: float) -> dict[str, float]:
    times: dict[str, float] = {}
    for line in (rb"detach: Ctrl-\]", rb"list: +\S*xenkvm list", rb"attach: +\S*xenkvm console debian-pvh",
                 rb"stop: +\S*xenkvm shutdown debian-pvh"):
        term.read_until(re.compile(line), 120)
    if not is_root:
        term.read_until(re.compile(rb"no network: a vif's host tap needs root"), 5)
    term.read_until(re.compile(re.escape(SHELL_BANNER.encode())), TIMEOUT)
    times["shell"] = time.monotonic() - t0
    term.read_until(PROMPT, 120)
    start = term.type(b"echo $((6 * 7)) xk-answer; hostname\r")
    term.read_until(re.compile(rb"\n42 xk-answer\r*\nxenkvm-guest\r*\n"), 120, start)
    if is_root:
        assert b"XENKVM-NET-UP eth0 10.87.0.2/24, host 10.87.0.1" in term.out
        start = term.type(b"ping -c 2 -W 20 10.87.0.1 && echo xk-ping-ok\r")
        term.read_until(re.compile(rb"\nxk-ping-ok\r*\n"), 120, start)
        if shutil.which("ping"):
            ping = subprocess.run(["ping", "-c", "2", "-W", "20", "10.87.0.2"], capture_output=True, text=True,
                                  timeout=120)
            assert ping.returncode == 0, ping.stdout + ping.stderr
    times["commands"] = time.monotonic() - t0
    term.type(b"\x1d")                                   # Ctrl-]: detach
    assert term.proc.wait(30) == 0
    row = listing(env).get("debian-pvh")
    assert row is not None and row["state"] == "running", row
    r = xenkvm(env, "shutdown", "debian-pvh", "--wait", "--timeout", str(TIMEOUT))
    assert r.returncode == 0, r.stdout + r.stderr
    times["shutdown"] = time.monotonic() - t0
    return times

