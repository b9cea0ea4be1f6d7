"""The block backend under /dev/kvm, driven by the freestanding blkfront (guests/xen_blkfront.c).

Each test writes a guest definition with its own images, runs it with
``python -m xenkvm run``, requires every guest check to pass, then reads the
image files: what the guest wrote must be there, byte for byte, and nothing
it was refused may be.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guestbuild import build_guests
from xenkvm.cli import STACKS_SIGNAL

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
SUMMARY = re.compile(r"^SUMMARY: (\d+) passed, (\d+) failed$", re.M)
SECTORS = 8192                       # 4 MiB images


def pattern(sector: int, count: int, seed: int) -> bytes:
    """What the guest writes: byte i of sector s is s*31 + i*7 + seed (mod 256)."""
    return b"".join(bytes((s * 31 + i * 7 + seed) % 256 for i in range(512)) for s in range(sector, sector + count))


@pytest.fixture(scope="module")
def kernel() -> Path:
    build_guests()
    return GUESTS / "out" / "xen_blkfront.elf"


def run(tmp_path: Path, kernel: Path, cmdline: str, disks: list[str], xen: str = "",
        verbose: bool = False) -> subprocess.CompletedProcess:
    y = tmp_path / "guest.yaml"
    lines = [f"name: blk-test\nkernel: {kernel}\ncmdline: \"{cmdline}\"\nmemory: 64M\nvcpus: 1\n",
             f"xen:\n  domid: 1\n  hypercall_trap: auto\n{xen}disks:\n"] + [f"  - \"{d}\"\n" for d in disks]
    y.write_text("".join(lines))
    cmd = [sys.executable, "-m", "xenkvm", *(["-v"] if verbose else []), "run", str(y)]
    return run_vmm(cmd, timeout=300)


def run_vmm(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a VMM; past ``timeout`` it prints every thread's stack (SIGUSR2) and is killed, and the
    failure shows what the guest printed and those stacks (a hang must leave its evidence)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=dict(os.environ))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(STACKS_SIGNAL)
        try:
            out, err = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"the VMM ran past {timeout} s\n--- stdout ---\n{out[-6000:]}\n"
                             f"--- stderr ---\n{err[-8000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_passed(r: subprocess.CompletedProcess) -> int:
    context = f"\n--- stdout ---\n{r.stdout[-5000:]}\n--- stderr ---\n{r.stderr[-3000:]}"
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails) + context
    m = SUMMARY.search(r.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, context
    assert r.returncode == 0, f"exit {r.returncode}" + context
    return int(m.group(1))


def images(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(SECTORS * 512))
    b.write_bytes(pattern(0, SECTORS, 2))
    return a, b


def sectors(path: Path, first: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(first * 512)
        return f.read(count * 512)


needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-storage-daemon") and shutil.which("qemu-img")),
                                reason="needs qemu-storage-daemon and qemu-img (make deps)")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def to_format(raw: Path, fmt: str) -> Path:
    """``raw`` converted to ``fmt`` (QEMU's name) beside it."""
    out = raw.with_suffix(f".{fmt}")
    opts = ["-o", "force_size=on"] if fmt == "vpc" else []     # vpc rounds the size to a CHS geometry
    qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(out))
    return out


