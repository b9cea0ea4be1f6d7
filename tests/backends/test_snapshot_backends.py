"""Snapshots of Xen domains with PV backends (backends/snapshot.py), under /dev/kvm.

The blkfront guest (guests/xen_blkfront.c, ``xk.blk_snapshot``) pushes a write and a read and
asks for the snapshot before their responses come; the snapshotting run stops once the files
are written (``--stop-after-snapshot``: its disk must stay as saved).  Each restore runs on its
own copy of the disk (``--disk-copy``): three in a row and two in parallel must all collect the
in-flight responses, write more and read every range back; the host then checks each copy byte
for byte and that the saved disk did not change.  A changed disk and a damaged backend section
are refused with one line.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

from xenkvm.machine.snapshot.format import read_state, write_state
from guestbuild import build_guests

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
SUMMARY = re.compile(r"^SUMMARY: (\d+) passed, (\d+) failed$", re.M)
SECTORS = 8192
AFTER = ("PASS snap.inflight_answered", "PASS snap.inflight_read_data", "PASS snap.write_after",
         "PASS snap.batch_after")


def pattern(sector: int, count: int, seed: int) -> bytes:
    """What the guest writes (guests/xen_blkfront.c): byte i of sector s is s*31 + i*7 + seed."""
    return b"".join(bytes((s * 31 + i * 7 + seed) % 256 for i in range(512)) for s in range(sector, sector + count))


def sectors(path: Path, first: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(first * 512)
        return f.read(count * 512)


def _cmd(*args: str, sock: Path, verbose: bool = False) -> list[str]:
    return [sys.executable, "-m", "xenkvm", *(["-v"] if verbose else []), "run", *args,
            "--xenstore-socket", str(sock)]


def _run(*args: str, sock: Path, verbose: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args, sock=sock, verbose=verbose), capture_output=True, text=True,
                          errors="replace", timeout=300, cwd=ROOT)


def _resumed(out: str, err: str, rc: int) -> None:
    context = f"\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-3000:]}"
    assert rc == 0, f"exit {rc}" + context
    assert out.startswith("after snapshot") and "before snapshot" not in out, context
    assert all(a in out for a in AFTER) and "FAIL" not in out, context
    m = SUMMARY.search(out)
    assert m and int(m.group(2)) == 0, context


def _check_copy(copy: Path) -> None:
    """What the original wrote before the snapshot, the in-flight write, and the restore's own."""
    assert sectors(copy, 1024, 16) == pattern(1024, 16, 5)
    assert sectors(copy, 2048, 8) == pattern(2048, 8, 6)
    assert sectors(copy, 3072, 8) == pattern(3072, 8, 7)
    assert sectors(copy, 4000, 8) == pattern(4000, 8, 8)


def _snapshot(tmp: Path, fmt: str = "raw", trap: str = "page") -> tuple[Path, Path]:
    build_guests()
    disk = tmp / f"a.{'img' if fmt == 'raw' else fmt}"
    if fmt == "raw":
        disk.write_bytes(bytes(SECTORS * 512))
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk), str(SECTORS * 512)], check=True)
    y = tmp / "guest.yaml"
    y.write_text(f"name: blk-snap\nkernel: {GUESTS / 'out' / 'xen_blkfront.elf'}\n"
                 f"cmdline: \"xk.trap={trap} xk.blk_snapshot\"\nmemory: 64M\nvcpus: 1\n"
                 f"xen:\n  domid: 1\n  hypercall_trap: auto\ndisks:\n"
                 f"  - \"format={fmt}, vdev=xvda, access=rw, persistent, target={disk}\"\n")
    path = tmp / "blk.snap"
    r = _run(str(y), "--snapshot-on-port", str(path), "--stop-after-snapshot", sock=tmp / "xs.sock")
    assert r.returncode == 130 and "before snapshot" in r.stdout and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert f"saved to {path}" in r.stderr       # stopped as INTERRUPTED, as a save stops
    assert "after snapshot" not in r.stdout          # stopped before any vCPU ran on
    assert path.exists()
    return path, disk


