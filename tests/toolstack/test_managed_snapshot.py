"""``xenkvm snapshot/save/restore`` as a user runs them (subprocesses, the control API), with
guests/managed_domu under /dev/kvm: it prints "TICK n ns" (its Xen system time) every 20 ms,
echoes keystrokes ("KEY xx") and acts on control/shutdown through a xenstore watch.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from test_managed_domains import TICK, Console, built_guests, create, listing, xenkvm  # noqa: F401

pytestmark = pytest.mark.kvm


@pytest.fixture
def run_dir(built_guests):  # noqa: F811
    """A run directory of its own, directly under /tmp (UNIX socket paths are short)."""
    d = Path(tempfile.mkdtemp(prefix="xk-sn-", dir="/tmp"))
    yield d
    for name in ("managed-domu", "copy"):
        xenkvm(d, "destroy", name)
    shutil.rmtree(d, ignore_errors=True)


def _ticks(out: bytes) -> list[tuple[int, int]]:
    return [(int(n), int(ns)) for n, ns in TICK.findall(out)]


def _resumed(run_dir: Path, name: str, last: tuple[int, int]) -> Console:
    """The restored domain's console: ticks go on after ``last`` (never a boot), keys answer."""
    con = Console(run_dir, name)
    con.read_until(rb"^TICK \d+ \d+$")
    first = _ticks(con.out)[0]
    assert first[0] > last[0] and first[1] > last[1], (first, last)
    assert b"TOOLSTACK-UP" not in con.out                  # resumed, not booted
    con.client.sock.sendall(b"q")
    con.read_until(rb"^KEY 71$")
    return con


def test_snapshot_runs_on_and_restores_as_another_domain(run_dir, tmp_path):
    create(run_dir)
    con = Console(run_dir)
    con.read_until(rb"^TOOLSTACK-UP$")
    con.read_until(rb"^TICK \d+ \d+$")
    r = xenkvm(run_dir, "snapshot", "managed-domu", str(tmp_path / "domu.snap"))
    assert r.returncode == 0, r.stderr
    seen = len(con.out)
    con.read_until(rb"^TICK \d+ \d+$", start=seen)          # the original runs on
    last = _ticks(con.out[:seen])[-1]
    r = xenkvm(run_dir, "restore", str(tmp_path / "domu.snap"), "--name", "copy")
    assert r.returncode == 0, r.stderr
    rows = listing(run_dir)
    assert rows["copy"]["state"] == rows["managed-domu"]["state"] == "running"
    assert rows["copy"]["domid"] != rows["managed-domu"]["domid"]
    _resumed(run_dir, "copy", last).close()
    # the host's control/shutdown write reaches the restored guest's xenstore watch
    r = xenkvm(run_dir, "shutdown", "copy", "-w", "--timeout", "120")
    assert r.returncode == 0, r.stderr
    assert "copy" not in listing(run_dir) and listing(run_dir)["managed-domu"]["state"] == "running"


def test_save_stops_the_domain_and_restore_brings_it_back(run_dir, tmp_path):
    row = create(run_dir)
    con = Console(run_dir)
    con.read_until(rb"^TICK \d+ \d+$")
    r = xenkvm(run_dir, "save", "managed-domu", str(tmp_path / "domu.snap"))
    assert r.returncode == 0, r.stderr
    last = _ticks(con.out)[-1]
    assert listing(run_dir) == {}
    r = xenkvm(run_dir, "restore", str(tmp_path / "domu.snap"))
    assert r.returncode == 0, r.stderr
    again = listing(run_dir)["managed-domu"]
    assert (again["state"], again["domid"]) == ("running", row["domid"])
    _resumed(run_dir, "managed-domu", last).close()


def test_bad_requests_get_one_line(run_dir, tmp_path):
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot at all")
    r = xenkvm(run_dir, "restore", str(bad))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and str(bad) in r.stderr, r.stderr
    r = xenkvm(run_dir, "snapshot", "nobody", str(tmp_path / "x.snap"))
    assert r.returncode == 2 and "no domain called" in r.stderr
    create(run_dir)
    r = xenkvm(run_dir, "snapshot", "managed-domu", str(tmp_path / "missing" / "x.snap"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "invalid-argument" in r.stderr, r.stderr
    assert re.search(r"No such file", r.stderr)
    assert listing(run_dir)["managed-domu"]["state"] == "running"
