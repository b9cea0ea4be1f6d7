"""Guest memory as a sparse file that a restore maps copy-on-write.

Layout: one header page (:data:`HEADER`: magic, the snapshot id, the data size), then each
saved region's bytes at a page-aligned offset.  Only non-zero 4 KiB pages are written, found
with one numpy reduction per region (no per-byte Python); zero pages stay holes, so the file
costs disk only for what the guest touched.  A restore maps each region ``MAP_PRIVATE`` from
the file: pages are read on first touch and the guest's writes go to private copies, so
restore cost does not grow with RAM and the file stays unchanged for the next restore.
``prefault`` maps the data pages in up front (MADV_POPULATE_READ on the data extents), so the
guest takes no faults on them while running; holes stay lazy.

The file's identity (snapshot id) and size are checked at restore; its content is not
checksummed (that would read every page and defeat the lazy restore): docs/snapshots.md.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from xenkvm.machine.snapshot.format import SnapshotError

PAGE = 4096
RAM_MAGIC = b"XKSNRAM\n"
HEADER = struct.Struct("<8s16sQ")   #: magic, snapshot id (16 bytes), bytes of region data
MADV_POPULATE_READ = 22             #: <linux/mman.h> (5.14); Python's mmap module lacks the name
#: what a writer hands in: (name, gpa, bytes of the region, host address if it is anonymous
#: memory, else None), e.g. machine.memory.Region fields
RegionData = tuple[str, int, memoryview, "int | None"]
PAGEMAP_PRESENT_OR_SWAPPED = np.uint64(3 << 62)   #: /proc/pid/pagemap bits 63 and 62
SCAN_CHUNK = 4096                                  #: pages compared per numpy step (16 MiB)


@dataclass(frozen=True)
class RamRegion:
    """One region in the RAM file: where the guest sees it and where its bytes are."""

    name: str
    gpa: int
    size: int
    offset: int

    def to_json(self) -> dict:
        return {"name": self.name, "gpa": self.gpa, "size": self.size, "offset": self.offset}

    @classmethod
    def from_json(cls, d: dict) -> "RamRegion":
        r = cls(str(d["name"]), int(d["gpa"]), int(d["size"]), int(d["offset"]))
        if r.size <= 0 or r.size % PAGE or r.offset % PAGE or r.gpa % PAGE or r.offset < PAGE:
            raise ValueError(f"RAM region {r.name}: bad geometry")
        return r


def nonzero_pages(view: memoryview, candidates: np.ndarray | None = None) -> np.ndarray:
    """Indices of the 4 KiB pages of ``view`` that hold any non-zero byte (among ``candidates``)."""
    words = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE // 8)
    if candidates is None:
        return np.flatnonzero(words.any(axis=1))
    found = [c[words[c].any(axis=1)] for c in (candidates[i:i + SCAN_CHUNK]
                                                for i in range(0, len(candidates), SCAN_CHUNK))]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def touched_pages(host_addr: int, npages: int) -> np.ndarray | None:
    """Pages of an anonymous mapping that were ever faulted in (present or swapped out), from
    /proc/self/pagemap; the others are zero and need not be read (reading them would also map
    the zero page into each).  None when pagemap cannot be read: scan everything then."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(host_addr // PAGE * 8)
            raw = f.read(npages * 8)
    except OSError:
        return None
    if len(raw) != npages * 8:
        return None
    return np.flatnonzero(np.frombuffer(raw, dtype=np.uint64) & PAGEMAP_PRESENT_OR_SWAPPED)


def _runs(pages: np.ndarray) -> Iterable[tuple[int, int]]:
    """(first, count) runs of consecutive page indices."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends)]


def write_ram(path: str, snapshot_id: bytes, regions: list[RegionData]) -> tuple[list[RamRegion], int]:
    """Write the RAM file; returns its regions and how many pages were written (non-zero)."""
    layout, offset = [], PAGE
    for name, gpa, view, _anon in regions:
        layout.append(RamRegion(name, gpa, len(view), offset))
        offset += len(view)
    written = 0
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, offset)  # all holes; only non-zero pages get blocks
        os.pwrite(fd, HEADER.pack(RAM_MAGIC, snapshot_id, offset - PAGE), 0)
        for r, (_name, _gpa, view, anon) in zip(layout, regions):
            candidates = touched_pages(anon, len(view) // PAGE) if anon is not None else None
            for first, count in _runs(nonzero_pages(view, candidates)):
                os.pwrite(fd, view[first * PAGE:(first + count) * PAGE], r.offset + first * PAGE)
                written += count
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return layout, written


def open_ram(path: str, snapshot_id: bytes, layout: list[RamRegion]) -> int:
    """Open and check the RAM file (identity, size); returns a read-only fd for :func:`map_region`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open the snapshot's RAM file: {e.strerror or e}") from None
    try:
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size or not head.startswith(RAM_MAGIC):
            raise SnapshotError(f"{path}: not a xenkvm snapshot RAM file")
        _magic, sid, size = HEADER.unpack(head)
        if sid != snapshot_id:
            raise SnapshotError(f"{path}: the RAM file belongs to another snapshot")
        need = max((r.offset + r.size for r in layout), default=PAGE)
        if size != need - PAGE or os.fstat(fd).st_size < need:
            raise SnapshotError(f"{path}: truncated RAM file ({os.fstat(fd).st_size} bytes, need {need})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_region(fd: int, region: RamRegion, prefault: bool) -> mmap.mmap:
    """``region`` of the RAM file mapped private and writable (copy-on-write).

    ``prefault`` maps in the pages that hold data now (MADV_POPULATE_READ on each data
    extent the file system reports: SEEK_DATA/SEEK_HOLE), not the holes: MAP_POPULATE
    would read every hole page into the page cache too (measured: 28 s for a 2 GiB guest).
    """
    mm = mmap.mmap(fd, region.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=region.offset)
    if prefault:
        for start, length in data_extents(fd, region.offset, region.size):
            _populate(mm, start - region.offset, length)
    return mm


def data_extents(fd: int, offset: int, size: int) -> list[tuple[int, int]]:
    """(file offset, length) of the data (non-hole) ranges in [offset, offset+size)."""
    out, pos, end = [], offset, offset + size
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:      # ENXIO: no data after pos
            break
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out


def _populate(mm: mmap.mmap, start: int, length: int) -> None:
    """Fault ``[start, start+length)`` of ``mm`` in for reading, in one call where the kernel can."""
    start_page = start - start % PAGE
    try:
        mm.madvise(MADV_POPULATE_READ, start_page, start + length - start_page)
    except OSError:         # before Linux 5.14: touch one byte per page (a strided numpy read)
        np.frombuffer(mm, dtype=np.uint8, count=length, offset=start)[::PAGE].sum()
