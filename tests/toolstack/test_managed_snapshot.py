"""``xenkvm snapshot/save/restore`` as a user runs them (subprocesses, the control API), with
guests/managed_domu under /dev/kvm: it prints "TICK n ns" (its Xen system time) every 20 ms,
echoes keystrokes ("KEY xx") and acts on control/shutdown through a xenstore watch.
guests/managed_suspend announces control/feature-suspend, so ``save`` is cooperative for it: it
suspends itself (SHUTDOWN_suspend) and, restored as a new domain, sets its Xen state up again.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_managed_domains import GUESTS, TICK, Console, built_guests, create, listing, xenkvm  # noqa: F401

from xenkvm.toolstack.client import ControlClient
from xenkvm.toolstack.protocol import ApiError, ErrorCode
from xenkvm.xenstore.client import XsClient

pytestmark = pytest.mark.kvm


@pytest.fixture
def run_dir(built_guests):  # noqa: F811
    """A run directory of its own, directly under /tmp (UNIX socket paths are short)."""
    d = Path(tempfile.mkdtemp(prefix="xk-sn-", dir="/tmp"))
    yield d
    for name in ("managed-domu", "copy", "copy2", "managed-suspend", "managed-blk", VCPUDOWN):
        xenkvm(d, "destroy", name)
    xenkvm(d, "xenstored", "--shared", "--stop")      # create started it (managed domains share it)
    shutil.rmtree(d, ignore_errors=True)


def _xs(run_dir: Path) -> XsClient:
    """A dom0 connection to the shared xenstored that ``create`` put the domains on."""
    return XsClient(str(run_dir / ".xenstored" / "socket"), timeout=10)


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


VCPUDOWN = "managed-vcpudown"


def test_a_downed_vcpu_pauses_snapshots_and_restores_down(run_dir, tmp_path):
    """guests/managed_vcpudown.yaml takes vCPU 1 down (VCPUOP_down) and keeps it down, as CPU
    hot-unplug does: the domain still pauses with every vCPU parked, snapshots and saves; what
    is restored from either has vCPU 1 still down (not counting, VCPUOP_is_up 0) until the
    guest's VCPUOP_up, after which it runs again."""
    r = xenkvm(run_dir, "create", str(GUESTS / "managed_vcpudown.yaml"))
    assert r.returncode == 0, r.stderr
    con = Console(run_dir, VCPUDOWN)
    down = con.read_until(rb"^VCPU1 DOWN (\d+)\r?\n").group(1)
    con.read_until(rb"^TICK \d+ \d+$")
    with ControlClient(str(run_dir / VCPUDOWN / "control.sock"), timeout=60) as c:
        assert c.call("pause") == {"state": "paused", "all_parked": True}
        c.call("unpause")
    con.read_until(rb"^TICK \d+ \d+$", start=len(con.out))           # and it runs on
    r = xenkvm(run_dir, "snapshot", VCPUDOWN, str(tmp_path / "down.snap"))
    assert r.returncode == 0, r.stderr
    r = xenkvm(run_dir, "restore", str(tmp_path / "down.snap"), "--name", "copy")
    assert r.returncode == 0, r.stderr
    _up_in_restored(run_dir, "copy", down)
    r = xenkvm(run_dir, "save", VCPUDOWN, str(tmp_path / "saved.snap"))
    assert r.returncode == 0, r.stderr
    con.close()
    r = xenkvm(run_dir, "restore", str(tmp_path / "saved.snap"))
    assert r.returncode == 0, r.stderr
    _up_in_restored(run_dir, VCPUDOWN, down)


