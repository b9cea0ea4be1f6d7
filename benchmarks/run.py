"""`make bench`: run every benchmark script in this folder, each in its own process.

Each benchmark compares against its own baseline measured in the same run
(ratios, never pass/fail thresholds).  Order: cheap ones first.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_pio.py", "bench_xenstore.py", "bench_hypercall.py", "bench_boot.py", "bench_rig.py"]
#: extra rows some benchmarks show in `make bench`: FIFO channels (notifies through Python) beside the
#: default 2-level, and the disk with blkfront's stock 32 segments beside xenkvm guests' 256
ARGS = {"bench_diskguest.py": ["--fifo-on", "--guest-arg", "xen_blkfront.max_indirect_segments=32"],
        "bench_rig_net.py": ["--fifo-on"]}


def main() -> int:
    scripts = [HERE / n for n in ORDER if (HERE / n).exists()]
    scripts += sorted(p for p in HERE.glob("bench_*.py") if p.name not in ORDER)
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        t = time.monotonic()
        rc = subprocess.call([sys.executable, str(script), *ARGS.get(script.name, [])])
        print(f"--- {script.name}: exit {rc}, {time.monotonic() - t:.1f} s", flush=True)
        if rc:
            failed.append(script.name)
    if failed:
        print(f"\nbenchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
