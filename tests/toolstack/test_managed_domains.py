"""Managed domains driven as a user drives them: ``xenkvm create/list/console/pause/...`` as
subprocesses, the control socket over real UNIX sockets, guests/managed_domu under /dev/kvm.

guests/managed_domu prints "TICK n ns" with its Xen system time every 20 ms of that time,
"KEY xx" for each byte typed, and acts on control/shutdown.
"""
from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from xenkvm.toolstack.client import ControlClient
from xenkvm.toolstack.protocol import MAX_LINE, ApiError, ErrorCode
from guestbuild import build_guests

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
CFG = GUESTS / "managed_domu.cfg"
TIMEOUT = 300
TICK = re.compile(rb"^TICK (\d+) (\d+)\r?\n", re.M)      # whole lines only: output arrives in any chunks


@pytest.fixture(scope="module")
def built_guests() -> Path:
    build_guests()
    return GUESTS


def xenkvm(run_dir: Path, *args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                          errors="replace", timeout=timeout, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})


def listing(run_dir: Path) -> dict[str, dict]:
    r = xenkvm(run_dir, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def create(run_dir: Path, cfg: Path = CFG) -> dict:
    r = xenkvm(run_dir, "create", str(cfg))
    assert r.returncode == 0, r.stderr
    return listing(run_dir)["managed-domu"]


class Console:
    """An attached console over the control API: collects output, finds markers in it."""

    def __init__(self, run_dir: Path, name: str = "managed-domu"):
        self.client = ControlClient(str(run_dir / name / "control.sock"), timeout=TIMEOUT)
        self.out = bytearray(self.client.attach_console())

    def read_until(self, pattern: bytes, timeout: float = TIMEOUT, start: int = 0) -> re.Match:
        """The first match of ``pattern`` (multi-line) in whole lines of output from ``start`` on: a
        line still arriving (``TICK 2 5`` of ``TICK 2 51382018``) never matches a ``$``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while (m := regex.search(self.out, start, self.out.rfind(b"\n") + 1)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.out[-2000:].decode(errors='replace')}"
            self.client.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.client.sock.recv(65536)
            assert chunk, f"console closed before {pattern!r}"
            self.out += chunk
        return m

    def drain(self, quiet: float = 1.0) -> None:
        """Read until nothing arrives for ``quiet`` seconds."""
        self.client.sock.settimeout(quiet)
        try:
            while chunk := self.client.sock.recv(65536):
                self.out += chunk
        except TimeoutError:
            pass

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def running(built_guests):
    """One domain from the xl.cfg, shared by the tests that leave it running (its run directory
    directly under /tmp, which other users may traverse: test_other_users_refused)."""
    run_dir = Path(tempfile.mkdtemp(prefix="xk-ts-", dir="/tmp"))
    create(run_dir)
    yield run_dir
    xenkvm(run_dir, "destroy", "managed-domu")
    xenkvm(run_dir, "xenstored", "--shared", "--stop")
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _stop_shared_xenstored(tmp_path):
    """The tests that create in ``tmp_path / "run"``: stop the shared xenstored create started."""
    yield
    if (tmp_path / "run" / ".xenstored").exists():
        xenkvm(tmp_path / "run", "xenstored", "--shared", "--stop")


def control(run_dir: Path) -> ControlClient:
    return ControlClient(str(run_dir / "managed-domu" / "control.sock"), timeout=30)


def test_create_from_xl_cfg_and_list(running):
    row = listing(running)["managed-domu"]
    assert (row["domid"], row["memory"], row["vcpus"], row["state"]) == (1, 64 << 20, 1, "running")
    from xenkvm.xenstore.client import XsClient
    with XsClient(str(running / ".xenstored" / "socket"), timeout=10) as xs:
        assert xs.read("/local/domain/1/name") == b"managed-domu"
        assert xs.read("/local/domain/1/vm").decode().endswith(row["uuid"])
    r = xenkvm(running, "list")
    assert re.search(r"^managed-domu\s+1\s+64\s+1\s+running\s+\d+\.\d$", r.stdout, re.M), r.stdout
    folder = running / "managed-domu"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "control.sock").stat().st_mode & 0o777 == 0o600


def test_names_unique(running):
    r = xenkvm(running, "create", str(CFG))
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.splitlines()) == 1


def test_console_attach_keystroke_and_detach(running):
    ready = Console(running)
    ready.read_until(rb"^TOOLSTACK-UP$")             # the guest is ready for input
    ready.close()
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "console", "managed-domu"], cwd=ROOT,
                            stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "XENKVM_RUN_DIR": str(running)})
    os.close(slave)
    out = bytearray()
    try:
        _pty_until(master, out, b"TICK")             # attached: output flows
        assert termios.tcgetattr(master)[3] & termios.ECHO == 0     # raw mode while attached
        os.write(master, b"q")
        _pty_until(master, out, b"KEY 71")           # the guest saw the keystroke
        os.write(master, b"\x1d")                     # Ctrl-] detaches
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert termios.tcgetattr(master) == before       # the terminal is given back as it was
    os.close(master)
    assert listing(running)["managed-domu"]["state"] == "running"


def _pty_until(master: int, out: bytearray, marker: bytes, timeout: float = TIMEOUT) -> None:
    import select
    deadline = time.monotonic() + timeout
    start = len(out)
    while marker not in out[start:]:
        assert time.monotonic() < deadline, f"no {marker!r} on the console:\n{out[-1500:].decode(errors='replace')}"
        if select.select([master], [], [], 1.0)[0]:
            out += os.read(master, 65536)


def test_pause_stops_guest_time(running):
    """Guest-reported Xen time across a pause advances by about one tick, not by the pause."""
    con = Console(running)
    with control(running) as c:
        con.read_until(rb"^TICK \d+ \d+$")
        assert c.call("pause") == {"state": "paused", "all_parked": True}
        assert c.call("info")["state"] == "paused"
        paused_at = time.monotonic()
        time.sleep(6)
        con.drain()
        last = TICK.findall(con.out)[-1]
        before = len(con.out)
        paused_ms = (time.monotonic() - paused_at) * 1e3
        c.call("unpause")
        after = con.read_until(rb"^TICK (\d+) (\d+)$", start=before)
    con.close()
    gap_ms = (int(after.group(2)) - int(last[1])) / 1e6
    assert int(after.group(1)) == int(last[0]) + 1, "the guest printed ticks while paused"
    # Xen system time runs at the host's rate: had it not stopped, the gap would exceed paused_ms.
    # What it may advance by is one tick (20 ms) plus the vCPUs' way out and back in, which a
    # loaded host stretches (seen: 860 ms), so the bound is a fraction of the pause, not a figure.
    assert gap_ms < paused_ms / 4, f"guest time advanced {gap_ms:.0f} ms across a {paused_ms:.0f} ms pause"


def test_mem_set_through_the_api(running):
    from xenkvm.xenstore.client import XsClient
    r = xenkvm(running, "mem-set", "managed-domu", "32M")
    assert r.returncode == 0, r.stderr
    with XsClient(str(running / ".xenstored" / "socket"), timeout=10) as xs:
        assert xs.read("/local/domain/1/memory/target") == str(32 << 10).encode()
    r = xenkvm(running, "mem-set", "managed-domu", "1G")
    assert r.returncode == 1 and "static maximum" in r.stderr


def test_control_socket_survives_hostile_clients(running):
    path = str(running / "managed-domu" / "control.sock")
    hung = socket.socket(socket.AF_UNIX)
    hung.connect(path)
    hung.sendall(b'{"v":1,"id":1,"op":"inf')        # half a request, then silence
    with control(running) as c:
        for raw, code in ((b"garbage\n", "bad-request"), (b"[1,2]\n", "bad-request"),
                          (b'{"v":2,"id":3,"op":"info"}\n', "unsupported-version"),
                          (b'{"v":1,"id":4,"op":"fly"}\n', "unknown-op"),
                          (b'{"v":1,"id":5,"op":"shutdown","args":{"action":"explode"}}\n', "invalid-argument"),
                          (b'{"v":1,"id":6,"op":"mem-set","args":{"bytes":"1G"}}\n', "invalid-argument"),
                          (b'{"v":1,"id":7,"op":"save"}\n', "invalid-argument"),
                          (b"\xff\xfe\x00\x01\n", "bad-request"),
                          (b"[" * 60000 + b"\n", "bad-request")):
            c.send_raw(raw)
            resp = json.loads(c.read_line())
            assert resp["ok"] is False and resp["error"]["code"] == code, (raw[:40], resp)
        assert c.call("info")["state"] == "running"
    with control(running) as big:
        big.send_raw(b"x" * (MAX_LINE + 10))
        assert json.loads(big.read_line())["error"]["code"] == "too-large"
        with pytest.raises((ConnectionError, OSError)):
            big.read_line()                          # and the connection is closed
    with control(running) as c:
        assert c.call("info")["state"] == "running"   # the hung client blocks nobody
    hung.close()
    Console(running).read_until(rb"^TICK")          # and the guest still runs


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_users_refused(running):
    folder, sock = running / "managed-domu", running / "managed-domu" / "control.sock"
    os.chmod(running, 0o755)
    os.chmod(folder, 0o755)
    os.chmod(sock, 0o666)                             # only SO_PEERCRED is left to refuse
    try:
        code = ("import socket,os; os.setuid(65534); s=socket.socket(socket.AF_UNIX); "
                f"s.connect({str(sock)!r}); print(s.makefile().readline())")   # refused at once
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(sock, 0o600)
        os.chmod(folder, 0o700)
        os.chmod(running, 0o700)
    assert r.stdout.strip(), r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "permission-denied", r.stdout + r.stderr
    assert listing(running)["managed-domu"]["state"] == "running"


def test_reboot_restarts_then_shutdown_wait(built_guests, tmp_path):
    run_dir = tmp_path / "run"
    create(run_dir)
    con = Console(run_dir)
    con.read_until(rb"^TOOLSTACK-UP$")
    r = xenkvm(run_dir, "reboot", "managed-domu", "--wait")
    assert r.returncode == 0, r.stderr
    row = listing(run_dir)["managed-domu"]
    assert (row["state"], row["domid"]) == ("running", 1)
    with control(run_dir) as c:
        assert c.call("info")["generation"] == 2      # on_reboot = "restart": a second machine
    con.read_until(rb'shutdown request: "reboot"')
    con.close()
    con = Console(run_dir)                           # the restarted guest comes up again
    first = con.out.index(b"TOOLSTACK-UP")
    con.read_until(rb"^TOOLSTACK-UP$", start=first + 1)
    r = xenkvm(run_dir, "shutdown", "managed-domu", "--wait")
    assert r.returncode == 0, r.stderr
    con.read_until(rb'shutdown request: "poweroff"')
    con.close()
    assert listing(run_dir) == {}                     # on_poweroff = "destroy"
    assert sorted(run_dir.iterdir()) == [run_dir / ".lock", run_dir / ".xenstored"]   # the store stays


def test_destroy(built_guests, tmp_path):
    run_dir = tmp_path / "run"
    create(run_dir)
    r = xenkvm(run_dir, "destroy", "managed-domu")
    assert r.returncode == 0, r.stderr
    assert listing(run_dir) == {}
    assert not (run_dir / "managed-domu").exists()


def test_killed_vmm_is_crashed_and_cleaned(built_guests, tmp_path):
    run_dir = tmp_path / "run"
    pid = create(run_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert listing(run_dir)["managed-domu"]["state"] == "crashed"
    assert not (run_dir / "managed-domu").exists()    # socket, xenstore socket, record: gone
    assert listing(run_dir) == {}
    assert create(run_dir)["domid"] == 1               # name and domid are free again
    xenkvm(run_dir, "destroy", "managed-domu")


def test_on_crash_preserve_keeps_the_domain_listed(built_guests, tmp_path):
    """managed_domu.cfg says on_crash = "preserve": a guest crash leaves it listed as crashed."""
    from xenkvm.xenstore.client import XsClient
    run_dir = tmp_path / "run"
    create(run_dir)
    con = Console(run_dir)
    con.read_until(rb"^TOOLSTACK-UP$")
    with XsClient(str(run_dir / ".xenstored" / "socket"), timeout=10) as xs:
        xs.write("/local/domain/1/control/shutdown", "crash")      # the guest calls SCHEDOP_shutdown(crash)
    deadline = time.monotonic() + TIMEOUT
    while listing(run_dir)["managed-domu"]["state"] != "crashed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with control(run_dir) as c:
        with pytest.raises(ApiError) as e:
            c.call("pause")
        assert e.value.code is ErrorCode.NOT_RUNNING
    con.close()
    assert xenkvm(run_dir, "destroy", "managed-domu").returncode == 0
    assert listing(run_dir) == {}


def test_foreground_create_and_ctrl_bracket(built_guests, tmp_path):
    """``create -F``: the console on this terminal, listed while it runs, Ctrl-] ends it."""
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "create", "-F", str(CFG)], cwd=ROOT, stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})
    os.close(slave)
    out = bytearray()
    try:
        _pty_until(master, out, b"TOOLSTACK-UP")
        assert listing(run_dir)["managed-domu"]["state"] == "running"
        os.write(master, b"z")
        _pty_until(master, out, b"KEY 7a")
        os.write(master, b"\x1d")
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert listing(run_dir) == {}


def test_dmesg_shows_the_xen_console(running):
    Console(running).read_until(rb"^TOOLSTACK-UP$")
    r = xenkvm(running, "dmesg", "managed-domu")
    assert r.returncode == 0 and "managed_domu up" in r.stdout, r.stdout + r.stderr


def test_create_c_attaches_and_detach_leaves_it_running(built_guests, tmp_path):
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "create", "-c", str(CFG)], cwd=ROOT, stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})
    os.close(slave)
    out = bytearray()
    try:
        _pty_until(master, out, b"TOOLSTACK-UP")
        os.write(master, b"\x1d")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert listing(run_dir)["managed-domu"]["state"] == "running"
    assert xenkvm(run_dir, "destroy", "managed-domu").returncode == 0
