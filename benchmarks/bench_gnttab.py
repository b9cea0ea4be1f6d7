"""Backend grant copies of 4 KiB pages vs a plain memoryview copy of the same page.

All rows run in one process on the same GuestMemory, side by side:

* plain read / plain write: ``bytes(view)`` and ``view[:] = data`` on the page (the floor);
* copy_from / copy_to: GrantTable's backend API (lock, entry check, GTF_reading/GTF_writing
  set by compare-and-swap and cleared after, bounds, the copy), v1 and v2;
* map + unmap: pin a page for a ring-style mapping and release it.

Each row runs for about ``--seconds`` (default 1), so the whole run stays well under 15 s.
"""
from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from xenkvm.machine.memory import GuestMemory  # noqa: E402
from xenkvm.xen.abi import lib  # noqa: E402
from xenkvm.xen.gnttab import GrantTable  # noqa: E402

DOMID = 1
FRAME_GPFN = 0x3000
DATA_GPFN = 0x2000
REF = 10


class Domain:
    def __init__(self) -> None:
        self.mem = GuestMemory(64 << 20)
        self.lock = threading.RLock()
        self.domid = DOMID
        self.params: dict = {}
        self.vcpus = [SimpleNamespace(id=0, up=True)]


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` (batches of 256 until ``seconds`` pass)."""
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(256):
            fn()
        n += 256
        t = time.perf_counter()
        if t >= deadline:
            return n / (t - t0)


def table(version: int) -> tuple[Domain, GrantTable]:
    d = Domain()
    t = GrantTable(d)
    assert t.set_version(version) == 0
    t.map_frame(0, FRAME_GPFN)
    gpa = (FRAME_GPFN << 12) + REF * (8 if version == 1 else 16)
    if version == 1:
        d.mem.write(gpa, struct.pack("<HHI", lib.GTF_permit_access, 0, DATA_GPFN))
    else:
        d.mem.write(gpa, struct.pack("<HHIQ", lib.GTF_permit_access, 0, 0, DATA_GPFN))
    return d, t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per row (default 1)")
    args = ap.parse_args()
    s = min(max(args.seconds, 0.05), 2.0)

    d, t1 = table(1)
    _, t2 = table(2)
    page = d.mem.view(DATA_GPFN << 12, 4096)
    data = bytes(range(256)) * 16

    def plain_read() -> None:
        bytes(page)

    def plain_write() -> None:
        page[:] = data

    def map_unmap() -> None:
        t1.map(DOMID, REF, True).unmap()

    rows = [
        ("plain read (bytes(view))", plain_read),
        ("plain write (view[:] = data)", plain_write),
        ("copy_from v1", lambda: t1.copy_from(DOMID, REF, 0, 4096)),
        ("copy_to v1", lambda: t1.copy_to(DOMID, REF, 0, data)),
        ("copy_from v2", lambda: t2.copy_from(DOMID, REF, 0, 4096)),
        ("copy_to v2", lambda: t2.copy_to(DOMID, REF, 0, data)),
        ("map + unmap v1 (rw)", map_unmap),
    ]
    results = {name: rate(fn, s) for name, fn in rows}
    base = {"read": results["plain read (bytes(view))"], "write": results["plain write (view[:] = data)"]}
    print(f"{'operation (4 KiB page)':32} {'ops/s':>12} {'MiB/s':>9} {'us/op':>8} {'vs plain':>9}")
    for name, r in results.items():
        ref = base["write"] if ("write" in name or "copy_to" in name) else base["read"]
        extra = f"{ref / r:8.1f}x" if not name.startswith("map") else ""
        print(f"{name:32} {r:12,.0f} {r * 4096 / 2**20:9,.0f} {1e6 / r:8.2f} {extra:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