@pytest.fixture(scope="module")
def blk(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("blksnap")
    path, disk = _snapshot(tmp)
    return path, disk, tmp


def test_blk_restored_three_times_in_a_row(blk):
    path, disk, tmp = blk
    before = disk.read_bytes()
    for i in range(3):
        copies = tmp / f"seq{i}"
        copies.mkdir()
        r = _run("--restore", str(path), "--disk-copy", str(copies), sock=tmp / f"seq{i}.sock")
        _resumed(r.stdout, r.stderr, r.returncode)
        _check_copy(copies / "xvda-a.img")
    assert disk.read_bytes() == before      # the saved disk is only read


def test_blk_restored_twice_in_parallel(blk):
    path, _disk, tmp = blk
    dirs = [tmp / f"par{i}" for i in range(2)]
    procs = []
    for i, d in enumerate(dirs):
        d.mkdir()
        procs.append(subprocess.Popen(_cmd("--restore", str(path), "--disk-copy", str(d), sock=tmp / f"par{i}.sock"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    for p, d in zip(procs, dirs):
        out, err = p.communicate(timeout=300)
        _resumed(out, err, p.returncode)
        _check_copy(d / "xvda-a.img")


KICKS = re.compile(r"(\d+) EVTCHNOP_send, \d+ single-shot timer calls completed in C; (\d+) ring port "
                   r"bindings kicked inside KVM")


def test_blk_restored_with_its_send_stub(tmp_path):
    """A guest calling its hypercall pair (the patch trap's send stub, kicks matched inside KVM)
    is saved mid-I/O and restored: the stub is found in the saved RAM, the ring ports get their
    ioeventfds again, and the kicks after the restore never exit to the VMM."""
    path, _disk = _snapshot(tmp_path, trap="direct")
    copies = tmp_path / "copies"
    copies.mkdir()
    r = _run("--restore", str(path), "--disk-copy", str(copies), sock=tmp_path / "r.sock", verbose=True)
    _resumed(r.stdout, r.stderr, r.returncode)
    _check_copy(copies / "xvda-a.img")
    m = KICKS.search(r.stderr)
    assert m and int(m.group(2)) >= 1, r.stderr[-3000:]
    # saved with the stub in (the usual case: no C sends at all), or before it: planned again
    before = re.search(r"ring kicks inside KVM from now \((\d+) completed in C before\)", r.stderr)
    assert int(m.group(1)) == (int(before.group(1)) if before else 0), r.stderr[-3000:]


@pytest.mark.skipif(not shutil.which("qemu-storage-daemon"), reason="needs qemu-storage-daemon (make deps)")
def test_blk_on_qcow2_restored(tmp_path):
    """A qcow2 disk the guest allocated new clusters in before the snapshot: the save flushes the
    daemon first (before, its cached L2/refcount updates reached the image only when it closed, after
    the disk was hashed, and every restore was refused as 'changed since the snapshot')."""
    path, disk = _snapshot(tmp_path, "qcow2")
    copies = tmp_path / "copies"
    copies.mkdir()
    r = _run("--restore", str(path), "--disk-copy", str(copies), sock=tmp_path / "r.sock")
    _resumed(r.stdout, r.stderr, r.returncode)
    raw = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(copies / "xvda-a.qcow2"), str(raw)],
                   check=True)
    _check_copy(raw)
    assert "No errors" in subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True).stdout


def test_disk_copy_into_a_used_directory_refused(blk):
    path, _disk, tmp = blk
    d = tmp / "used"
    d.mkdir()
    (d / "xvda-a.img").write_bytes(b"x")
    r = _run("--restore", str(path), "--disk-copy", str(d), sock=tmp / "used.sock")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exists" in r.stderr, r.stderr
    assert (d / "xvda-a.img").read_bytes() == b"x"


def test_changed_disk_refused_with_one_line(tmp_path):
    path, disk = _snapshot(tmp_path)
    with open(disk, "r+b") as f:      # same size; content and mtime change
        f.seek(100 * 512)
        f.write(b"changed")
    r = _run("--restore", str(path), sock=tmp_path / "r.sock")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "changed since the snapshot" in r.stderr and "Traceback" not in r.stderr
    assert "after snapshot" not in r.stdout


def _damaged(path: Path, out: Path, change) -> Path:
    """A copy of snapshot ``path`` whose DeviceManager section ``change`` edits (checksums
    recomputed, so the backends' own checks must catch it); the RAM file linked beside it."""
    index, sections = read_state(str(path))
    doc = json.loads(json.dumps(sections["extensions"]["DeviceManager"]))
    change(doc)
    sections["extensions"]["DeviceManager"] = doc
    index.sections = []
    write_state(str(out), index, sections)
    os.link(str(path) + ".ram", str(out) + ".ram")
    return out


@pytest.mark.parametrize("what,change,expect", [
    ("version", lambda d: d.update(version=99), "version 99"),
    ("rings", lambda d: d["devices"][0]["backend"]["device"].update(rings="garbage"), "not accepted"),
    ("ring-ref", lambda d: d["devices"][0]["backend"]["frontend"].update({"ring-ref0": "999999"}),
     "cannot re-attach"),
    ("spec", lambda d: d["devices"][0].update(spec={"bogus": 1}), "not accepted"),
    ("type", lambda d: d["devices"][0].update(type="9pfs"), "not accepted"),
])
def test_damaged_backend_section_refused_with_one_line(blk, what, change, expect):
    path, _disk, tmp = blk
    bad = _damaged(path, tmp / f"bad-{what}.snap", change)
    d = tmp / f"bad-{what}"
    d.mkdir()
    r = _run("--restore", str(bad), "--disk-copy", str(d), sock=tmp / f"bad-{what}.sock")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- a vif: the tap re-created ----------------------------------------------------------------
needs_tap = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="needs root and /dev/net/tun for a tap and a packet socket")
NET_MAC = "00:16:3e:0a:0b:0d"
NET_AFTER = ("PASS snap.inflight_tx_answered", "PASS snap.arp_after", "PASS snap.icmp_after", "PASS snap.tx_after",
             "NET-DONE")


