"""The NBD client (xenkvm/backends/nbd.py) and ImageDisk (imagedisk.py), no guest.

Against Debian's real ``qemu-storage-daemon`` on images ``qemu-img`` makes
(qcow2, qcow2 over a backing file, vhd, vmdk; the data checked afterwards with
``qemu-img convert``), and against a hostile server: a Python thread on a
socketpair that answers the handshake with garbage, or the requests with a
wrong magic, an unknown handle, a short payload or nothing at all.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from xenkvm.backends import imagedisk, nbd
from xenkvm.backends.imagedisk import ImageDisk
from xenkvm.backends.nbd import Command, NbdClient, NbdError, TransmissionFlag
from xenkvm.diskspec import DiskSpec

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-storage-daemon") and shutil.which("qemu-img")),
                                reason="needs qemu-storage-daemon and qemu-img (make deps)")


def pattern(offset: int, length: int, seed: int) -> bytes:
    """Distinct bytes per 512-byte sector: sector s, byte i -> s*31 + i*7 + seed."""
    first, count = offset // 512, length // 512
    return b"".join(bytes((s * 31 + i * 7 + seed) % 256 for i in range(512)) for s in range(first, first + count))


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def raw_of(image: Path, fmt: str, tmp: Path) -> bytes:
    """The image's guest-visible contents, by qemu-img convert (the reference reader)."""
    out = tmp / f"{image.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out.read_bytes()


def spec(path: Path, fmt: str, readonly: bool = False, backing: bool = False) -> DiskSpec:
    return DiskSpec(target=path, vdev="xvda", devid=51712, readonly=readonly, format=fmt, backing=backing)


def views(buf: bytearray, chunk: int = 4096) -> list[memoryview]:
    """A buffer as page-sized memoryviews, as block.py hands guest pages over."""
    m = memoryview(buf)
    return [m[i:i + chunk] for i in range(0, len(buf), chunk)]


# -- the wire formats against linux/nbd.h --------------------------------------------------------
def test_wire_formats_match_linux_nbd_h(tmp_path):
    src = tmp_path / "n.c"
    src.write_text("""#include <stdio.h>
#include <stddef.h>
#include <linux/nbd.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\\n", sizeof(struct nbd_request), offsetof(struct nbd_request, handle),
           offsetof(struct nbd_request, from), offsetof(struct nbd_request, len), sizeof(struct nbd_reply),
           offsetof(struct nbd_reply, error), offsetof(struct nbd_reply, handle));
    printf("%u %u %d %d %d %d %d\\n", NBD_REQUEST_MAGIC, NBD_REPLY_MAGIC, NBD_CMD_FLUSH, NBD_CMD_TRIM,
           NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM);
    return 0;
}
""")
    subprocess.run(["gcc", "-o", str(tmp_path / "n"), str(src)], check=True)
    sizes, consts = subprocess.run([str(tmp_path / "n")], check=True, capture_output=True,
                                   text=True).stdout.split("\n")[:2]
    # struct nbd_request: magic, type (command flags << 16 | type), handle, from, len
    assert [int(x) for x in sizes.split()] == [nbd._REQUEST.size, 8, 16, 24, nbd._REPLY.size, 4, 8]
    assert [int(x) for x in consts.split()] == [nbd.REQUEST_MAGIC, nbd.SIMPLE_REPLY_MAGIC, Command.FLUSH,
                                                Command.TRIM, TransmissionFlag.READ_ONLY,
                                                TransmissionFlag.SEND_FLUSH, TransmissionFlag.SEND_TRIM]


