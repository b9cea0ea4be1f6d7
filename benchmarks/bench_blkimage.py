"""A qcow2 image (qemu-storage-daemon over NBD) beside the same workload on a raw image, one run.

The backend alone, fed by the freestanding blkfront (``xk.blk_bench``, as
bench_blkback.py: a two-page ring kept full of sequential 4 KiB and 64 KiB
writes and reads, persistent grants), twice: on a raw image (the C
preadv/pwritev fast path) and on a qcow2 image of the same size (every request
through backends/nbd.py to its own qemu-storage-daemon, up to 16 in flight).
Both images are allocated in full first (the qcow2 one with
``preallocation=full``), in the same directory, through the page cache.
*busy* is the backend's own serving time (for qcow2 it includes waiting for
the daemon's replies), *wall* what the guest saw; the last column is qcow2's
busy throughput as a fraction of raw's.  ``--reqs`` requests per row,
``--batch N`` requests per kick (1: queue depth 1).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_blkback import IMAGE_MIB, run_backend  # noqa: E402  (this script's folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reqs", type=int, default=4096, help="requests per row (default 4096)")
    ap.add_argument("--batch", type=int, default=0, help="requests per kick (default: a full ring)")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(HERE.parent / "guests")], check=True)
    with tempfile.TemporaryDirectory(prefix="xkbench", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        raw, qcow2 = Path(tmp) / "bench.img", Path(tmp) / "bench.qcow2"
        with open(raw, "wb") as f:
            for _ in range(IMAGE_MIB):
                f.write(bytes(1 << 20))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(qcow2),
                        f"{IMAGE_MIB}M"], check=True)
        os.environ.setdefault("XENSTORED_PATH", str(Path(tmp) / "xs.sock"))
        runs = {fmt: run_backend(img, args.reqs, "persistent", args.batch, fmt)
                for fmt, img in (("raw", raw), ("qcow2", qcow2))}
    print(f"{'row':<18} {'backend busy':>24} {'guest wall':>22} {'qcow2/raw (busy)':>17}")
    for i, first in enumerate(runs["raw"]):
        n, size = first["count"], first["kib"] << 10
        for fmt, rows in runs.items():
            r = rows[i]
            assert r["served"] == n, f"backend served {r['served']} of {n}"
            ratio = f"{first['busy'] / r['busy']:>16.2f}x" if fmt == "qcow2" else ""
            print(f"{r['op'] + ' ' + str(r['kib']) + 'K ' + fmt:<18} "
                  f"{n / r['busy']:>9.0f} req/s {n * size / r['busy'] / 1e6:>7.1f} MB/s "
                  f"{n / r['wall']:>7.0f} req/s {n * size / r['wall'] / 1e6:>6.1f} MB/s {ratio}")
    for fmt, rows in runs.items():
        print(f"event latency ({fmt}, batch {args.batch or 'ring'}): {rows[-1]['latency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
