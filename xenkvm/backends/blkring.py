"""The host half of a vbd: the disk (file or block device) and the blkif rings mapped from grants.

``open_rings`` reads what the frontend published (io/blkif.h): ``ring-ref`` or
``ring-page-order`` + ``ring-refN`` (at most ``max-ring-page-order``),
``event-channel``, and with ``multi-queue-num-queues`` > 1 the same keys under
``queue-N/`` for each queue (at most ``multi-queue-max-queues``).  Every key is
the guest's and checked: a missing or malformed one, a ring grant that does not
map or a port that is not unbound to dom0 is a ConnectError (one line), and
whatever was mapped or bound by then is released.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Callable

from xenkvm.diskspec import DiskSpec
from xenkvm.xen.evtchn import EvtchnError
from xenkvm.xen.gnttab import GrantError

from ._blkif_cffi import ffi, lib
from .grants import SegmentMapper
from .xenbus import ConnectError, bind_kick

SECTOR = 512                         #: blkif sector numbers are always 512-byte units
PAGE = 4096
MAX_RING_PAGE_ORDER = 4              #: XENBUS_MAX_RING_GRANT_ORDER
MAX_QUEUES = 4                       #: multi-queue-max-queues (Linux blkfront's default max_queues)
_BLKGETSIZE64, _BLKSSZGET, _BLKPBSZGET, _BLKDISCARD = 0x80081272, 0x1268, 0x127B, 0x1277


def _ioctl_int(fd: int, req: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, req, buf)
    return struct.unpack(fmt, buf)[0]


def open_disk(spec: DiskSpec):
    """The I/O source of a vbd: a raw file or block device (``Disk``, served by preadv/pwritev, in C
    when it can), or any other format through qemu-storage-daemon over NBD (imagedisk.py)."""
    if spec.format == "raw":
        return Disk(spec)
    from .imagedisk import ImageDisk
    return ImageDisk(spec)


class Disk:
    """The host side: an open file or block device and its geometry."""

    pipelined = False      #: each request completes before the next (ImageDisk keeps several in flight)

    def __init__(self, spec: DiskSpec):
        flags = (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(spec.target, flags)
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = _ioctl_int(self.fd, _BLKGETSIZE64, "Q")
            self.sector_size = _ioctl_int(self.fd, _BLKSSZGET, "i")
            self.physical_sector_size = _ioctl_int(self.fd, _BLKPBSZGET, "I")
        else:
            self.size = st.st_size
            self.sector_size = SECTOR
            self.physical_sector_size = max(SECTOR, st.st_blksize if st.st_blksize <= 65536 else PAGE)
        self.sectors = self.size // SECTOR
        self.is_block = stat.S_ISBLK(st.st_mode)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a byte range: a hole in a file, BLKDISCARD on a block device (OSError on failure)."""
        if self.is_block:
            fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("QQ", offset, length))
            return
        rc = lib.xkb_punch_hole(self.fd, offset, length)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def flush(self) -> None:
        """What was written is on the medium (OSError if not)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlkifRing:
    """The back end of one blkif ring mapped from granted pages."""

    def __init__(self, mappings: list, port: int, segments: SegmentMapper):
        self.mappings = mappings
        self.port = port
        self.segments = segments
        self._bufs = [ffi.from_buffer(m.view) for m in mappings]
        self.pages = ffi.new("char *[]", self._bufs)
        self.nr_ents = lib.xkb_ring_size(len(mappings))
        self.req_cons = ffi.new("uint32_t *")
        self.rsp_prod = ffi.new("uint32_t *")
        self.reqs = ffi.new("blkif_request_t[]", self.nr_ents)
        self.rsps = ffi.new("blkif_response_t[]", self.nr_ents)
        self.slow = ffi.new("int[]", self.nr_ents)
        self.counts = ffi.new("int[3]")     #: xkb_pass: taken, the slow batch's size, its slow ones
        self.broken = False

    def close(self, domain) -> None:
        """Close the event channel, unmap the persistent pages and the ring."""
        domain.evtchn.close_vmm_port(self.port)
        self.segments.clear()
        self._bufs.clear()
        for m in self.mappings:
            m.unmap()
        self.mappings = []


def open_rings(domain, keys: dict[str, str], kick: Callable[[], None] | int,
               offered_persistent: bool = True) -> list[BlkifRing]:
    """Map and bind every queue the frontend set up; all or nothing.

    ``kick``: the worker's eventfd each queue's port is bound to (xen/fastpath.py: a guest's
    kick wakes the worker from the vCPU's C loop), or a callback run in the sender's thread.
    Persistent grants are used when the frontend asks for them and the backend offered them
    (``offered_persistent``: its ``feature-persistent``), as Linux's blkback decides."""
    protocol = keys.get("protocol", "x86_64-abi") or "x86_64-abi"
    if protocol != "x86_64-abi":
        raise ConnectError(f"protocol {protocol[:32]!r} not supported (x86_64-abi only)")
    persistent = offered_persistent and keys.get("feature-persistent", "0").strip() == "1"
    queues = 1
    if "multi-queue-num-queues" in keys:
        queues = _number(keys, "multi-queue-num-queues", MAX_QUEUES + 1)
        if queues == 0:
            raise ConnectError("multi-queue-num-queues 0")
    rings: list[BlkifRing] = []
    try:
        for q in range(queues):
            sub = keys if queues == 1 else {k[len(f"queue-{q}/"):]: v for k, v in keys.items()
                                             if k.startswith(f"queue-{q}/")}
            rings.append(_open_ring(domain, sub, kick, persistent, f"queue-{q}/" if queues > 1 else ""))
    except ConnectError:
        for ring in rings:
            ring.close(domain)
        raise
    return rings


def _open_ring(domain, keys: dict[str, str], kick, persistent: bool, where: str) -> BlkifRing:
    refs = _ring_refs(keys, where)
    port = _number(keys, "event-channel", 1 << 17, where)
    try:
        mappings = domain.gnttab.map_refs(domain.domid, refs, True)
    except GrantError as e:
        raise ConnectError(f"{where}ring-ref {refs}: {e}") from None
    try:
        bind_kick(domain, port, kick)
    except EvtchnError as e:
        for m in mappings:
            m.unmap()
        raise ConnectError(f"{where}event-channel {port}: {e}") from None
    return BlkifRing(mappings, port, SegmentMapper(domain.gnttab, domain.domid, persistent))


def _number(keys: dict[str, str], name: str, limit: int, where: str = "") -> int:
    raw = keys.get(name)
    if raw is None:
        raise ConnectError(f"no {where}{name}")
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ConnectError(f"{where}{name} {raw[:32]!r} is not a number") from None
    if not 0 <= value < limit:
        raise ConnectError(f"{where}{name} {value} out of range")
    return value


def _ring_refs(keys: dict[str, str], where: str = "") -> list[int]:
    """``ring-ref``, or ``ring-page-order`` (at most our max-ring-page-order) + ``ring-ref0..N-1``."""
    if "ring-page-order" not in keys:
        return [_number(keys, "ring-ref", 1 << 32, where)]
    order = _number(keys, "ring-page-order", MAX_RING_PAGE_ORDER + 1, where)
    return [_number(keys, f"ring-ref{i}", 1 << 32, where) for i in range(1 << order)]