# -- the real daemon -------------------------------------------------------------------------------
@needs_qemu
def test_qcow2_pipelined_reads_writes_flush_discard(tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    d = ImageDisk(spec(img, "qcow2"))
    try:
        assert d.sectors == 8 * MiB // 512 and d.pipelined and d.fd == -1
        assert d.client.flags & TransmissionFlag.SEND_FLUSH and not d.client.flags & TransmissionFlag.READ_ONLY
        writes = [(off, bytearray(pattern(off, 64 * 1024, 1))) for off in range(0, 2 * MiB, 128 * 1024)]
        for off, buf in writes:                          # 16 writes in flight, page by page
            d.submit(True, views(buf), off)
        assert d.results() == [0] * len(writes)
        reads = [(off, bytearray(64 * 1024)) for off, _ in writes]
        for off, buf in reads:
            d.submit(False, views(buf), off)
        assert d.results() == [0] * len(reads)
        assert all(bytes(buf) == pattern(off, len(buf), 1) for off, buf in reads)
        # a read overlapping a write in flight waits for it (the ring's order is kept)
        w, r = bytearray(pattern(4 * MiB, 4096, 5)), bytearray(4096)
        d.submit(True, views(w), 4 * MiB)
        d.submit(False, views(r), 4 * MiB)
        assert d.results() == [0, 0] and bytes(r) == bytes(w)
        d.flush()
        d.discard(16384, 8192)                          # reads back as zeros, as a punched hole does
        z = bytearray(16384)
        d.submit(False, views(z), 12288)
        assert d.results() == [0]
        assert bytes(z) == pattern(12288, 4096, 1) + bytes(8192) + pattern(24576, 4096, 1)
        bad = bytearray(4096)
        d.submit(False, views(bad), 8 * MiB)            # past the end: the server's error, this request only
        assert d.results()[0] != 0 and d.client.dead is None
    finally:
        d.close()
    data = raw_of(img, "qcow2", tmp_path)
    assert data[:16384] == pattern(0, 16384, 1) and data[128 * 1024:192 * 1024] == pattern(128 * 1024, 65536, 1)
    assert data[4 * MiB:4 * MiB + 4096] == pattern(4 * MiB, 4096, 5)
    assert data[16384:16384 + 8192] == bytes(8192) and data[24576:65536] == pattern(24576, 40960, 1)
    assert "No errors" in qemu_img("check", str(img))


@needs_qemu
def test_a_discard_of_4_gib_and_more_is_split(tmp_path):
    """A guest may discard more than NBD's 32-bit length says at once: it goes out in pieces (before, cffi's
    OverflowError tore the vbd down and lost the requests queued with it)."""
    GiB = 1 << 30
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8G")
    d = ImageDisk(spec(img, "qcow2"))
    try:
        marks = [0, 4 * GiB - 4096, 4 * GiB, 5 * GiB + 8192, 6 * GiB]   # the last one is past the discard
        for off in marks:
            d.submit(True, views(bytearray(pattern(off, 4096, 3))), off)
        assert d.results() == [0] * len(marks)
        d.discard(0, 6 * GiB)
        bufs = [bytearray(4096) for _ in marks]
        for off, buf in zip(marks, bufs):
            d.submit(False, views(buf), off)
        assert d.results() == [0] * len(marks) and d.client.dead is None
        assert [bytes(b) == bytes(4096) for b in bufs] == [True] * 4 + [False]
        assert bytes(bufs[-1]) == pattern(6 * GiB, 4096, 3)
        # the same through the vbd's BLKIF_OP_DISCARD: OKAY; only a range past the end is ERROR
        from types import SimpleNamespace

        from xenkvm.backends.block import ERROR, OKAY, BlockDevice, ffi
        dev = BlockDevice.__new__(BlockDevice)
        dev.disk, dev._pending, dev.backend = d, [], SimpleNamespace(label="vbd 51712")
        req = ffi.new("struct blkif_request_discard *")
        req.sector_number, req.nr_sectors = 0, 5 * GiB // 512
        assert dev._discard(ffi.cast("struct blkif_request *", req)[0]) == OKAY
        req.sector_number, req.nr_sectors = 8, d.sectors
        assert dev._discard(ffi.cast("struct blkif_request *", req)[0]) == ERROR
        assert d.client.dead is None
    finally:
        d.close()


@needs_qemu
def test_qcow2_over_a_backing_file(tmp_path):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(pattern(0, 2 * MiB, 7))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    d = ImageDisk(spec(top, "qcow2", backing=True))          # the disk spec's ``backing``
    try:
        buf = bytearray(8192)
        d.submit(False, views(buf), 4096)
        w = bytearray(pattern(MiB, 4096, 9))
        d.submit(True, views(w), MiB)
        assert d.results() == [0, 0] and bytes(buf) == pattern(4096, 8192, 7)
        d.flush()
    finally:
        d.close()
    assert base.read_bytes() == pattern(0, 2 * MiB, 7)            # the backing file is untouched
    data = raw_of(top, "qcow2", tmp_path)
    assert data[MiB:MiB + 4096] == pattern(MiB, 4096, 9) and data[:MiB] == pattern(0, MiB, 7)


@needs_qemu
@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_a_backing_file_is_not_opened_unless_the_spec_says_so(tmp_path, fmt):
    """An image from elsewhere names a host file as its backing file: without ``backing`` in the disk
    spec the daemon never opens it, the clusters the image does not have read as zeroes."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n" * 1000)
    img = tmp_path / f"evil.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-b", str(secret), "-F", "raw", str(img), "1M")
    d = ImageDisk(spec(img, fmt))
    try:
        buf = bytearray(4096)
        d.submit(False, views(buf), 0)
        assert d.results() == [0] and bytes(buf) == bytes(4096)
        pid = d._proc.pid
        daemon = next(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                      if Path(f"/proc/{c}/comm").read_text().strip().startswith("qemu-storage"))
        assert str(secret) not in {os.path.realpath(f"/proc/{daemon}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon}/fd")}
    finally:
        d.close()
    d = ImageDisk(spec(img, fmt, backing=True))              # opted in: the backing file shows through
    try:
        buf = bytearray(4096)
        d.submit(False, views(buf), 0)
        assert d.results() == [0] and bytes(buf) == secret.read_bytes()[:4096]
    finally:
        d.close()


@needs_qemu
def test_an_external_data_file_is_refused(tmp_path):
    """A qcow2 image whose data lives in a file its header names (any host file) is not served at all."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n" * 100000)
    img = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(img), "1M")
    before = _private_dirs()
    with pytest.raises(OSError) as e:
        ImageDisk(spec(img, "qcow2"))
    assert e.value.errno == errno.EPERM and "external data file" in e.value.strerror
    assert _private_dirs() == before                      # refused before any daemon started
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(plain), "1M")
    ImageDisk(spec(plain, "qcow2")).close()               # an ordinary v3 image still opens


