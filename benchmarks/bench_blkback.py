"""The block backend alone, fed by the freestanding blkfront, beside the host file floor.

One run, side by side, on the same 64 MiB image in the same directory:

* **backend**: guests/xen_blkfront.c (``xk.blk_bench``) keeps a two-page ring
  (64 requests) full of sequential 4 KiB (one segment) and 64 KiB (indirect,
  16 segments) writes and reads, one kick per batch, three ways:
  *persistent* (feature-persistent: the C fast path on the kept pages), *map*
  (no persistent grants: the C fast path claims each page's grant entry for
  its request, preadv/pwritev straight into the pages; the Python mapping path
  only for what it leaves) and *copy* (no persistent grants: the grant copy API
  through one preallocated buffer, as QEMU's xen-block does, in Python).  Two
  figures per row: *busy* is the backend's own time (its worker serving
  kicks: ring copy-out, checks, grant lookups, preadv/pwritev, responses,
  notify), i.e. the ceiling of the backend itself; *wall* is what the guest
  saw from first request to last response (includes the guest building
  requests, its hypercalls and event delivery: on a PVM host the guest's
  ring 0 is emulated, so that figure is mostly the guest);
* **python floor**: ``os.pwritev``/``os.preadv`` of the same sizes, sequential,
  from one preallocated buffer, in this process;
* **dd floor**: ``dd`` with the same block size and count (``conv=notrunc``).

All through the page cache (the backend does no O_DIRECT), on an image
written in full first so no row pays for allocating it.  The ratio is the
backend's busy throughput as a fraction of the Python floor's.  ``--reqs`` sets the request count per row,
``--batch N`` the requests per kick (1: queue depth 1, one round trip each), ``--modes`` the rows run;
each mode's run ends with the backend's event-path latencies (xenkvm/backends/latency.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchlib import ConsoleLines  # noqa: E402  (this script's folder)
from xenkvm.config import GuestConfig, XenConfig  # noqa: E402
from xenkvm.diskspec import parse_disk  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.build import build_machine, xen_domain  # noqa: E402
from xenkvm.machine.machine import ExitStatus  # noqa: E402

IMAGE_MIB = 64


class Marks(ConsoleLines):
    """Turns the guest's BENCH-START/BENCH-END lines into per-row host timings and backend stats."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.device = None
        self._cur: dict | None = None

    def line(self, line: str) -> None:
        stats = self.device.sync_stats() if self.device is not None else {"busy_ns": 0, "requests": 0}
        if line.startswith("BENCH-START"):
            _, op, kib, count = line.split()
            self._cur = {"op": op, "kib": int(kib), "count": int(count), "t0": time.perf_counter(),
                         "busy0": stats["busy_ns"], "req0": stats["requests"]}
        elif line == "BENCH-END" and self._cur is not None:
            c = self._cur
            c["wall"] = time.perf_counter() - c["t0"]
            c["busy"] = (stats["busy_ns"] - c["busy0"]) / 1e9
            c["served"] = stats["requests"] - c["req0"]
            self.rows.append(c)
            self._cur = None


def run_backend(image: Path, reqs: int, mode: str, batch: int = 0, fmt: str = "raw") -> list[dict]:
    """One guest run; ``mode``: persistent or map (C fast path) or copy (per-request grant copies, Python);
    ``batch``: requests per kick (0: a full ring); ``fmt``: the image's format (bench_blkimage.py)."""
    kernel = ROOT / "guests" / "out" / "xen_blkfront.elf"
    extra = "" if mode == "persistent" else " xk.blk_bench_nopersist"
    extra += f" xk.blk_bench_batch={batch}" if batch else ""
    cfg = GuestConfig(name="bench-blkback", kernel=kernel,
                      cmdline=f"xk.trap=page xk.blk_bench xk.blk_bench_reqs={reqs}{extra}",
                      memory=64 << 20, vcpus=1, console="none", xen=XenConfig(),
                      disks=(parse_disk(f"format={fmt}, vdev=xvda, {'' if mode == 'persistent' else 'no-'}persistent, "
                                        f"target={image}", image.parent),))
    marks = Marks()
    sink = ConsoleSink(None)
    sink.add_listener(marks.feed)
    m = build_machine(cfg, sink=sink)
    marks.device = xen_domain(m).devices.find("xvda").device
    marks.device.grant_copy = mode == "copy"
    try:
        result = m.run()
    finally:
        m.close()
    if marks.rows:      # the whole run's (last 4096 kicks') event-path latencies
        marks.rows[-1]["latency"] = marks.device.latency.line()
    if result.status is not ExitStatus.POWEROFF or len(marks.rows) != 4:
        raise SystemExit(f"bench guest: {result.status.name} {result.message}; rows {len(marks.rows)}")
    return marks.rows


def python_floor(image: Path, op: str, kib: int, count: int) -> float:
    size = kib << 10
    buf = bytearray(size)
    span = (IMAGE_MIB << 20) - size
    fd = os.open(image, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        off = 0
        for _ in range(count):
            if op == "write":
                os.pwritev(fd, [buf], off)
            else:
                os.preadv(fd, [buf], off)
            off = (off + size) % span
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def dd_floor(image: Path, op: str, kib: int, count: int) -> tuple[float, int]:
    count = min(count, (IMAGE_MIB << 10) // kib)
    args = ["if=/dev/zero", f"of={image}", "conv=notrunc"] if op == "write" else [f"if={image}", "of=/dev/null"]
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, f"bs={kib}k", f"count={count}", "status=none"], check=True)
    return time.perf_counter() - t0, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reqs", type=int, default=4096, help="requests per row (default 4096)")
    ap.add_argument("--batch", type=int, default=0,
                    help="requests per kick (default: a full ring; 1: queue depth 1, a round trip each)")
    ap.add_argument("--modes", default="persistent,map,copy", help="comma-separated subset of the rows' modes")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    with tempfile.TemporaryDirectory(prefix="xkbench", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        image = Path(tmp) / "bench.img"
        with open(image, "wb") as f:   # written, not sparse: every row starts with the pages cached
            for _ in range(IMAGE_MIB):
                f.write(bytes(1 << 20))
        os.environ.setdefault("XENSTORED_PATH", str(Path(tmp) / "xs.sock"))
        runs = {mode: run_backend(image, args.reqs, mode, args.batch) for mode in args.modes.split(",")}
        print(f"{'row':<24} {'backend busy':>24} {'guest wall':>22} {'python floor':>24} {'dd floor':>10} "
              f"{'busy/floor':>10}")
        for i, first in enumerate(runs["persistent"]):
            n, size = first["count"], first["kib"] << 10
            py = python_floor(image, first["op"], first["kib"], n)
            dd_t, dd_n = dd_floor(image, first["op"], first["kib"], n)
            mb = lambda secs, cnt=n: cnt * size / secs / 1e6  # noqa: E731
            for mode, rows in runs.items():
                r = rows[i]
                assert r["served"] == n, f"backend served {r['served']} of {n}"
                print(f"{r['op'] + ' ' + str(r['kib']) + 'K ' + mode:<24} "
                      f"{n / r['busy']:>9.0f} req/s {mb(r['busy']):>7.1f} MB/s "
                      f"{n / r['wall']:>7.0f} req/s {mb(r['wall']):>6.1f} MB/s "
                      f"{n / py:>9.0f} req/s {mb(py):>7.1f} MB/s {mb(dd_t, dd_n):>5.0f} MB/s "
                      f"{py / r['busy']:>9.2f}x")
    for mode, rows in runs.items():
        print(f"event latency ({mode}, batch {args.batch or 'ring'}): {rows[-1]['latency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
