"""Hypercall round trip per trap kind (xen_version, a no-op) beside the raw port-I/O exit floor.

One process, side by side: the same marker-timed loop of N iterations in a raw
32-bit guest, each iteration one exit:

* floor (C):        KVM_RUN on port-I/O exits in a C loop, no Python at all;
* port exit:        the Machine run loop dispatching a port-I/O exit to a device;
* hypercall-page:   `call page+17*32` -> port exit -> dispatcher -> xen_version;
* breakpoint:       `call stub` (vmcall; ret) -> debug exit -> dispatcher -> RIP += 3;
* patch:            the same stub, rewritten before the run to `out %eax,$0xea; nop; ret`
                    -> port exit -> dispatcher (no debug registers);
* page, no dispatch: the hypercall-page guest again, with a hook that only sets RAX:
                    the same guest instructions and exits without the Xen dispatcher, so
                    trap-row / this-row is the dispatcher's own overhead.

On PVM hosts the guest's ring-0 instructions are emulated (~1.5 M/s), so the
call/ret and stub instructions around each exit cost microseconds by themselves.

The issue's target: dispatch overhead (trap row / port-exit row) at most 2x.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import guestgen  # noqa: E402
from bench_pio import PORT, bench_machine, bench_raw  # noqa: E402
from xenkvm.build import build_machine  # noqa: E402
from xenkvm.config import GuestConfig, HypercallTrap, XenConfig  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.machine.machine import Machine  # noqa: E402


class Marker:
    """Records the time of each write to the marker port."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.times.append(time.perf_counter())


def bench_trap(code: bytes, trap: HypercallTrap, n: int, dispatch: bool = True) -> float:
    kernel = Path("/tmp") / f"xenkvm-bench-{trap.value}.elf"
    kernel.write_bytes(guestgen.pvh_elf(code))
    cfg = GuestConfig(name="bench", kernel=kernel, memory=32 << 20, console="none",
                      xen=XenConfig(hypercall_trap=trap))
    m = build_machine(cfg, sink=ConsoleSink(None))
    marker = Marker()
    m.bus.register(PORT, 1, marker)
    if not dispatch:
        from xenkvm.machine import layout

        def no_dispatch(vcpu) -> None:
            regs = vcpu.sync_regs()
            regs.rax = 0
            vcpu.mark_regs_dirty(regs)
        m.boot = _boot_then(m, lambda: m.register_port_hook(layout.HYPERCALL_PORT, no_dispatch))
    try:
        result = m.run()
    finally:
        m.close()
    if len(marker.times) != 2:
        raise RuntimeError(f"{trap.value}: guest did not finish ({result.message})")
    return (marker.times[1] - marker.times[0]) / n


def _boot_then(m: Machine, after):
    boot = m.boot

    def wrapped() -> None:
        boot()
        after()
    return wrapped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    pio = Path("/tmp") / "xenkvm-bench-pio.elf"
    pio.write_bytes(guestgen.pvh_elf(guestgen.pio_loop(PORT)))
    rows: dict[str, list[float]] = {"floor (C loop, no Python)": [], "port exit, Machine loop": [],
                                    "page, no dispatch": [], "hypercall-page trap": [], "breakpoint trap": [],
                                    "patch trap": []}
    if os.environ.get("XENKVM_RIG"):  # docs/hw-rig.md: QEMU TCG fires no DR breakpoints of a nested guest
        print("breakpoint trap: skipped in the hardware rig (QEMU TCG does not fire a nested guest's "
              "debug-register breakpoints)")
        del rows["breakpoint trap"]
    for _ in range(args.rounds):
        rows["floor (C loop, no Python)"].append(bench_raw(pio, args.n)[0])
        rows["port exit, Machine loop"].append(bench_machine(pio, args.n))
        rows["page, no dispatch"].append(bench_trap(
            guestgen.xen_version_via_page_program(args.n, PORT), HypercallTrap.HYPERCALL_PAGE, args.n, False))
        rows["hypercall-page trap"].append(bench_trap(
            guestgen.xen_version_via_page_program(args.n, PORT), HypercallTrap.HYPERCALL_PAGE, args.n))
        if "breakpoint trap" in rows:
            rows["breakpoint trap"].append(bench_trap(
                guestgen.xen_version_via_vmcall_program(args.n, PORT), HypercallTrap.BREAKPOINT, args.n))
        rows["patch trap"].append(bench_trap(
            guestgen.xen_version_via_vmcall_program(args.n, PORT), HypercallTrap.PATCH, args.n))
    floor = min(rows["floor (C loop, no Python)"])
    port = min(rows["port exit, Machine loop"])
    same = min(rows["page, no dispatch"])
    print(f"xen_version hypercall round trip, {args.n} calls x {args.rounds} rounds (best of rounds)")
    print(f"{'path':<28} {'us/call':>9} {'calls/s':>10} {'x floor':>8} {'x port exit':>12} {'x no-dispatch':>14}")
    for name, values in rows.items():
        best = min(values)
        print(f"{name:<28} {best * 1e6:9.2f} {1 / best:10.0f} {best / floor:8.2f} {best / port:12.2f}"
              f" {best / same:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
