"""Restore-to-running time of a snapshot, lazy and prefaulted, beside the boot it replaces.

    python benchmarks/bench_snapshot.py [--sizes 256M,2G] [--repeat 3]

For each guest RAM size, guests/snapshot.elf is booted (its RAM size overridden) and
asks for a snapshot (``Machine.snapshot_on_port``); the *boot* time is from building the
Machine to that request.  The snapshot is then restored ``--repeat`` times lazily
(RAM mapped MAP_PRIVATE, read on first touch) and as often prefaulted (MAP_POPULATE);
*restore-to-running* is from calling ``build.restore_machine`` to the guest's first
console byte after resuming ("after snapshot").  Also shown: how long the vCPUs were
paused to write the snapshot, and the RAM file's apparent and allocated sizes (holes).
Medians; every run must complete its checks, or the benchmark fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xenkvm.build import build_machine, restore_machine  # noqa: E402
from xenkvm.config import load_config, parse_size  # noqa: E402
from xenkvm.machine import layout  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.machine.status import ExitStatus  # noqa: E402

PASSED = b"SUMMARY: 5 passed, 0 failed"


class FirstByte(ConsoleSink):
    """A silent sink that notes when the guest first wrote to it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.first: float | None = None
        self.started = threading.Event()

    def write(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.monotonic()
        super().write(data)


def _finish(machine, sink: ConsoleSink, what: str) -> None:
    try:
        result = machine.run()
    finally:
        machine.close()
    if result.status is not ExitStatus.POWEROFF or PASSED not in sink.tail():
        raise SystemExit(f"{what}: the guest did not pass its checks: {result.message}\n"
                         f"{sink.tail().decode(errors='replace')[-2000:]}")


def boot_and_snapshot(memory: int, path: str) -> tuple[float, float]:
    """Boot the guest to its snapshot request: (boot seconds, vCPUs paused while saving)."""
    cfg = dataclasses.replace(load_config(str(ROOT / "guests/snapshot.yaml")), memory=memory, console="none")
    sink = ConsoleSink(None)
    t0 = time.monotonic()
    machine = build_machine(cfg, sink=sink)
    asked: list[float] = []
    done = threading.Event()

    def on_port(vcpu) -> None:
        asked.append(time.monotonic())
        machine.request_snapshot(path, lambda outcome: done.set())
    machine.register_port_hook(layout.SNAPSHOT_PORT, on_port)
    _finish(machine, sink, "boot")
    done.wait(60)
    info = machine.snapshot_results[-1]
    if isinstance(info, Exception):
        raise SystemExit(f"snapshot failed: {info}")
    return asked[0] - t0, info.paused_s


def restore_once(path: str, prefault: bool) -> float:
    sink = FirstByte()
    t0 = time.monotonic()
    machine = restore_machine(path, prefault=prefault, sink=sink)
    _finish(machine, sink, "restore")
    assert sink.first is not None
    return sink.first - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256M,2G")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'RAM':>6} {'boot s':>8} {'paused s':>9} {'file MiB':>9} {'on disk MiB':>12} "
          f"{'lazy s':>8} {'prefault s':>11}")
    with tempfile.TemporaryDirectory(prefix="xk-bench-snap-") as tmp:
        for size in args.sizes.split(","):
            memory = parse_size(size)
            path = os.path.join(tmp, f"guest-{size}.snap")
            boot_s, paused_s = boot_and_snapshot(memory, path)
            st = os.stat(path + ".ram")
            lazy = statistics.median(restore_once(path, False) for _ in range(args.repeat))
            pre = statistics.median(restore_once(path, True) for _ in range(args.repeat))
            print(f"{size:>6} {boot_s:8.3f} {paused_s:9.3f} {st.st_size / 2**20:9.0f} "
                  f"{st.st_blocks * 512 / 2**20:12.1f} {lazy:8.3f} {pre:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
