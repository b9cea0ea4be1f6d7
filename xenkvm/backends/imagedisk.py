"""A disk image in a format other than raw (qcow2, vhd, vmdk, ...), served by ``qemu-storage-daemon``.

No format parser of our own: Debian's ``qemu-storage-daemon`` (package
qemu-system-common) opens the image (and its backing chain) as a blockdev and
exports it over NBD on a UNIX socket in a private directory (mode 0700);
the VMM talks to it with ``nbd.NbdClient``.

One daemon per disk, not per domain: a disk's lifetime (attach, hot-unplug)
is then the daemon's, with no QMP to add or remove exports at run time, and a
daemon that fails takes one disk with it, not all.  Each costs ~20 MB of RSS.

The daemon must not outlive the VMM, however the VMM ends (SIGKILL included),
and the VMM may spawn it from any thread (``PR_SET_PDEATHSIG`` follows the
spawning *thread*, which may end first).  So it runs under a small ``sh``
watchdog in its own session: the watchdog holds the read end of a pipe whose
only write end is the VMM's (close-on-exec); when the VMM closes it, or the
kernel does because the VMM died, the watchdog's ``read`` returns and it sends
the daemon SIGTERM (QEMU then flushes and closes the image), waits for it and
removes the private directory.

``ImageDisk`` has Disk's interface (blkring.py: geometry, ``discard``,
``flush``, ``close``) plus ``submit``/``results``, which block.py uses to keep
several reads and writes in flight per ring kick.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from xenkvm.diskspec import BACKING_FORMATS, DiskSpec

from .blkring import PAGE, SECTOR
from .nbd import Command, NbdClient, NbdError, TransmissionFlag

log = logging.getLogger(__name__)

DAEMON = "qemu-storage-daemon"
START_TIMEOUT = 60.0        #: seconds for the daemon to open the image and listen (a loaded host is slow)
EXPORT = "disk"
#: the longest discard one NBD request carries: its length field is 32 bits; 4 KiB-aligned chunks keep each
#: one on qcow2 cluster (and page) boundaries wherever the whole discard is
DISCARD_CHUNK = 0xFFFFF000
#: xl.cfg(5)'s format names -> QEMU's block drivers (Xen's "vhd" is QEMU's "vpc")
DRIVERS = {"qcow": "qcow", "qcow2": "qcow2", "vhd": "vpc", "vmdk": "vmdk", "qed": "qed", "vdi": "vdi"}

#: stdin = the pipe's read end (kept as fd 3: an asynchronous list's stdin is /dev/null), $1 = the private
#: directory, the rest = the daemon's command line.  A daemon that exits on its own takes the reader with
#: it: a reader left waiting would, once the VMM closed the pipe, SIGTERM whatever process had the
#: daemon's PID by then.
WATCHDOG = r'''
exec 3<&0
dir=$1; shift
"$@" </dev/null 3<&- &
pid=$!
{ read _ <&3; kill -TERM "$pid" 2>/dev/null; } &
reader=$!
exec 3<&-
wait "$pid"; rc=$?
kill "$reader" 2>/dev/null
rm -rf -- "$dir"
exit $rc
'''


QCOW2_MAGIC = b"QFI\xfb"
QCOW2_INCOMPAT_OFFSET = 72              #: incompatible_features, big-endian u64, header version 3 and later
QCOW2_INCOMPAT_DATA_FILE = 1 << 2       #: "external data file": guest data lives in a file the header names


def refuse_foreign_files(spec: DiskSpec) -> None:
    """Refuse a qcow2 image that keeps its data in an external file: qemu opens the file the image's
    header names, which an image from elsewhere could point at any host file (OSError EPERM).  The
    backing file has its own opt-in (``daemon_args``)."""
    if spec.format != "qcow2":
        return
    with open(spec.target, "rb") as f:
        head = f.read(QCOW2_INCOMPAT_OFFSET + 8)
    if len(head) < QCOW2_INCOMPAT_OFFSET + 8 or head[:4] != QCOW2_MAGIC or int.from_bytes(head[4:8], "big") < 3:
        return                          # not qcow2 (the daemon says so) or a version without the feature
    if int.from_bytes(head[QCOW2_INCOMPAT_OFFSET:QCOW2_INCOMPAT_OFFSET + 8], "big") & QCOW2_INCOMPAT_DATA_FILE:
        raise OSError(errno.EPERM, f"{spec.target}: a qcow2 image with an external data file is refused "
                                   "(its header names a host file to open)")


def daemon_args(spec: DiskSpec, sock: Path) -> list[str]:
    """The ``qemu-storage-daemon`` command line for ``spec`` (JSON options: any file name is safe).  The
    backing file an image names is opened only if the spec says ``backing``: the name is the image's, and
    an image from elsewhere could name any host file (the VMM may run as root)."""
    ro = spec.readonly
    discard = "ignore" if ro or not spec.discard else "unmap"
    proto = {"driver": "file", "node-name": "proto", "filename": str(spec.target), "read-only": ro,
             "discard": discard}
    fmt = {"driver": DRIVERS[spec.format], "node-name": "fmt", "file": "proto", "read-only": ro,
           "discard": discard}
    if spec.format in BACKING_FORMATS and not spec.backing:
        fmt["backing"] = None       # the header's backing file is not opened: unallocated clusters read zeroes
    export = {"type": "nbd", "id": "export", "node-name": "fmt", "name": EXPORT, "writable": not ro}
    server = {"addr": {"type": "unix", "path": str(sock)}}
    return [DAEMON, "--blockdev", json.dumps(proto), "--blockdev", json.dumps(fmt),
            "--nbd-server", json.dumps(server), "--export", json.dumps(export)]


def _first_error(lines: list[str]) -> str:
    """The daemon's first stderr line without its name and the option it echoes (``--blockdev {...}: ``)."""
    if not lines:
        return ""
    line = lines[0].removeprefix(f"{DAEMON}: ")
    return line.split("}: ", 1)[-1] if line.startswith("--") else line