@needs_qemu
@pytest.mark.parametrize("fmt,qemu_fmt", [("vhd", "vpc"), ("vmdk", "vmdk"), ("vdi", "vdi"), ("qed", "qed")])
def test_other_formats_open_and_read(tmp_path, fmt, qemu_fmt):
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(0, MiB, 4))
    img = tmp_path / f"d.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", qemu_fmt, str(raw), str(img))
    d = ImageDisk(spec(img, fmt, readonly=True))
    try:
        assert d.client.flags & TransmissionFlag.READ_ONLY and d.sectors >= MiB // 512
        buf = bytearray(MiB)
        d.submit(False, views(buf, 65536), 0)
        assert d.results() == [0] and bytes(buf) == pattern(0, MiB, 4)
        w = bytearray(4096)
        d.submit(True, views(w), 0)                     # a read-only export refuses (the server's EPERM)
        assert d.results()[0] != 0
    finally:
        d.close()


@needs_qemu
def test_a_daemon_that_dies_fails_its_requests(tmp_path, caplog):
    """The daemon killed under the client: the requests fail with EIO, one log line, no hang, and
    closing the disk still works."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    d = ImageDisk(spec(img, "qcow2"))
    try:
        watchdog = d._proc.pid
        children = Path(f"/proc/{watchdog}/task/{watchdog}/children").read_text().split()
        daemon = next(int(c) for c in children
                      if Path(f"/proc/{c}/comm").read_text().strip().startswith("qemu-storage"))
        os.kill(daemon, signal.SIGKILL)
        with caplog.at_level(logging.ERROR, logger="xenkvm.backends.nbd"):
            bufs = [bytearray(4096) for _ in range(3)]
            for i, b in enumerate(bufs):
                d.submit(i == 1, views(b), i * 4096)
            assert d.results() == [errno.EIO] * 3
            d.submit(False, views(bufs[0]), 0)
            assert d.results() == [errno.EIO]
            with pytest.raises(OSError):
                d.flush()
        assert len([r for r in caplog.records if "NBD connection lost" in r.getMessage()]) == 1
    finally:
        d.close()


def _alive(pid: int, session: int) -> bool:
    """Whether ``pid`` is still a live (not zombie) process of session ``session``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[3]) == session