def _up_in_restored(run_dir: Path, name: str, down: bytes) -> None:
    """In a restored managed_vcpudown, vCPU 1 is still down at ``down`` and VCPUOP_up runs it."""
    con = Console(run_dir, name)
    con.read_until(rb"^TICK \d+ \d+$")
    assert b"VCPU1" not in con.out                                      # resumed, not booted
    con.client.sock.sendall(b"u")
    up = con.read_until(rb"^VCPU1 UP was_up=(-?\d+) count=(\d+)/(\d+) rc=(-?\d+)\r?\n")
    assert up.groups() == (b"0", down, down, b"0"), up.group(0)       # it was down, had not run
    con.read_until(rb"^VCPU1 (RUNNING|STILL-STOPPED)$")
    assert b"VCPU1 RUNNING" in con.out, con.out[-500:]
    con.close()


BLK_TICK = re.compile(rb"^BLK-TICK (\d+) (ok|BAD)\r?\n", re.M)


def _blk_domain(tmp_path: Path) -> tuple[Path, Path]:
    """A 4 MiB zeroed disk and the managed domain ``managed-blk`` (guests/xen_blkfront.c
    ``xk.blk_managed``, which writes and reads it back forever) on it: (disk, config)."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4 << 20))
    cfg = tmp_path / "blk.yaml"
    cfg.write_text(f"name: managed-blk\nkernel: {GUESTS / 'out' / 'xen_blkfront.elf'}\n"
                   "cmdline: \"xk.trap=page xk.blk_managed\"\nmemory: 64M\nvcpus: 1\n"
                   f"xen:\n  hypercall_trap: auto\ndisks:\n  - \"vdev=xvda, access=rw, target={disk}\"\n")
    return disk, cfg


def test_save_and_restore_a_domain_with_a_disk(run_dir, tmp_path):
    """guests/xen_blkfront.c ``xk.blk_managed`` writes and reads back its disk forever: ``save``
    stops it before it runs on (its disk stays as saved), ``restore`` re-attaches the vbd to the
    ring in the restored RAM without a handshake, and the guest's I/O goes on ("BLK-TICK n ok",
    numbering continued); a disk changed meanwhile is refused with one line."""
    disk, cfg = _blk_domain(tmp_path)
    r = xenkvm(run_dir, "create", str(cfg))
    assert r.returncode == 0, r.stderr
    con = Console(run_dir, "managed-blk")
    con.read_until(rb"^BLK-TICK 3 ok$")
    snap = tmp_path / "blk.snap"
    r = xenkvm(run_dir, "save", "managed-blk", str(snap))
    assert r.returncode == 0, r.stderr
    con.close()
    last = max(int(n) for n, _ok in BLK_TICK.findall(con.out))
    assert listing(run_dir) == {}
    saved = disk.read_bytes()
    r = xenkvm(run_dir, "restore", str(snap))
    assert r.returncode == 0, r.stderr
    assert listing(run_dir)["managed-blk"]["state"] == "running"
    con = Console(run_dir, "managed-blk")
    con.read_until(rb"^BLK-TICK %d ok$" % (last + 5))
    ticks = BLK_TICK.findall(con.out)
    assert all(ok == b"ok" for _n, ok in ticks) and b"BLK-UP" not in con.out, con.out[-2000:]
    assert int(ticks[0][0]) > last                          # went on where it was saved (not from 0)
    con.close()
    assert xenkvm(run_dir, "destroy", "managed-blk").returncode == 0
    assert disk.read_bytes() != saved                         # the restored domain wrote the disk
    r = xenkvm(run_dir, "restore", str(snap))                 # ... so the snapshot no longer fits it
    assert r.returncode != 0 and "changed since the snapshot" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr          # the VMM's one line, under the toolstack's
    assert "managed-blk" not in listing(run_dir)


def test_restore_disk_copy_gives_each_copy_its_own_disk(run_dir, tmp_path):
    """``restore FILE --name N --disk-copy DIR`` (as ``run --restore``'s): each restored copy of a
    saved domain runs on its own copy of the disk, ``DIR/<vdev>-<name>``, and writes it; the saved
    disk stays as saved, so the snapshot fits it for the next copy.  A used DIR (its copy exists)
    and a DIR that is not a directory are refused with one line, and no domain is left."""
    disk, cfg = _blk_domain(tmp_path)
    assert (r := xenkvm(run_dir, "create", str(cfg))).returncode == 0, r.stderr
    con = Console(run_dir, "managed-blk")
    con.read_until(rb"^BLK-TICK 3 ok$")
    snap = tmp_path / "blk.snap"
    assert (r := xenkvm(run_dir, "save", "managed-blk", str(snap))).returncode == 0, r.stderr
    con.close()
    last = max(int(n) for n, _ok in BLK_TICK.findall(con.out))
    saved = disk.read_bytes()
    for name in ("copy", "copy2"):
        d = tmp_path / name
        d.mkdir()
        r = xenkvm(run_dir, "restore", str(snap), "--name", name, "--disk-copy", str(d))
        assert r.returncode == 0, r.stderr
        con = Console(run_dir, name)
        con.read_until(rb"^BLK-TICK %d ok$" % (last + 3))
        assert all(ok == b"ok" for _n, ok in BLK_TICK.findall(con.out)), con.out[-2000:]
        con.close()
        with ControlClient(str(run_dir / name / "control.sock"), timeout=30) as c:
            rows = c.call("block-list")["devices"]
        copy = d / "xvda-d.img"
        assert [row["target"] for row in rows] == [str(copy)]
        assert xenkvm(run_dir, "destroy", name).returncode == 0
        assert copy.read_bytes() != saved                     # the copy was written ...
        assert disk.read_bytes() == saved                     # ... not the saved disk
    for bad, why in ((tmp_path / "copy", "exists"), (tmp_path / "nowhere", "not a directory")):
        r = xenkvm(run_dir, "restore", str(snap), "--name", "copy", "--disk-copy", str(bad))
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and why in r.stderr, r.stderr
        assert "copy" not in listing(run_dir)


def test_a_restart_after_a_disk_copy_restore_boots_on_the_copy(monkeypatch, tmp_path):
    """The config a restored domain's restart boots names the disk the restore ran on (the
    ``--disk-copy`` copy), not the saved one: a reboot must not write the disk the snapshot fits."""
    from types import SimpleNamespace
    import threading
    from xenkvm.config import load_config
    from xenkvm.toolstack import vmm
    cfg = tmp_path / "two.yaml"
    cfg.write_text(f"name: two\nkernel: {GUESTS / 'out' / 'xen_blkfront.elf'}\nxen: {{}}\ndisks:\n"
                   f"  - \"vdev=xvda, access=rw, target={tmp_path / 'a.img'}\"\n"
                   f"  - \"vdev=xvdb, access=ro, target={tmp_path / 'b.img'}\"\n")
    for f in ("a.img", "b.img"):
        (tmp_path / f).write_bytes(bytes(1 << 20))
    proc = object.__new__(vmm.DomainProcess)
    proc.cfg, proc._lock = load_config(str(cfg)), threading.Lock()
    copy = tmp_path / "c" / "xvda-a.img"
    monkeypatch.setattr(vmm, "xen_domain", lambda m: SimpleNamespace(
        devices=SimpleNamespace(restored_disks={"xvda": copy, "xvdb": tmp_path / "b.img"})))
    proc._use_restored_disks(None)
    assert [(d.vdev, d.target, d.readonly) for d in proc.cfg.disks] == \
        [("xvda", copy, False), ("xvdb", tmp_path / "b.img", True)]


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
    with ControlClient(str(run_dir / "managed-domu" / "control.sock"), timeout=30) as c:
        for args in ({"file": "relative.snap"}, {"file": 7}, {"file": str(tmp_path / "x"), "suspend_timeout": "1"},
                     {"file": str(tmp_path / "x"), "suspend_timeout": 0}):
            with pytest.raises(ApiError) as e:
                c.call("save", **args)
            assert e.value.code is ErrorCode.INVALID_ARGUMENT, args
    assert not (tmp_path / "x").exists()
    assert listing(run_dir)["managed-domu"]["state"] == "running"


SUSPEND = "managed-suspend"
#: the checks after SHUTDOWN_suspend returns, either way
AFTER_SUSPEND = ("PASS suspend.result", "PASS pvclock", "PASS timer", "PASS evtchn.loopback",
                 "PASS xs.watch_fires", "PASS events.no_stray")


def _finishes_after_ping(run_dir: Path, con: Console, domid: int, start: int = 0) -> str:
    """The host's write of data/ping reaches the guest's watch; its checks all pass."""
    con.read_until(rb"^WAITING-PING$", start=start)
    with _xs(run_dir) as xs:
        xs.write(f"/local/domain/{domid}/data/ping", "1")
    con.read_until(rb"^SUMMARY: \d+ passed, \d+ failed$", start=start)
    out = con.out[start:].decode(errors="replace")
    assert all(a in out for a in AFTER_SUSPEND) and ", 0 failed" in out and "FAIL" not in out, out
    return out


@pytest.mark.parametrize("cfg", ["managed_suspend.yaml", "managed_suspend_fifo.yaml"])
def test_save_is_cooperative_and_the_restored_guest_reconnects(run_dir, tmp_path, cfg):
    """SHUTDOWN_suspend returns 0 in the restored domain, which is new: the guest maps shared
    info, vcpu_info, event channels, the grant frame and its watches again, and all of it works."""
    row = _create(run_dir, GUESTS / cfg)
    con = Console(run_dir, SUSPEND)
    con.read_until(rb"^SUSPEND-READY$")
    r = xenkvm(run_dir, "save", SUSPEND, str(tmp_path / "s.snap"))
    assert r.returncode == 0, r.stderr
    assert SUSPEND not in listing(run_dir)
    assert b"SUSPEND returned" not in con.out        # saved before it could run on
    r = xenkvm(run_dir, "restore", str(tmp_path / "s.snap"))
    assert r.returncode == 0, r.stderr
    again = Console(run_dir, SUSPEND)
    again.read_until(rb"^SUSPEND returned 0$")
    out = _finishes_after_ping(run_dir, again, row["domid"])
    assert "PASS resume.reconnect" in out and "PASS resume.new_grant_table" in out
    assert ("PASS fifo" in out) == cfg.endswith("fifo.yaml")


def test_a_failed_save_cancels_the_suspend_and_the_guest_runs_on(run_dir, tmp_path):
    """The save cannot write its file: SHUTDOWN_suspend returns 1 (cancelled), nothing was torn
    down, and the domain keeps running."""
    row = _create(run_dir, GUESTS / "managed_suspend.yaml")
    con = Console(run_dir, SUSPEND)
    con.read_until(rb"^SUSPEND-READY$")
    r = xenkvm(run_dir, "save", SUSPEND, str(tmp_path / "missing" / "s.snap"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "suspend cancelled" in r.stderr, r.stderr
    con.read_until(rb"^SUSPEND returned 1$")
    out = _finishes_after_ping(run_dir, con, row["domid"])
    assert "PASS cancel.grant_kept" in out


def _create(run_dir: Path, cfg: Path) -> dict:
    r = xenkvm(run_dir, "create", str(cfg))
    assert r.returncode == 0, r.stderr
    return listing(run_dir)[SUSPEND]


def test_a_suspend_nobody_saves_is_cancelled(built_guests):  # noqa: F811
    """Under ``xenkvm run`` no save is ever asked for: the guest's SHUTDOWN_suspend returns 1 at
    once and it runs on with everything in place."""
    d = Path(tempfile.mkdtemp(prefix="xk-sr-", dir="/tmp"))
    sock = d / "xs.sock"
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", "guests/managed_suspend.yaml",
                             "--xenstore-socket", str(sock)], cwd=GUESTS.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = _read_until(proc, b"SUSPEND-READY\n", b"")
        with XsClient(str(sock), timeout=10) as xs:
            xs.write("/local/domain/1/control/shutdown", "suspend")
            out = _read_until(proc, b"WAITING-PING\n", out)
            xs.write("/local/domain/1/data/ping", "1")
        text = _read_until(proc, b"SUMMARY", out).decode(errors="replace")
        assert proc.wait(120) == 0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)
    assert "SUSPEND returned 1" in text and "PASS cancel.grant_kept" in text, text
    assert all(a in text for a in AFTER_SUSPEND) and "FAIL" not in text, text


def _read_until(proc: subprocess.Popen, marker: bytes, out: bytes, timeout: float = 240) -> bytes:
    deadline = time.monotonic() + timeout
    while marker not in out:
        assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
    return out


def test_a_guest_that_announces_suspend_but_never_suspends_is_not_saved(run_dir, tmp_path):
    """managed_domu ignores control/shutdown = suspend; with feature-suspend written for it the save
    waits --timeout seconds, answers one line, writes nothing, and the domain runs on."""
    row = create(run_dir)
    with _xs(run_dir) as xs:
        xs.write(f"/local/domain/{row['domid']}/control/feature-suspend", "1")
    r = xenkvm(run_dir, "save", "managed-domu", str(tmp_path / "s.snap"), "--timeout", "2")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "did not suspend" in r.stderr, r.stderr
    assert not (tmp_path / "s.snap").exists()
    con = Console(run_dir)
    con.read_until(rb'^ignoring unknown request "suspend"$')
    seen = len(con.out)
    con.read_until(rb"^TICK \d+ \d+$", start=seen)
    assert listing(run_dir)["managed-domu"]["state"] == "running"


def test_two_copies_of_a_shared_store_snapshot_each_get_their_own_domain(run_dir, tmp_path):
    """A snapshot of a domain on the shared xenstored, its control/shutdown watch registered,
    restored twice at once under other names: each copy gets its own domid, its saved subtree
    moved there (its own nodes, perms and identity), and its watch fires on a host write to its
    own home only; the original runs on, its store untouched."""
    row = create(run_dir)
    con = Console(run_dir)
    con.read_until(rb"^TOOLSTACK-UP$")
    orig = f"/local/domain/{row['domid']}"
    with _xs(run_dir) as xs:
        xs.write(f"{orig}/data/mark", "before")
    r = xenkvm(run_dir, "snapshot", "managed-domu", str(tmp_path / "domu.snap"))
    assert r.returncode == 0, r.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "xenkvm", "restore", str(tmp_path / "domu.snap"),
                               "--name", name], cwd=GUESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)}) for name in ("copy", "copy2")]
    for p in procs:
        assert p.wait(240) == 0, p.stderr.read()
    rows = listing(run_dir)
    domids = {rows[n]["domid"] for n in ("managed-domu", "copy", "copy2")}
    assert len(domids) == 3 and all(rows[n]["state"] == "running" for n in rows)
    with _xs(run_dir) as xs:
        xs.write(f"{orig}/data/mark", "after")
        for name in ("copy", "copy2"):
            home = f"/local/domain/{rows[name]['domid']}"
            assert xs.read(f"{home}/name") == name.encode()
            assert xs.read(f"{home}/domid") == str(rows[name]["domid"]).encode()
            assert xs.read(f"{home}/data/mark") == b"before"                # its own, as saved
            assert xs.get_perms(f"{home}/control/shutdown")[0] == f"n{rows[name]['domid']}"   # the copy owns it
            xs.write(f"{home}/control/shutdown", f"hello-{name}")
    for name in ("copy", "copy2"):
        copy = Console(run_dir, name)
        copy.read_until(rf'^ignoring unknown request "hello-{name}"$'.encode())
        other = "copy2" if name == "copy" else "copy"
        assert f'"hello-{other}"'.encode() not in copy.out
        copy.close()
    seen = len(con.out)
    con.read_until(rb"^TICK \d+ \d+$", start=seen)                          # the original runs on
    assert b"hello-" not in con.out
    with _xs(run_dir) as xs:
        assert xs.read(f"{orig}/control/shutdown") == b"" and xs.read(f"{orig}/data/mark") == b"after"