def _check(err: int, what: str) -> None:
    """OSError for a request's non-zero errno."""
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


class ImageDisk:
    """A disk image served by its own qemu-storage-daemon over NBD."""

    pipelined = True

    def __init__(self, spec: DiskSpec, timeout: float = START_TIMEOUT):
        self.fd = -1                     #: no file descriptor to preadv: block.py serves every request here
        self.spec = spec
        self.label = f"{spec.vdev} ({spec.format} {spec.target.name})"
        if shutil.which(DAEMON) is None:
            raise OSError(errno.ENOENT, f"{DAEMON} not found (Debian package qemu-system-common)")
        self._dir: Path | None = None
        self._rfd = self._wfd = -1
        self._stderr = None
        self._proc: subprocess.Popen | None = None
        self.client: NbdClient | None = None
        self._order: list[int] = []
        self._ranges: list[tuple[int, int, bool]] = []   #: (start, end, write) of the requests in flight
        self._span = (1 << 64, 0)                          #: the bytes they cover, first to last
        refuse_foreign_files(spec)
        try:               # whatever fails, nothing is left behind: directory, pipe, file, daemon, socket
            self._spawn(spec)
            self.client = NbdClient(self._connect(timeout), self.label)
            self.client.handshake(EXPORT)
        except (OSError, NbdError) as e:
            self.close()
            raise OSError(errno.EIO, f"{DAEMON}: {getattr(e, 'strerror', None) or e}") from None
        except BaseException:
            self.close()
            raise
        self.size = self.client.size
        self.sectors = self.size // SECTOR
        self.sector_size = SECTOR
        self.physical_sector_size = PAGE      # qcow2 clusters and the host's page cache work in 4 KiB or more
        self.is_block = False
        if not spec.readonly and self.client.flags & TransmissionFlag.READ_ONLY:
            self.close()
            raise OSError(errno.EROFS, f"{DAEMON}: the export is read-only")
        log.info("%s: served by %s pid %d over NBD (%d sectors, flags %#x)", self.label, DAEMON,
                 self._proc.pid, self.sectors, self.client.flags)

    def _spawn(self, spec: DiskSpec) -> None:
        """The private directory, the pipe and the daemon under its watchdog (``close`` undoes any part)."""
        self._dir = Path(tempfile.mkdtemp(prefix="xenkvm-nbd-"))
        self._rfd, self._wfd = os.pipe()          # both close-on-exec; the watchdog gets the read end
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(["sh", "-c", WATCHDOG, "sh", str(self._dir),
                                       *daemon_args(spec, self._dir / "nbd.sock")],
                                      stdin=self._rfd, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                      start_new_session=True)
        os.close(self._rfd)
        self._rfd = -1

    def _connect(self, timeout: float) -> socket.socket:
        """Connect once the daemon listens; its first stderr line if it exits first."""
        path = str(self._dir / "nbd.sock")
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._stderr.seek(0)
                lines = self._stderr.read().decode(errors="replace").strip().splitlines()
                raise OSError(errno.EIO, _first_error(lines) or f"exited with status {self._proc.returncode}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            except BaseException:
                s.close()
                raise
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, f"not listening after {timeout:g}s")
            time.sleep(0.01)

    # -- I/O --------------------------------------------------------------------------------
    def submit(self, write: bool, buffers: list[memoryview], offset: int) -> None:
        """A read into / write from ``buffers`` (the client owns and releases them); answered by ``results``."""
        length = sum(len(b) for b in buffers)
        end = offset + length
        lo, hi = self._span
        if lo < end and offset < hi and any(o < end and offset < e and (w or write) for o, e, w in self._ranges):
            # NBD answers requests in flight in any order: a read or write overlapping a write still in
            # flight waits for it, so a batch keeps the ring's order as the raw file's preadv/pwritev do
            self.client.drain()
            self._ranges.clear()
            lo, hi = end, offset
        self._ranges.append((offset, end, write))
        self._span = (min(lo, offset), max(hi, end))   # sequential requests never reach the scan
        self._order.append(self.client.submit(Command.WRITE if write else Command.READ, offset, length, buffers))

    def results(self) -> list[int]:
        """Wait for every submitted request; 0 or an errno each, in submission order."""
        order, self._order = self._order, []
        self._ranges.clear()
        self._span = (1 << 64, 0)
        return [self.client.wait(h) for h in order]

    def flush(self) -> None:
        """NBD_CMD_FLUSH: every write the daemon answered is in the image file, fdatasync'd (OSError if not)."""
        if not self.client.flags & TransmissionFlag.SEND_FLUSH:
            return            # the export has no volatile cache to flush
        self._sync(Command.FLUSH, 0, 0, "flush")

    def discard(self, offset: int, length: int) -> None:
        """Zeroes, deallocated where the format can (as a raw file's punched hole reads): NBD_CMD_WRITE_ZEROES
        without NO_HOLE, or NBD_CMD_TRIM if that is all the export offers (OSError on failure).  A discard
        longer than one NBD request can say (a guest may discard 4 GiB and more at once) goes out in
        ``DISCARD_CHUNK`` pieces, in flight together."""
        if self.client.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            command = Command.WRITE_ZEROES
        elif self.client.flags & TransmissionFlag.SEND_TRIM:
            command = Command.TRIM
        else:
            raise OSError(errno.EOPNOTSUPP, "the export supports no discard")
        end = offset + length
        handles = [self.client.submit(command, o, min(DISCARD_CHUNK, end - o))
                   for o in range(offset, end, DISCARD_CHUNK)]
        errors = [self.client.wait(h) for h in handles]
        _check(next((e for e in errors if e), 0), "discard")

    def _sync(self, command: Command, offset: int, length: int, what: str) -> None:
        _check(self.client.wait(self.client.submit(command, offset, length)), what)

    def close(self) -> None:
        """Disconnect, stop the daemon (it flushes and closes the image) and wait for it; also undoes
        whatever part of the start a failed construction got through.  Idempotent."""
        if self.client is not None and self.client.dead != "closed":
            self.client.close()
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        if self._wfd >= 0:
            os.close(self._wfd)           # the watchdog SIGTERMs the daemon
            self._wfd = -1
        if self._proc is not None:
            try:
                self._proc.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s: %s did not stop; killed", self.label, DAEMON)
                os.killpg(self._proc.pid, 9)
                self._proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
