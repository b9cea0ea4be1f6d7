"""Backend grant copies of 4 KiB pages vs a plain memoryview copy of the same page.

All rows run in one process on the same GuestMemory, side by side:

* plain read / plain write: ``bytes(view)`` and ``view[:] = data`` on the page (the floor);
* copy_from / copy_to: GrantTable's backend API (lock, entry check, GTF_reading/GTF_writing
  set by compare-and-swap and cleared after, bounds, the copy), v1 and v2;
* map + unmap: pin a page for a ring-style mapping and release it;
* copy_batch: one blkif-style request of 11 segments of 4 KiB into host buffers
  (``GrantTable.copy_batch``; figures per page; skipped on a table without it);
* GNTTABOP_copy: one guest copy op (grant ref -> own gmfn, 4 KiB) through the real
  Dispatcher with an identity-mapped fake vCPU: decode, pin, copy, status write
  (no vmexit; bench_hypercall has the trap cost).

Each row runs for about ``--seconds`` (default 1), so the whole run stays well under 15 s.

``--cpu``: each row is instead the *minimum* over 25 batches of the *thread CPU
time* per operation, the figure that survives a loaded machine.  ``--tree DIR``
measures another checkout's xenkvm with this script (its cffi modules built);
``--tsv`` prints ``name<TAB>us`` lines for ``benchmarks/compare_trees.py``,
which runs both trees interleaved and prints them side by side.
"""
from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace



def _tree() -> Path:
    """The checkout to measure (``--tree DIR``, else this one): read before its xenkvm is imported."""
    if "--tree" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


ROOT = _tree()
sys.path[:0] = [str(ROOT)]

import xenkvm  # noqa: E402
from benchlib import min_thread_cpu_ns  # noqa: E402  (this script's folder)

from xenkvm.machine.memory import GuestMemory  # noqa: E402
from xenkvm.xen.abi import DOMID_SELF, GnttabOp, Hypercall, XenStruct, lib  # noqa: E402
from xenkvm.xen.dispatch import Dispatcher  # noqa: E402
from xenkvm.xen.gnttab import GrantTable  # noqa: E402
try:    # the one hypercall table; an older tree (--tree) registers per service
    from xenkvm.xen.hypercalls import table as hypercall_table  # noqa: E402
except ImportError:
    hypercall_table = None

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


class IdentityVcpu:
    id = 0

    @staticmethod
    def translate(gva: int) -> int:
        return gva


BATCH = 11          #: segments in one blkif request (BLKIF_MAX_SEGMENTS_PER_REQUEST)
COPY_GVA = 0x10000  #: where the bench guest's struct gnttab_copy lives
DST_GPFN = 0x2800
SELF_REF = REF + 1  #: a ref the bench guest grants to itself (what GNTTABOP_copy may use)


def guest_copy_op(d: "Domain", t: GrantTable) -> None:
    """Write one struct gnttab_copy (ref SELF_REF, granted by the guest to itself, -> its gmfn
    DST_GPFN, 4 KiB) for the dispatcher row; the table must be v1."""
    gpa = (FRAME_GPFN << 12) + SELF_REF * 8
    d.mem.write(gpa, struct.pack("<HHI", lib.GTF_permit_access, DOMID, DATA_GPFN))
    st = XenStruct("struct gnttab_copy")
    raw = bytearray(st.size)
    for base, u in ((lib.XK_OFF_gnttab_copy__source, SELF_REF), (lib.XK_OFF_gnttab_copy__dest, DST_GPFN)):
        struct.pack_into("<QHH", raw, base, u, DOMID_SELF, 0)
    struct.pack_into("<HH", raw, st.offset("len"), 4096, lib.GNTCOPY_source_gref)
    d.mem.write(COPY_GVA, bytes(raw))
    d.dispatcher = Dispatcher(d)
    d.gnttab = t
    if hypercall_table is not None:
        hypercall_table.install(d.dispatcher)
    else:
        t.register_hypercalls(d.dispatcher)


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


def cpu_rate(fn, n: int = 400, batches: int = 25) -> float:
    """Calls per second of ``fn`` from the minimum thread CPU time of ``batches`` batches (``--cpu``)."""
    return 1e9 / min_thread_cpu_ns(fn, n, batches)


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
    ap.add_argument("--cpu", action="store_true", help="min-of-batches thread CPU time (loaded machines)")
    ap.add_argument("--tree", metavar="DIR", help="measure this checkout's xenkvm (default: this one)")
    ap.add_argument("--tsv", action="store_true", help="print name<TAB>us lines only")
    args = ap.parse_args()
    cpu, tsv = args.cpu, args.tsv
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

    bufs = [memoryview(bytearray(4096)) for _ in range(BATCH)]
    segs = [(REF, 0, b) for b in bufs]

    def batch_from() -> None:
        t1.copy_batch(DOMID, segs, to_guest=False)

    guest_copy_op(d, t1)
    args = (GnttabOp.copy, COPY_GVA, 1, 0, 0, 0)
    vcpu = IdentityVcpu()

    def hypercall_copy() -> None:
        d.dispatcher.dispatch(vcpu, Hypercall.grant_table_op, args)

    hypercall_copy()
    status = struct.unpack_from("<h", d.mem.read(COPY_GVA + XenStruct("struct gnttab_copy").offset("status"), 2))[0]
    assert status == 0, f"the bench's GNTTABOP_copy fails: status {status}"

    rows = [
        ("plain read (bytes(view))", plain_read),
        ("plain write (view[:] = data)", plain_write),
        ("copy_from v1", lambda: t1.copy_from(DOMID, REF, 0, 4096)),
        ("copy_to v1", lambda: t1.copy_to(DOMID, REF, 0, data)),
        ("copy_from v2", lambda: t2.copy_from(DOMID, REF, 0, 4096)),
        ("copy_to v2", lambda: t2.copy_to(DOMID, REF, 0, data)),
        ("map + unmap v1 (rw)", map_unmap),
        ("GNTTABOP_copy v1 (dispatcher)", hypercall_copy),
    ]
    if hasattr(t1, "copy_batch"):
        rows.append((f"copy_batch v1 ({BATCH} pages)", batch_from))
    results = {name: (cpu_rate(fn) if cpu else rate(fn, s)) for name, fn in rows}
    for name in results:
        if name.startswith("copy_batch"):
            results[name] *= BATCH   # per page
    if tsv:
        print(f"# xenkvm from {Path(xenkvm.__file__).parents[1]}")
        for name, r in results.items():
            print(f"{name}\t{1e6 / r:.2f}")
        return 0
    base = {"read": results["plain read (bytes(view))"], "write": results["plain write (view[:] = data)"]}
    print(f"{'operation (4 KiB page)':32} {'ops/s':>12} {'MiB/s':>9} {'us/op':>8} {'vs plain':>9}")
    for name, r in results.items():
        ref = base["write"] if ("write" in name or "copy_to" in name) else base["read"]
        extra = f"{ref / r:8.1f}x" if not name.startswith(("map", "GNTTABOP")) else ""
        print(f"{name:32} {r:12,.0f} {r * 4096 / 2**20:9,.0f} {1e6 / r:8.2f} {extra:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
