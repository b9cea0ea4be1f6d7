"""Where a plain Debian boot's wall time goes in xenkvm: start-up, image loading, the run and its exits.

    python benchmarks/profile_rig_boot.py [--guest guests/linux.yaml]

Run by benchmarks/bench_rig.py inside the hardware rig (it works on any host).
Phases, each timed on its own:

* Python start-up (``python -c pass``) and xenkvm's imports (``-X importtime``:
  the slowest modules, cumulative);
* building the Machine (KVM VM, devices, CPUID) and booting it (``load_guest``:
  reading the bzImage and initrd, the boot-protocol setup);
* the run to power-off, with every VM exit counted by kind (port I/O per port and
  direction, MMIO per page, else the exit reason) and the host time in its handler;
  the rest of the run is guest time (KVM_RUN) and wake-ups.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKER = b"XENKVM-LINUX-BOOT-OK"


def subprocess_wall(code: str, runs: int = 3) -> float:
    """Best wall time of ``python -c code`` over ``runs``."""
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t)
    return best


def slowest_imports(top: int = 8) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the slowest imports of xenkvm's run path."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import xenkvm.cli, xenkvm.machine.machine"],
                       capture_output=True, text=True, cwd=ROOT)
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            if len(name) - len(name.lstrip()) <= 3:  # xenkvm's modules and what they import directly
                rows.append((int(parts[1]) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:top]


class ExitCounter:
    """Wraps each exit handler: count and host seconds per exit kind (port I/O per port and
    direction, MMIO per page, the rest per exit reason)."""

    def __init__(self, handlers: dict, names: dict[int, str], io_out: int):
        self.io_out = io_out
        self.count: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self.names = names
        self.wrapped = {reason: self._wrap(reason, h) for reason, h in handlers.items()}

    def kind(self, reason: int, vcpu) -> str:
        name = self.names.get(reason, str(reason))
        if name == "IO":
            io = vcpu.exit_io
            return f"IO {'out' if io.direction == self.io_out else 'in'} {io.port:#06x}"
        if name == "MMIO":
            return f"MMIO {vcpu.exit_mmio.phys_addr & ~0xFFF:#x}"
        return name

    def _wrap(self, reason: int, handler):
        clock = time.perf_counter

        def counted(vcpu) -> None:
            kind = self.kind(reason, vcpu)     # before the handler: it may complete the exit
            t = clock()
            handler(vcpu)
            self.seconds[kind] += clock() - t
            self.count[kind] += 1
        return counted


def profile_run(guest: Path, top: int = 15) -> None:
    t = time.perf_counter()
    from xenkvm.config import load_config
    from xenkvm.build import build_machine
    from xenkvm.kvm._kvm_cffi import lib
    from xenkvm.machine.vcpu_loop import EXIT_NAMES
    t_import = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        console = Path(d) / "console.log"
        t = time.perf_counter()
        cfg = load_config(guest, {"console": f"file:{console}"})
        m = build_machine(cfg)
        t_machine = time.perf_counter() - t
        counter = ExitCounter(m.exit_handlers, EXIT_NAMES, lib.KVM_EXIT_IO_OUT)
        m.exit_handlers = counter.wrapped
        boot = m.boot
        phases: dict[str, float] = {}

        def timed_boot() -> None:
            t0 = time.perf_counter()
            boot()
            phases["boot"] = time.perf_counter() - t0
        m.boot = timed_boot
        t = time.perf_counter()
        try:
            result = m.run()
        finally:
            m.close()
        t_run = time.perf_counter() - t
        seen = MARKER in console.read_bytes()
    t_load = phases.get("boot", 0.0)
    in_handlers = sum(counter.seconds.values())
    print(f"in-process imports (config, machine)  {t_import:7.2f} s")
    print(f"Machine(): VM, devices, CPUID         {t_machine:7.2f} s")
    print(f"boot(): load bzImage + initrd          {t_load:7.2f} s")
    print(f"run to power-off (after boot)         {t_run - t_load:7.2f} s  "
          f"(marker {'seen' if seen else 'MISSING'}, {result.status.name})")
    print(f"  host time in exit handlers          {in_handlers:7.2f} s")
    print(f"  guest time and waits (the rest)     {t_run - t_load - in_handlers:7.2f} s")
    n_all = sum(counter.count.values())
    print(f"{'exit (' + str(n_all) + ' in all)':<22} {'count':>8} {'ms total':>10} {'us/exit':>8}")
    for kind, n in counter.count.most_common(top):
        s = counter.seconds[kind]
        print(f"{kind:<22} {n:>8} {s * 1e3:>10.1f} {s / n * 1e6:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest", default=str(ROOT / "guests" / "linux.yaml"))
    a = p.parse_args(argv)
    print(f"python -c pass                        {subprocess_wall('pass'):7.2f} s")
    print(f"python -c 'import xenkvm run path'     "
          f"{subprocess_wall('import xenkvm.cli, xenkvm.machine.machine'):7.2f} s")
    for seconds, name in slowest_imports():
        print(f"  import {name:<30} {seconds:7.2f} s cumulative")
    profile_run(Path(a.guest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
