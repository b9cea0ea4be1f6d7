"""Port-I/O exit round trip: our run loop vs the same exit with no Python work (the floor).

All three rows run the same guest (``out 0x10, al`` in a loop) in one process,
side by side, so their ratio is meaningful on a noisy machine:

* floor:     N KVM_RUN ioctls in a C loop (lib.xk_pio_floor), no Python at all;
* bare:      the Python ``Vcpu.run()`` call and nothing else;
* machine:   the full Machine run loop: exit-table dispatch, PortBus, a device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import guestgen  # noqa: E402
from xenkvm.config import GuestConfig  # noqa: E402
from xenkvm.kvm._kvm_cffi import lib  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.machine.machine import ExitStatus, Machine  # noqa: E402

PORT = 0x10


class Counter:
    """Counts writes to the benchmark port; stops the machine after ``n``."""

    def __init__(self, machine: Machine, n: int):
        self.machine, self.n, self.count = machine, n, 0
        self.t0 = self.t1 = 0.0

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.count += 1
        if self.count == 1:
            self.t0 = time.perf_counter()
        elif self.count == self.n + 1:
            self.t1 = time.perf_counter()
            self.machine.stop(ExitStatus.POWEROFF, "benchmark done")


def new_machine(kernel: Path) -> Machine:
    cfg = GuestConfig(name="bench", kernel=kernel, memory=32 << 20, console="none")
    return Machine(cfg, sink=ConsoleSink(None))


def bench_machine(kernel: Path, n: int) -> float:
    m = new_machine(kernel)
    counter = Counter(m, n)
    m.bus.register(PORT, 1, counter)
    try:
        m.run()
    finally:
        m.close()
    return (counter.t1 - counter.t0) / n


def bench_raw(kernel: Path, n: int) -> tuple[float, float]:
    """(floor, bare-python) seconds per exit, on one booted vCPU."""
    m = new_machine(kernel)
    try:
        m.boot()
        v = m.vcpus[0]
        while v.run() != lib.KVM_EXIT_IO or v.exit_io.port != PORT:
            pass
        t = time.perf_counter()
        done = lib.xk_pio_floor(v.fd, v.run_struct, n, PORT)
        floor = (time.perf_counter() - t) / n
        if done != n:
            raise RuntimeError(f"floor loop ended early: {done}")
        run = v.run
        t = time.perf_counter()
        for _ in range(n):
            run()
        bare = (time.perf_counter() - t) / n
    finally:
        m.close()
    return floor, bare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000, help="exits per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    kernel = Path("/tmp") / "xenkvm-bench-pio.elf"
    kernel.write_bytes(guestgen.pvh_elf(guestgen.pio_loop(PORT)))
    rows: dict[str, list[float]] = {"floor (C loop, no Python)": [], "bare Python KVM_RUN": [],
                                    "Machine run loop + PortBus": []}
    for _ in range(args.rounds):
        floor, bare = bench_raw(kernel, args.n)
        rows["floor (C loop, no Python)"].append(floor)
        rows["bare Python KVM_RUN"].append(bare)
        rows["Machine run loop + PortBus"].append(bench_machine(kernel, args.n))
    base = min(rows["floor (C loop, no Python)"])
    print(f"port-I/O exit round trip, {args.n} exits x {args.rounds} rounds (best of rounds)")
    print(f"{'path':<30} {'us/exit':>9} {'exits/s':>10} {'x floor':>8}")
    for name, values in rows.items():
        best = min(values)
        print(f"{name:<30} {best * 1e6:9.2f} {1 / best:10.0f} {best / base:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
