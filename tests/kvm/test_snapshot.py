"""Snapshots of a real guest: taken mid-run at the guest's request, restored again and again.

guests/snapshot.c fills RAM, keeps values in registers and an MSR, runs a periodic LAPIC
timer, asks for a snapshot (port 0xee, ``--snapshot-on-port``) and checks all of it after;
a restored run resumes right after the request and must pass the same checks.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenkvm.build import restore_machine
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.machine import ExitStatus
from xenkvm.machine.snapshot.format import SnapshotError
from guestbuild import build_guests

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]
BEFORE = "before snapshot"
PASSED = "SUMMARY: 5 passed, 0 failed"


def xenkvm(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    build_guests()
    path = tmp_path_factory.mktemp("snap") / "guest.snap"
    r = xenkvm("run", "guests/snapshot.yaml", "--snapshot-on-port", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert BEFORE in r.stdout and PASSED in r.stdout, r.stdout
    assert path.exists() and Path(str(path) + ".ram").exists()
    return path


def _resumed(r: subprocess.CompletedProcess, passed: str = PASSED) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("after snapshot"), r.stdout    # resumed, not booted
    assert BEFORE not in r.stdout and passed in r.stdout, r.stdout


@pytest.mark.tsc_restore
def test_two_vcpus_parked_and_restored(tmp_path):
    """Both vCPUs parked at once (the AP mid-loop), both resumed: the AP counts on and finishes."""
    path = tmp_path / "smp.snap"
    passed = "SUMMARY: 7 passed, 0 failed"
    r = xenkvm("run", "guests/snapshot_smp.yaml", "--snapshot-on-port", str(path))
    assert r.returncode == 0 and passed in r.stdout, r.stdout + r.stderr
    _resumed(xenkvm("run", "--restore", str(path)), passed)


@pytest.mark.tsc_restore
def test_restored_three_times_in_a_row(snapshot):
    for _ in range(3):
        _resumed(xenkvm("run", "--restore", str(snapshot)))


@pytest.mark.tsc_restore
def test_restored_prefaulted(snapshot):
    _resumed(xenkvm("run", "--restore", str(snapshot), "--prefault"))


@pytest.mark.tsc_restore
def test_restored_twice_in_parallel(snapshot):
    procs = [subprocess.Popen([sys.executable, "-m", "xenkvm", "run", "--restore", str(snapshot)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        _resumed(subprocess.CompletedProcess(p.args, p.returncode, out, err))


@pytest.mark.tsc_restore
def test_restore_in_process_keeps_the_snapshot_unchanged(snapshot):
    before = Path(str(snapshot) + ".ram").read_bytes()
    sink = ConsoleSink(None)
    m = restore_machine(str(snapshot), sink=sink)
    try:
        result = m.run()
    finally:
        m.close()
    assert result.status is ExitStatus.POWEROFF
    assert PASSED.encode() in sink.tail()
    assert Path(str(snapshot) + ".ram").read_bytes() == before   # the guest's writes were private


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "foreign", "ram-truncated", "ram-missing"])
def test_damaged_snapshot_refused_with_one_line(snapshot, tmp_path, damage):
    bad = tmp_path / "bad.snap"
    data = snapshot.read_bytes()
    ram = Path(str(snapshot) + ".ram").read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 2], "corrupted": data[:-20] + b"X" + data[-19:],
                     "foreign": b"\x7fELF" + data[4:]}.get(damage, data))
    if damage != "ram-missing":
        Path(str(bad) + ".ram").write_bytes(ram[:4096 * 3] if damage == "ram-truncated" else ram)
    r = xenkvm("run", "--restore", str(bad), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xenkvm: ") and str(bad) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(SnapshotError):
        restore_machine(str(bad), sink=ConsoleSink(None))