class _Peers(threading.Thread):
    """netpeer.Peer on interface ``name`` again each time the interface comes back (a tap
    name may serve one restore after another); frames and errors of all of them."""

    def __init__(self, name: str):
        super().__init__(daemon=True)
        self.name, self.mac = name, bytes.fromhex(NET_MAC.replace(":", ""))
        self.stop = threading.Event()
        self.frames: list = []
        self.errors: list[str] = []

    def run(self) -> None:
        from netpeer import Peer
        sysfs = f"/sys/class/net/{self.name}"
        failures = 0
        while not self.stop.is_set():
            p = Peer(self.name, self.mac)
            p.stop = self.stop
            p.run()
            self.frames += p.frames
            errors = [e for e in p.errors if "no interface" not in e]
            if errors and os.path.exists(sysfs):   # failed on a live tap (e.g. one just created): again
                failures += 1
                if failures >= 5:
                    self.errors += errors
                    return
                time.sleep(0.1)
                continue
            failures = 0
            while os.path.exists(sysfs) and not self.stop.is_set():
                time.sleep(0.02)             # that tap's VMM is ending: wait for the next one


def _peer(name: str):
    p = _Peers(name)
    p.start()
    return p


def _stop(peer) -> None:
    peer.stop.set()
    peer.join(10)


def _peer_answered(peer) -> None:
    import netpeer
    frames = [f for _h, f in peer.frames]
    assert not peer.errors, peer.errors
    assert netpeer.arp_request(peer.mac) in frames and netpeer.icmp_echo(peer.mac) in frames


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> tuple[Path, Path, str]:
    build_guests()
    tmp = tmp_path_factory.mktemp("netsnap")
    tap = f"xks{os.getpid() % 100000}"
    y = tmp / "guest.yaml"
    y.write_text(f"name: net-snap\nkernel: {GUESTS / 'out' / 'xen_netfront.elf'}\n"
                 "cmdline: \"xk.trap=page xk.net_snapshot\"\nmemory: 64M\nvcpus: 1\n"
                 f"xen:\n  domid: 1\n  hypercall_trap: auto\nvifs:\n  - \"mac={NET_MAC}, vifname={tap}\"\n")
    path = tmp / "net.snap"
    peer = _peer(tap)
    try:
        r = _run(str(y), "--snapshot-on-port", str(path), "--stop-after-snapshot", sock=tmp / "xs.sock")
    finally:
        _stop(peer)
    assert r.returncode == 130 and "PASS snap.arp_before" in r.stdout and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(f"/sys/class/net/{tap}")          # the tap went with the stopped VMM
    return path, tmp, tap


def _net_resumed(r_out: str, r_err: str, rc: int) -> None:
    context = f"\n--- stdout ---\n{r_out[-4000:]}\n--- stderr ---\n{r_err[-3000:]}"
    assert rc == 0 and r_out.startswith("after snapshot") and "FAIL" not in r_out, context
    assert all(a in r_out for a in NET_AFTER), context


