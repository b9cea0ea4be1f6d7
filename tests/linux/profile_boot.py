"""Boot a guest with a RIP sampler: where does an emulated-ring-0 boot spend its time?

    python tests/linux/profile_boot.py guests/linux.yaml --limit 1200 --every 5 \
        --console /tmp/console.log --samples /tmp/rips.txt [--cmdline "..."]

Every ``--every`` seconds the vCPU thread is kicked out of KVM_RUN with the
machine's kick signal (no immediate_exit, so the run simply goes on); KVM
stores the registers in kvm_run's sync area on that exit, and the sampler
records RIP and CPL.  At the end (marker, power-off or ``--limit``) a histogram
of sampled RIPs (rounded to 64 bytes) and the refused-instruction counts are
printed.  Console lines get a wall-clock prefix in the console file.
"""
from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xenkvm.config import load_config  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.build import build_machine  # noqa: E402
from xenkvm.machine.machine import KICK_SIGNAL, ExitStatus, Machine  # noqa: E402


class StampedFile:
    """A console sink target that prefixes each line with seconds since start."""

    def __init__(self, path: str, t0: float):
        self.f = open(path, "wb", buffering=0)
        self.t0 = t0
        self.bol = True

    def write(self, data: bytes) -> None:
        out = bytearray()
        for b in data:
            if self.bol:
                out += b"[%8.2f] " % (time.monotonic() - self.t0)
                self.bol = False
            out.append(b)
            if b == 0x0A:
                self.bol = True
        self.f.write(bytes(out))

    def flush(self) -> None:
        pass


def walk(mem, cr3: int, va: int) -> int | None:
    """Guest-virtual to guest-physical through 4-level page tables (None if unmapped)."""
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in enumerate((39, 30, 21, 12)):
        try:
            e = int.from_bytes(mem.read(table + ((va >> shift) & 0x1FF) * 8, 8), "little")
        except ValueError:
            return None
        if not e & 1:
            return None
        if level in (1, 2) and e & 0x80:
            return (e & 0x000F_FFFF_FFFF_F000 & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1))
        table = e & 0x000F_FFFF_FFFF_F000
    return table | (va & 0xFFF)


def stack_text(machine: Machine, v, rsp: int, depth: int = 512) -> str:
    """Kernel-text addresses on the stack (likely return addresses), innermost first."""
    cr3 = v._sync.sregs.cr3
    found = []
    for off in range(0, depth * 8, 8):
        pa = walk(machine.mem, cr3, rsp + off)
        if pa is None:
            break
        try:
            w = int.from_bytes(machine.mem.read(pa, 8), "little")
        except ValueError:
            break
        if 0xFFFF_FFFF_8100_0000 <= w < 0xFFFF_FFFF_8300_0000:
            found.append(w)
    return " stack: " + " ".join(f"{w:#x}" for w in found[:12])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("guest")
    p.add_argument("--limit", type=float, default=1200)
    p.add_argument("--every", type=float, default=5)
    p.add_argument("--console", default="/tmp/console.log")
    p.add_argument("--samples", default="/tmp/rips.txt")
    p.add_argument("--cmdline")
    p.add_argument("--marker", default="XENKVM-LINUX-BOOT-OK")
    p.add_argument("-v", action="store_true")
    p.add_argument("--deadline", action="store_true", help="sample the TSC-deadline MSR too")
    p.add_argument("--stack", action="store_true", help="also list kernel-text words on the stack")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO if a.v else logging.WARNING, stream=sys.stderr,
                        format="%(relativeCreated)9.0f ms %(name)s: %(message)s")
    cfg = load_config(a.guest, {"cmdline": a.cmdline, "console": "none"})
    t0 = time.monotonic()
    sink = ConsoleSink(StampedFile(a.console, t0))  # type: ignore[arg-type]
    marker_at: list[float] = []
    buf = bytearray()

    def watch(data: bytes) -> None:
        buf.extend(data)
        if not marker_at and a.marker.encode() in buf:
            marker_at.append(time.monotonic() - t0)
        del buf[:-64]

    sink.add_listener(watch)
    m = build_machine(cfg, sink=sink)
    if a.stack:  # the sampler walks page tables from CR3: have KVM store sregs on every exit too
        from xenkvm.kvm._kvm_cffi import lib
        for v in m.vcpus:
            v.run_struct.kvm_valid_regs |= lib.KVM_SYNC_X86_SREGS
    samples: list[tuple[float, int, int]] = []
    out = open(a.samples, "w")

    def sampler(machine: Machine) -> None:
        v, runner = machine.vcpus[0], machine.runners[0]
        while not machine.stopping:
            time.sleep(a.every)
            if runner.thread_id is None or machine.stopping:
                continue
            signal.pthread_kill(runner.thread_id, KICK_SIGNAL)
            time.sleep(0.002)
            r = v._sync.regs
            cs = v._sync.sregs.cs.selector if a.stack else 0
            t = time.monotonic() - t0
            samples.append((t, r.rip, cs))
            gaps = machine.gaps.counts if machine.gaps else {}
            if a.deadline:  # remaining TSC cycles to the LAPIC TSC deadline (0: none armed)
                msrs = v.get_msrs([0x10, 0x6E0])
                dl = msrs.get(0x6E0, 0)
                out.write(f"   deadline-in={dl - msrs[0x10] if dl else 0}\n")
            out.write(f"{t:8.1f} {r.rip:#018x} rsp={r.rsp:#x} gaps={sum(gaps.values())}"
                      f"{stack_text(machine, v, r.rsp) if a.stack else ''}\n")
            out.flush()
            if t > a.limit:
                machine.stop(ExitStatus.INTERRUPTED, f"time limit {a.limit}s")

    res = m.run(on_started=lambda mm: threading.Thread(target=sampler, args=(mm,), daemon=True).start())
    total = time.monotonic() - t0
    m.close()
    print(f"result: {res.status.name} {res.message}  wall {total:.1f}s  marker "
          f"{'at %.1fs' % marker_at[0] if marker_at else 'not seen'}")
    hist = collections.Counter(rip & ~0x3F for _, rip, _ in samples)
    print("top sampled RIPs (64-byte buckets):")
    for rip, n in hist.most_common(25):
        print(f"  {rip:#018x} {n}")
    if m.gaps:
        print("refused instructions completed:", dict(sorted(m.gaps.counts.items(), key=lambda kv: -kv[1])))
        extra = getattr(m.gaps, "stats", None)
        if extra:
            print("gap stats:", extra() if callable(extra) else extra)
    return 0 if marker_at else 1


if __name__ == "__main__":
    sys.exit(main())
