"""``xenkvm shutdown``: the host writes control/shutdown, the guest (guests/xen_shutdown.c) acts on it.

Also SCHEDOP_shutdown(crash): exit status 6 with the guest's last console lines on stderr.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guestbuild import build_guests

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
TIMEOUT = 120


@pytest.fixture(scope="module")
def built_guests() -> Path:
    build_guests()
    return GUESTS


@pytest.fixture
def sock(tmp_path) -> str:
    return str(tmp_path / "xenstored.sock")


def xenkvm(*args: str, env: dict | None = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                          errors="replace", timeout=timeout, env={**os.environ, **(env or {})})


class RunningGuest:
    """``xenkvm run`` in the background, its stdout collected; ``wait_for`` a marker line."""

    def __init__(self, yaml: str, cmdline: str, sock: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", f"guests/{yaml}", "--cmdline", cmdline],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", env={**os.environ, "XENSTORED_PATH": sock})
        self.out: list[str] = []
        self._seen: dict[str, threading.Event] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            for marker, ev in list(self._seen.items()):
                if line.startswith(marker):
                    ev.set()

    def wait_for(self, marker: str, timeout: float = TIMEOUT / 2) -> bool:
        ev = self._seen.setdefault(marker, threading.Event())
        if any(line.startswith(marker) for line in self.out):
            return True
        deadline = time.monotonic() + timeout
        while not ev.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return any(line.startswith(marker) for line in self.out)
        return True

    def finish(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._thread.join(5)
        return rc, "".join(self.out), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._thread.join(5)


@pytest.mark.parametrize("action,status", [("poweroff", 0), ("reboot", 3), ("halt", 0)])
def test_host_shutdown_request(built_guests, sock, action, status):
    g = RunningGuest("xen_shutdown.yaml", "xk.trap=page xk.host_shutdown", sock)
    try:
        assert g.wait_for("XS-SHUTDOWN-READY"), "guest never got ready:\n" + "".join(g.out)
        r = xenkvm("shutdown", "--socket", sock, action)
        assert r.returncode == 0, r.stderr
        rc, out, err = g.finish()
    finally:
        g.kill()
    assert f'shutdown request: "{action}"' in out, out
    assert "PASS control.acknowledged" in out and "FAIL" not in out, out
    assert rc == status, f"exit {rc}\n{out}\n{err}"


@pytest.mark.breakpoint
def test_shutdown_wait_returns_once_the_guest_is_gone(built_guests, sock):
    g = RunningGuest("xen_shutdown_direct.yaml", "xk.trap=direct xk.host_shutdown", sock)
    try:
        assert g.wait_for("XS-SHUTDOWN-READY"), "".join(g.out)
        r = xenkvm("shutdown", "--socket", sock, "--domid", "1", "--wait", "--timeout", "60", "poweroff")
        assert r.returncode == 0, r.stderr
        rc, out, _ = g.finish()
    finally:
        g.kill()
    assert rc == 0 and "SCHEDOP_shutdown(poweroff)" in out


def test_crash_exit_status_and_last_lines(built_guests, sock):
    r = xenkvm("run", "guests/xen_shutdown.yaml", "--cmdline", "xk.trap=page xk.crash",
               env={"XENSTORED_PATH": sock})
    assert r.returncode == 6, r.stdout + r.stderr
    assert "SCHEDOP_shutdown" in r.stderr and "crash" in r.stderr
    tail = r.stderr.split("last console lines:", 1)
    assert len(tail) == 2 and "XENKVM-LAST-WORDS" in tail[1], r.stderr


def test_no_socket_is_a_one_line_error(tmp_path):
    r = xenkvm("shutdown", "--socket", str(tmp_path / "nothing.sock"), "poweroff")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no xenstored at" in r.stderr, r.stderr


@pytest.fixture
def xenstored(sock, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "xenstored", "--socket", sock,
                             "--state", str(tmp_path / "state")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_no_such_domain(xenstored):
    r = xenkvm("shutdown", "--socket", xenstored, "--domid", "9", "reboot")
    assert r.returncode == 2
    assert r.stderr.strip() == f"xenkvm: shutdown: no domain 9 in the xenstore at {xenstored}"


def test_guest_that_does_not_react(xenstored):
    from xenkvm.xenstore.client import XsClient
    with XsClient(xenstored) as c:
        c.write("/local/domain/7/domid", "7")
    r = xenkvm("shutdown", "--socket", xenstored, "--domid", "7", "--timeout", "0.5", "poweroff")
    assert r.returncode == 1
    assert "dom7 did not react to 'poweroff' within 0.5 s" in r.stderr
    with XsClient(xenstored) as c:
        assert c.read("/local/domain/7/control/shutdown") == b"poweroff"
    r = xenkvm("shutdown", "--socket", xenstored, "--domid", "7", "--timeout", "0", "reboot")
    assert r.returncode == 0                     # --timeout 0: write and return, as plain `xl shutdown`