@needs_qemu
def test_a_daemon_that_dies_on_its_own_takes_its_watchdog_along(tmp_path):
    """The daemon dies (not through the pipe): the watchdog shell and its pipe reader both end, so no
    reader is left to SIGTERM a process that reuses the daemon's PID when the VMM closes the pipe."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    d = ImageDisk(spec(img, "qcow2"))
    try:
        watchdog = d._proc.pid
        children = [int(c) for c in Path(f"/proc/{watchdog}/task/{watchdog}/children").read_text().split()]
        daemon = next(c for c in children if Path(f"/proc/{c}/comm").read_text().strip().startswith("qemu-storage"))
        readers = [c for c in children if c != daemon]
        assert len(readers) == 1
        os.kill(daemon, signal.SIGKILL)
        d._proc.wait(timeout=30)          # the VMM still holds the pipe's write end: only the daemon ended
        deadline = time.monotonic() + 30
        while _alive(readers[0], watchdog) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(readers[0], watchdog)
        assert not d._dir.exists()
    finally:
        d.close()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _private_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("xenkvm-nbd-*"))


@needs_qemu
def test_a_failed_start_leaves_nothing_behind(tmp_path, monkeypatch):
    """Popen failing (fork refused, no sh): the private directory, both pipe ends and the stderr file
    are gone again, and the error is the one OSError line."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")

    def refuse(*args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(imagedisk.subprocess, "Popen", refuse)
    fds, dirs = _fds(), _private_dirs()
    with pytest.raises(OSError) as e:
        ImageDisk(spec(img, "qcow2"))
    assert "Resource temporarily unavailable" in e.value.strerror
    assert _fds() == fds and _private_dirs() == dirs


def test_a_connect_error_closes_its_socket():
    """An error other than 'not listening yet' (here: a socket path too long) closes the socket it made."""
    d = ImageDisk.__new__(ImageDisk)
    d._dir = Path("/" + "x" * 200)
    d._proc = subprocess.Popen(["sleep", "30"])
    try:
        fds = _fds()
        try:
            d._connect(5)
        except OSError:
            # checked while the exception (and so _connect's frame and its locals) is alive: the socket
            # is closed, not merely left to the garbage collector
            assert _fds() == fds
        else:
            pytest.fail("connected to a path too long for AF_UNIX")
    finally:
        d._proc.kill()
        d._proc.wait()


@needs_qemu
def test_a_snapshot_of_a_disk_that_cannot_flush_is_refused(tmp_path):
    """BlockDevice.save_state flushes an NBD-served image before the snapshot hashes it; a daemon that
    cannot (here: killed) makes the snapshot fail with one SnapshotError line."""
    from types import SimpleNamespace

    from xenkvm.backends.block import BlockDevice
    from xenkvm.machine.snapshot.format import SnapshotError
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    d = ImageDisk(spec(img, "qcow2"))
    dev = BlockDevice.__new__(BlockDevice)          # the device without rings: only its disk matters here
    dev.disk, dev.rings, dev.backend = d, [], SimpleNamespace(label="vbd 51712")
    try:
        assert dev.save_state() == {"rings": []}
        pid = d._proc.pid
        daemon = next(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                      if Path(f"/proc/{c}/comm").read_text().strip().startswith("qemu-storage"))
        os.kill(daemon, signal.SIGKILL)
        with pytest.raises(SnapshotError) as e:
            dev.save_state()
        assert "flushing the image" in str(e.value) and "\n" not in str(e.value)
    finally:
        d.close()


@needs_qemu
def test_a_bad_image_is_one_line(tmp_path):
    img = tmp_path / "junk.qcow2"
    img.write_bytes(b"not a qcow2 image" * 100)
    with pytest.raises(OSError) as e:
        ImageDisk(spec(img, "qcow2"))
    assert "qemu-storage-daemon" in e.value.strerror and "\n" not in e.value.strerror
    assert not list(Path("/tmp").glob("xenkvm-nbd-*/junk*"))


@needs_qemu
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_daemon_does_not_outlive_its_vmm(tmp_path, sig):
    """A process holding an ImageDisk dies (SIGKILL: no cleanup at all): the daemon stops and the image is free."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    code = (f"import sys, time; from pathlib import Path; from xenkvm.backends.imagedisk import ImageDisk;"
            f"from xenkvm.diskspec import DiskSpec;"
            f"d = ImageDisk(DiskSpec(target=Path({str(img)!r}), vdev='xvda', devid=51712, format='qcow2'));"
            f"print(d._dir, flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        private = Path(p.stdout.readline().strip())
        assert private.is_dir() and (private / "nbd.sock").exists()
        p.send_signal(sig)
        p.wait(timeout=60)
        deadline = time.monotonic() + 60
        while private.exists() and time.monotonic() < deadline:   # the watchdog removes it once the daemon exited
            time.sleep(0.05)
        assert not private.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "No errors" in qemu_img("check", str(img))       # no other process holds the image's lock


# -- a hostile server ------------------------------------------------------------------------------
EXPORT_SIZE = 1 * MiB
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def serve_handshake(s: socket.socket) -> None:
    """A correct server side of the fixed newstyle handshake, NBD_OPT_GO only."""
    s.sendall(nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
    _recv_exact(s, 4)
    _, opt, length = nbd._OPTION.unpack(_recv_exact(s, nbd._OPTION.size))
    _recv_exact(s, length)
    info = nbd._EXPORT_INFO.pack(0, EXPORT_SIZE, FLAGS)
    s.sendall(nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, 3, len(info)) + info)
    s.sendall(nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, 1, 0))


def read_request(s: socket.socket) -> tuple[int, int, int, int]:
    magic, _flags, cmd, handle, offset, length = nbd._REQUEST.unpack(_recv_exact(s, nbd._REQUEST.size))
    assert magic == nbd.REQUEST_MAGIC
    if cmd == Command.WRITE:
        _recv_exact(s, length)
    return cmd, handle, offset, length


def hostile(behaviour) -> tuple[NbdClient, threading.Thread]:
    """A client connected to a thread running ``behaviour(server_socket)``."""
    a, b = socket.socketpair()

    def run():
        try:
            behaviour(b)
        except (EOFError, OSError):
            pass
        finally:
            b.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return NbdClient(a, "hostile", timeout=2.0), t


@pytest.mark.parametrize("greeting,word", [
    (b"HELLO, WORLD" + bytes(6), "not an NBD newstyle server"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 0), "fixed newstyle"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1) + b"\0" * 3, "closed the connection"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1) + nbd._OPTION_REPLY.pack(0x1234, 7, 1, 0), "garbled option reply"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1)
     + nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, 7, (1 << 31) | 6, 9) + b"no export", "export refused: no export"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1)
     + nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, 7, 3, 1 << 30), "garbled option reply"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1)
     + nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, 7, 1, 0), "without NBD_INFO_EXPORT"),
    (nbd._HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1) + nbd._OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, 7, 3, 4)
     + b"\0\0\0\0", "NBD_INFO_EXPORT of 4 bytes"),
])
def test_garbage_handshake_is_one_line(greeting, word):
    def server(s):
        s.sendall(greeting)
        s.settimeout(0.5)      # read what the client sends, then hang up: a client still waiting sees EOF
        try:
            while s.recv(4096):
                pass
        except TimeoutError:
            pass
    client, t = hostile(server)
    with pytest.raises(NbdError) as e:
        client.handshake("disk")
    assert word in str(e.value) and "\n" not in str(e.value)
    client.sock.close()
    t.join(5)


def _reply(s, handle, error=0, magic=nbd.SIMPLE_REPLY_MAGIC):
    s.sendall(nbd._REPLY.pack(magic, error, handle))


@pytest.mark.parametrize("case", ["wrong_magic", "unknown_handle", "short_payload", "silence", "error_for_one"])
def test_hostile_replies_fail_the_requests_not_the_client(case, caplog):
    def server(s):
        serve_handshake(s)
        reqs = [read_request(s) for _ in range(3)]
        (_, h1, _, n1), (_, h2, _, _), (_, h3, _, _) = reqs
        if case == "wrong_magic":
            _reply(s, h1, magic=0xDEADBEEF)
        elif case == "unknown_handle":
            _reply(s, 12345)
        elif case == "short_payload":
            _reply(s, h1)
            s.sendall(b"x" * (n1 // 2))
            s.shutdown(socket.SHUT_WR)
        elif case == "silence":
            time.sleep(4)
        elif case == "error_for_one":
            _reply(s, h2)                        # out of order
            _reply(s, h1, error=errno.ENOSPC)
            _reply(s, h3)
            time.sleep(1)

    client, t = hostile(server)
    client.handshake("disk")
    assert client.size == EXPORT_SIZE and client.flags == FLAGS
    bufs = [bytearray(4096) for _ in range(2)]
    with caplog.at_level(logging.ERROR, logger="xenkvm.backends.nbd"):
        h1 = client.submit(Command.READ, 0, 4096, views(bufs[0]))
        h2 = client.submit(Command.WRITE, 4096, 4096, views(bytearray(4096)))
        h3 = client.submit(Command.FLUSH, 0, 0)
        results = [client.wait(h) for h in (h1, h2, h3)]
        if case == "error_for_one":
            assert results == [errno.ENOSPC, 0, 0] and client.dead is None
        else:
            assert results == [errno.EIO] * 3 and client.dead
            later = client.submit(Command.READ, 0, 4096, views(bufs[1]))   # fails at once, no hang
            assert client.wait(later) == errno.EIO
            assert len([r for r in caplog.records if "NBD connection lost" in r.getMessage()]) == 1
    client.close()
    t.join(10)


def test_many_requests_in_flight_do_not_deadlock():
    """More requests than MAX_IN_FLIGHT, the server answering only once it has read 16: the client
    reads replies before sending more instead of blocking in sendmsg."""
    n = nbd.MAX_IN_FLIGHT * 3

    def server(s):
        serve_handshake(s)
        pending = []
        for _ in range(n):
            pending.append(read_request(s))
            if len(pending) == nbd.MAX_IN_FLIGHT:
                for cmd, handle, offset, length in pending:
                    _reply(s, handle)
                    s.sendall(bytes([offset // 65536]) * length)
                pending = []

    client, t = hostile(server)
    client.handshake("disk")
    bufs = [bytearray(65536) for _ in range(n)]
    handles = [client.submit(Command.READ, i * 65536, 65536, views(bufs[i])) for i in range(n)]
    assert [client.wait(h) for h in handles] == [0] * n
    assert all(bytes(b) == bytes([i]) * 65536 for i, b in enumerate(bufs))
    client.close()
    t.join(5)


def test_a_request_the_wire_cannot_carry_fails_alone():
    """A length past NBD's 32-bit field, or a read into a read-only buffer, fails that request with
    EINVAL and is never sent; the requests queued with it go out and are answered."""
    seen = []

    def server(s):
        serve_handshake(s)
        for _ in range(2):
            cmd, handle, offset, length = read_request(s)
            seen.append((cmd, offset, length))
            _reply(s, handle)
            if cmd == Command.READ:
                s.sendall(b"r" * length)
        s.settimeout(1.0)
        try:
            while data := s.recv(4096):
                seen.append(data)
        except TimeoutError:
            pass

    client, t = hostile(server)
    client.handshake("disk")
    buf = bytearray(4096)
    handles = [client.submit(Command.READ, 0, 4096, views(buf)),
               client.submit(Command.WRITE_ZEROES, 0, 1 << 32),
               client.submit(Command.READ, 0, 4096, [memoryview(bytes(4096))]),
               client.submit(Command.TRIM, 1 << 64, 4096),
               client.submit(Command.FLUSH, 0, 0)]
    assert [client.wait(h) for h in handles] == [0, errno.EINVAL, errno.EINVAL, errno.EINVAL, 0]
    assert client.dead is None and bytes(buf) == b"r" * 4096
    client.close()
    t.join(5)
    assert seen[:2] == [(Command.READ, 0, 4096), (Command.FLUSH, 0, 0)]


# -- xknbd_batch itself (C): what NbdClient never hands it ---------------------------------------
def _batch(sock: socket.socket, specs: list[tuple[int, int, list[bytearray] | None]], timeout_ms: int = 2000):
    """Run xknbd_batch on ``sock`` for (command, length, buffers) requests; (rc, errors)."""
    ffi, lib = nbd.ffi, nbd.lib
    reqs = ffi.new("struct xknbd_req[]", len(specs))
    keep = []
    for c, (cmd, length, bufs) in zip(reqs, specs):
        c.type, c.offset, c.length = cmd, 0, length
        if bufs is not None:
            iov = ffi.new("struct iovec[]", max(len(bufs), 1))
            for v, b in zip(iov, bufs):
                p = ffi.from_buffer(b)
                keep.append(p)
                v.iov_base, v.iov_len = p, len(b)
            keep.append(iov)
            c.iov, c.niov = iov, len(bufs)
    err = ffi.new("int *")
    rc = lib.xknbd_batch(sock.fileno(), reqs, len(specs), 1, nbd.MAX_IN_FLIGHT, timeout_ms, err)
    return rc, [c.error for c in reqs]


def test_a_request_whose_iovec_does_not_fit_is_refused_not_sent():
    """A payload shorter or longer than the length, more segments than the batch holds (before: silently
    cut at XKNBD_MAX_IOV), an iovec on a command without payload: EINVAL for that request, nothing of
    it on the wire; the valid requests around it are served."""
    a, b = socket.socketpair()
    with a, b:
        page = [bytearray(4096)]
        many = [bytearray(512) for _ in range(nbd.lib.XKNBD_MAX_IOV + 8)]
        specs = [(Command.WRITE, 8192, page), (Command.WRITE, 4096, page), (Command.READ, 4096, [bytearray(2048)]),
                 (Command.WRITE, 512 * len(many), many), (Command.FLUSH, 0, page), (Command.FLUSH, 0, None)]
        out = []

        def server():
            while len(out) < 2:
                _magic, _f, cmd, handle, _off, length = nbd._REQUEST.unpack(_recv_exact(b, nbd._REQUEST.size))
                out.append((cmd, length, len(_recv_exact(b, length)) if cmd == Command.WRITE else 0))
                _reply(b, handle)

        t = threading.Thread(target=server, daemon=True)
        t.start()
        rc, errors = _batch(a, specs)
        t.join(5)
        assert rc == 0 and errors == [errno.EINVAL, 0, errno.EINVAL, errno.EINVAL, errno.EINVAL, 0]
        assert out == [(Command.WRITE, 4096, 4096), (Command.FLUSH, 0, 0)]
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)                          # nothing more was sent


def test_the_timeout_holds_on_a_blocking_socket():
    """No reply: xknbd_batch gives up after its timeout though the socket is blocking (before: readv
    blocked for ever unless Python's settimeout had made the socket non-blocking)."""
    a, b = socket.socketpair()
    assert a.getblocking()
    result = []
    t = threading.Thread(target=lambda: result.append(_batch(a, [(Command.FLUSH, 0, None)], timeout_ms=200)),
                         daemon=True)
    t.start()
    t.join(10)
    hung = t.is_alive()
    b.close()                                  # unblocks a hung call (EOF) so the thread ends
    t.join(10)
    a.close()
    assert not hung and result[0][0] == nbd.lib.XKNBD_E_TIMEOUT