def to_raw(image: Path, fmt: str) -> Path:
    """What the guest sees of ``image``, by qemu-img convert (the reference reader), as a raw file."""
    out = image.with_suffix(".check.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "no-persistent"])
def test_blkfront_reads_writes_flushes(tmp_path, kernel, persistent):
    """The well-behaved scenario with the disk offering persistent grants (the C path on kept
    pages) and not (the raw default: the C path claims each page for its request)."""
    a, b = images(tmp_path)
    flag = "persistent" if persistent else "no-persistent"
    r = run(tmp_path, kernel, "xk.trap=page", [f"format=raw, vdev=xvda, access=rw, {flag}, target={a}",
                                               f"{b},raw,xvdb,ro"])
    check_well_behaved_run(r, a, b, persistent)


STUB_IN = re.compile(r"send stub over xen_hypercall_amd/_intel .*: ring kicks inside KVM from now "
                     r"\((\d+) completed in C before\)")
KICKS = re.compile(r"hypercall fast path: (\d+) EVTCHNOP_send, \d+ single-shot timer calls completed in C; "
                   r"(\d+) ring port bindings kicked inside KVM")
#: how the guest's ring kicks reach the backend: its hypercall entry (xk.trap) and the xen: keys
KICK_PATHS = {"kvm-stub": ("direct", ""),
              "c-patch": ("direct", "  kernel_kicks: false\n"),
              "c-page": ("page", ""),
              "python": ("page", "  fast_path: false\n")}


@pytest.mark.parametrize("path", list(KICK_PATHS))
def test_ring_kicks_serve_alike_on_every_path(tmp_path, kernel, path):
    """The same guest with its ring kicks matched inside KVM (``kvm-stub``: the hypercall pair
    becomes the send stub when the first ring port is bound, xen/sendstub.py; from then on no
    kick reaches the C loop, while the store's and console's sends still exit and are answered
    there), completed in the vCPU's C loop (the plain patch, or the hypercall page; xen/fastpath.py),
    or in Python (``fast_path: false``): every check passes and the images hold the same bytes
    whichever way."""
    trap, xen = KICK_PATHS[path]
    a, b = images(tmp_path)
    r = run(tmp_path, kernel, f"xk.trap={trap}", [f"format=raw, vdev=xvda, access=rw, persistent, target={a}",
                                                  f"{b},raw,xvdb,ro"], xen=xen, verbose=True)
    check_well_behaved_run(r, a, b)
    assert_served_in_c_loop(r.stderr)
    m = KICKS.search(r.stderr)
    if path == "python":
        assert m is None and "fast path" not in r.stderr
        return
    assert m, r.stderr[-2000:]
    sends_in_c, bindings = int(m.group(1)), int(m.group(2))
    if path == "kvm-stub":      # the kicks before the stub went in are C's, none after
        before = STUB_IN.search(r.stderr)
        assert before and sends_in_c == int(before.group(1)), r.stderr[-3000:]
        assert bindings >= 3, m.group(0)                      # xvda's two queues, xvdb, reconnects
    else:       # (c-page: the image's pair gets the stub too, but this guest calls the page)
        assert sends_in_c >= 10, m.group(0)                   # the kicks (fewer than requests: batches)
        assert path == "c-page" or ("send stub" not in r.stderr and bindings == 0), r.stderr[-3000:]


#: the vbd's last words at -v (block.py _log_latency): how many of its wake-ups the C serve loop made
LOOP_KICKS = re.compile(r"vbd \d+ \((xvd\w)\): event latency: .*kicks served in C (\d+) of (\d+)$", re.M)


def assert_served_in_c_loop(stderr: str) -> None:
    """Both disks were served mostly by the worker's C loop (``xkb_loop``); the rest are the
    passes the worker makes in Python after its xenbus events (connect, reconnects)."""
    last = {disk: (int(c), int(n)) for disk, c, n in LOOP_KICKS.findall(stderr)}
    assert set(last) == {"xvda", "xvdb"}, stderr[-3000:]
    for disk, (c, n) in last.items():
        assert 0 < c <= n and 2 * c >= n, f"{disk}: {c} of {n} kicks in the C loop"


def check_well_behaved_run(r: subprocess.CompletedProcess, a: Path, b: Path, persistent: bool = True) -> None:
    """The guest's checks of the well-behaved scenario passed, and raw images ``a`` (rw) and ``b`` (ro)
    hold exactly what it wrote; ``persistent``: ``a`` offered persistent grants."""
    assert assert_passed(r) >= 30
    assert "blk.reconnect_two_page_ring" in r.stdout and "blk.full_multipage_ring" in r.stdout
    assert sectors(a, 8, 96) == pattern(8, 96, 1)             # the 11 + 1 segment batch
    assert sectors(a, 200, 4) == pattern(200, 4, 1)           # first_sect 2..5 of a page
    assert sectors(a, 210, 1) == pattern(210, 1, 1)           # the barrier write
    assert sectors(a, SECTORS - 1, 1) == pattern(SECTORS - 1, 1, 1)
    assert sectors(a, 0, 8) == bytes(4096) and sectors(a, 204, 6) == bytes(6 * 512)
    assert sectors(a, 1024, 8) == bytes(4096) and sectors(a, 1032, 8) == pattern(1032, 8, 1)   # the discard
    assert "PASS blk.discard" in r.stdout
    assert sectors(a, 2048, 64) == pattern(2048, 64, 1)       # the 16-segment indirect write
    assert sectors(a, 3000, 8) == pattern(3000, 8, 1)         # written through the second queue
    grant = "blk.persistent_grant_kept" if persistent else "blk.request_grant_released"
    for name in ("blk.indirect_rw", "blk.indirect_bad_page", grant, "blk.grants_released",
                 "blk.multiqueue_rw", "blk.multiqueue_second_port_notified"):
        assert f"PASS {name}" in r.stdout
    assert a.stat().st_size == SECTORS * 512                  # nothing written past the end
    assert b.read_bytes() == pattern(0, SECTORS, 2)           # the read-only disk is untouched


@pytest.mark.parametrize("trap", ["page", "direct"])
def test_hostile_frontend_and_a_good_disk(tmp_path, kernel, trap):
    """``direct``: the hostile guest's kicks (a flood among them) go through the send stub and
    KVM's ioeventfds (test_send_stub_kicks_inside_kvm)."""
    a, b = images(tmp_path)
    r = run(tmp_path, kernel, f"xk.trap={trap} xk.blk_hostile",
            [f"vdev=xvda, persistent, target={a}", f"vdev=xvdb, access=rw, target={b}"])
    assert assert_passed(r) >= 40
    for name in ("hostile.unknown_op", "hostile.ungranted_ref", "hostile.far_ahead_not_served",
                 "blk.good_disk_after_attack.read_back", "blk.attacked_disk_after_reconnect.read_back"):
        assert f"PASS {name}" in r.stdout
    assert "is not a XenbusState; ignored" in r.stderr
    assert "ring stopped until the frontend reconnects" in r.stderr
    assert "cannot connect: ring-ref '7-not-a-number' is not a number" in r.stderr
    assert "Traceback" not in r.stderr
    assert sectors(a, 8, 96) == pattern(8, 96, 1)
    assert sectors(a, 0, 8) == bytes(4096)                    # refused requests wrote nothing
    assert a.stat().st_size == SECTORS * 512                  # nor past the end
    assert "PASS hostile.persistent.write_past_end" in r.stdout and "PASS hostile.persistent.kept" in r.stdout
    assert sectors(b, 8, 96) == pattern(8, 96, 2) and b.stat().st_size == SECTORS * 512


def test_bad_disk_spec_is_one_line(tmp_path, kernel):
    a, _ = images(tmp_path)
    r = run(tmp_path, kernel, "xk.trap=page", [f"vdev=xvda, acess=rw, target={a}"])
    assert r.returncode != 0 and "unknown key 'acess'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_flushed_writes_survive_the_vmm_being_killed(tmp_path, kernel, sig):
    """A write acknowledged, then a flush acknowledged: the data is in the image however the VMM ends."""
    a, _ = images(tmp_path)
    kill_after_flush(tmp_path, kernel, sig, f"vdev=xvda, target={a}")
    assert sectors(a, 4096, 64) == pattern(4096, 64, 3)


@needs_qemu
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_flushed_writes_survive_the_vmm_being_killed_qcow2(tmp_path, kernel, sig):
    """The same on qcow2: the guest's flush is NBD_CMD_FLUSH, acknowledged once qemu-storage-daemon
    answered it; after the VMM's end the daemon stops too (the image is not locked: qemu-img opens it)."""
    a, _ = images(tmp_path)
    qa = to_format(a, "qcow2")
    kill_after_flush(tmp_path, kernel, sig, f"format=qcow2, vdev=xvda, target={qa}")
    for _ in range(600):                  # the daemon's watchdog SIGTERMs it once the VMM is gone
        if subprocess.run(["qemu-img", "check", str(qa)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    assert sectors(to_raw(qa, "qcow2"), 4096, 64) == pattern(4096, 64, 3)


def kill_after_flush(tmp_path: Path, kernel: Path, sig: int, disk: str) -> None:
    """Run xk.blk_durable on ``disk``; signal the VMM once the guest saw its write and flush acknowledged."""
    y = tmp_path / "guest.yaml"
    y.write_text(f'kernel: {kernel}\ncmdline: "xk.trap=page xk.blk_durable"\nmemory: 64M\n'
                 f'xen:\n  domid: 1\ndisks: ["{disk}"]\n')
    # default SIGINT: a test run started in the background inherits it ignored (tests/kvm/test_machine.py)
    p = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", str(y)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace",
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.startswith("BLK-FLUSHED") or line.startswith("SUMMARY"):
                break
        assert any(line.startswith("BLK-FLUSHED") for line in seen), "".join(seen)
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@needs_qemu
@pytest.mark.parametrize("backing", [False, True], ids=["qcow2", "qcow2-over-backing-file"])
def test_blkfront_on_qcow2(tmp_path, kernel, backing):
    """The well-behaved scenario on qcow2 images served by qemu-storage-daemon over NBD: the same checks
    as on raw, the images read back with qemu-img; over a backing file, the backing file is untouched."""
    a, b = images(tmp_path)
    if backing:
        qa, qb = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", str(a), "-F", "raw", str(qa))
        qemu_img("create", "-f", "qcow2", "-b", str(b), "-F", "raw", str(qb))
    else:
        qa, qb = to_format(a, "qcow2"), to_format(b, "qcow2")
    opt = ", backing" if backing else ""         # an overlay's backing file is opened only when asked
    r = run(tmp_path, kernel, "xk.trap=page", [f"format=qcow2, vdev=xvda, access=rw{opt}, target={qa}",
                                               f"{qb},qcow2,xvdb,ro{opt}"])
    check_well_behaved_run(r, to_raw(qa, "qcow2"), to_raw(qb, "qcow2"))
    subprocess.run(["qemu-img", "check", str(qa)], check=True, capture_output=True)
    if backing:
        assert a.read_bytes() == bytes(SECTORS * 512) and b.read_bytes() == pattern(0, SECTORS, 2)


@needs_qemu
def test_hostile_frontend_on_qcow2_and_a_good_disk(tmp_path, kernel):
    """The hostile scenario against a qcow2 disk: every request takes the NBD path (no C fast path), with
    the same checks; the VMM, the daemon and the good disk keep going."""
    a, b = images(tmp_path)
    qa = to_format(a, "qcow2")
    r = run(tmp_path, kernel, "xk.trap=page xk.blk_hostile",
            [f"format=qcow2, vdev=xvda, target={qa}", f"vdev=xvdb, access=rw, target={b}"])
    assert assert_passed(r) >= 40
    for name in ("hostile.unknown_op", "hostile.ungranted_ref", "hostile.far_ahead_not_served",
                 "blk.good_disk_after_attack.read_back", "blk.attacked_disk_after_reconnect.read_back",
                 "hostile.persistent.write_past_end"):
        assert f"PASS {name}" in r.stdout
    assert "Traceback" not in r.stderr and "NBD connection lost" not in r.stderr
    ra = to_raw(qa, "qcow2")
    assert sectors(ra, 8, 96) == pattern(8, 96, 1) and sectors(ra, 0, 8) == bytes(4096)
    assert ra.stat().st_size == SECTORS * 512


@needs_qemu
def test_an_image_the_daemon_cannot_open_is_one_line(tmp_path, kernel):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"this is no qcow2 image\n" * 64)
    r = run(tmp_path, kernel, "xk.trap=page", [f"format=qcow2, vdev=xvda, target={junk}"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk xvda" in lines[0] and "qemu-storage-daemon" in lines[0], r.stderr


@needs_qemu
@pytest.mark.parametrize("fmt,qemu_fmt", [("vhd", "vpc"), ("vmdk", "vmdk")])
def test_blkfront_reads_vhd_and_vmdk(tmp_path, kernel, fmt, qemu_fmt):
    """vhd and vmdk images (read-only here; the writes go to a raw disk): the guest's read-only disk checks
    read the pattern through qemu-storage-daemon."""
    a, b = images(tmp_path)
    r = run(tmp_path, kernel, "xk.trap=page", [f"format=raw, vdev=xvda, access=rw, target={a}",
                                               f"{to_format(b, qemu_fmt)},{fmt},xvdb,ro"])
    assert assert_passed(r) >= 30
    assert "PASS blk.ro.read" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root and losetup for a loop device")
def test_block_device_target(tmp_path, kernel):
    """A host block device (a loop device over a file): geometry from its ioctls, BLKDISCARD for discards."""
    a, b = images(tmp_path)
    try:
        loop = subprocess.run(["losetup", "-f", "--show", str(a)], capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr.strip()}")
    try:
        r = run(tmp_path, kernel, "xk.trap=page", [f"phy:{loop},xvda,w", f"{b},raw,xvdb,ro"])
        assert assert_passed(r) >= 30
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert sectors(a, 8, 96) == pattern(8, 96, 1) and sectors(a, 1024, 8) == bytes(4096)