@needs_tap
def test_net_restored_three_times_in_a_row_on_a_recreated_tap(net):
    path, tmp, tap = net
    for i in range(3):
        peer = _peer(tap)            # the restore builds the tap under its saved name (free again)
        try:
            r = _run("--restore", str(path), sock=tmp / f"seq{i}.sock")
        finally:
            _stop(peer)
        _net_resumed(r.stdout, r.stderr, r.returncode)
        _peer_answered(peer)
        assert not os.path.exists(f"/sys/class/net/{tap}")


@needs_tap
@pytest.mark.known_race
def test_net_restored_twice_in_parallel_on_fallback_taps(net):
    """The saved tap name is taken (the test holds a tap of that name), so each restore falls
    back to vif1.0-rN (logged; created exclusively, so two at once never share one, whichever
    starts first); each finds a peer there and passes every check.

    Open race (known_race): on a loaded host, about 1 run in 6, one of the two restored guests
    stops after "PASS snap.inflight_tx_answered" (its ARP through the fallback tap gets no
    answer) and is killed at 240 s; seen in full make test runs on 2026-12-02, never alone."""
    import netpeer

    from xenkvm.backends.tap import Tap
    path, tmp, tap = net
    names = ["vif1.0-r1", "vif1.0-r2"]
    holder = Tap(tap)
    peers = [_peer(n) for n in names]
    try:
        procs = [subprocess.Popen(_cmd("--restore", str(path), sock=tmp / f"par{i}.sock"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(2)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=240))
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate())        # what it printed, for the failure message
    finally:
        for p in peers:
            _stop(p)
        holder.close()
    for (out, err), p in zip(outs, procs):
        _net_resumed(out, err, p.returncode)
        assert re.search(rf"tap {tap} is taken; the restored vif uses vif1\.0-r[12]\n", err), err
    for p in peers:
        assert not p.errors, p.errors
    assert sum(1 for p in peers for _h, f in p.frames if f == netpeer.icmp_echo(p.mac)) == 2   # one ping each


# -- extra consoles: a new pty ---------------------------------------------------------------------
TTY = re.compile(r"console 1: (/dev/pts/\d+)")


def _read_until(fd: int, needle: bytes, seconds: float = 120) -> bytes:
    got, end = b"", time.monotonic() + seconds
    while needle not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.5)[0]:
            got += os.read(fd, 4096)
    return got


def test_consoles_restored_on_a_new_pty(tmp_path):
    """Console 1 is a pty: the restore opens a new one and logs its path, as at start; the guest
    writes to it and answers a line typed there.  Console 2 is a file: it goes on appending."""
    build_guests()
    log = tmp_path / "c2.log"
    y = tmp_path / "g.yaml"
    y.write_text(f'kernel: {GUESTS / "out/xen_pvconsoles.elf"}\ncmdline: "xk.trap=page xk.cons_snapshot"\n'
                 f'memory: 64M\nxen: {{domid: 1}}\nconsoles: [{{backend: pty}}, "backend=file, path={log}"]\n')
    path = tmp_path / "c.snap"
    r = _run(str(y), "--snapshot-on-port", str(path), "--stop-after-snapshot", sock=tmp_path / "a.sock")
    assert r.returncode == 130 and "before snapshot" in r.stdout, r.stdout + r.stderr
    first = TTY.search(r.stderr)
    assert first, r.stderr
    p = subprocess.Popen(_cmd("--restore", str(path), sock=tmp_path / "b.sock"), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        lines = []
        for _ in range(50):             # the new pty's line is logged when the device is re-created
            lines.append(p.stderr.readline().decode())
            m = TTY.search(lines[-1])
            if m or not lines[-1]:
                break
        assert m, "".join(lines)
        fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        try:
            assert b"console 1 after the snapshot\r\n" in _read_until(fd, b"console 1 after the snapshot\r\n")
            os.write(fd, b"ping\n")
            assert b"pong: ping\r\n" in _read_until(fd, b"pong: ping\r\n")
        finally:
            os.close(fd)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    assert p.returncode == 0 and out.startswith("after snapshot") and "CONS-DONE" in out, out + err
    assert "FAIL" not in out and "Traceback" not in err, out + err
    assert log.read_bytes() == b"before\nafter\n"
