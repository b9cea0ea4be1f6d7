"""Hardware-KVM figures from the nested SVM rig (docs/hw-rig.md), in one rig run.

    python benchmarks/bench_rig.py [--skip-host] [--rounds 3] [--boot-rounds 3] [-n 20000] [--timeout 3000]

* L1 boot: QEMU TCG start to L1 ready (kvm_amd loaded, host root mounted), wall
  time and L1's own uptime then;
* plain boot of guests/linux.yaml inside L1, side by side: xenkvm vs
  ``qemu-system-x86_64 -accel kvm -cpu host`` on the same kernel, initrd and
  command line (benchmarks/bench_boot.py --qemu-cpu host), ``--boot-rounds`` of each
  interleaved, and the ratio of the best of each; in the same
  call the same kernel booted by xenkvm as a Xen PVH and a Xen HVM guest (2 vCPUs,
  guests/linux-pvh.yaml, linux-hvm.yaml; QEMU has no row: without KVM_XEN it cannot);
* where xenkvm's time goes in that boot (benchmarks/profile_rig_boot.py):
  Python start-up and imports, loading the image, the run and its exits;
* the hypercall round trip (benchmarks/bench_hypercall.py) inside L1 per trap kind
  (hypercall page, patch; the breakpoint trap cannot work under TCG), beside the same
  benchmark on this host (PVM here) run just before.

QEMU TCG emulates L1 (and, through L1's KVM, runs the nested guest's code on
its own emulated SVM), so absolute times depend on how busy the host's CPUs
are; the ratios between rows of one run are what to read.
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
sys.path.insert(0, str(ROOT))

from xenkvm.rig import image, runner  # noqa: E402


def inner_script(n: int, rounds: int, boot_rounds: int) -> list[str]:
    """The command run inside L1: the boot pairs, the boot profile, the hypercall benchmark."""
    py = sys.executable
    steps = [
        "echo '=== boots in the rig: plain xenkvm vs qemu -accel kvm -cpu host, Xen PVH and HVM ==='",
        f"{py} benchmarks/bench_boot.py --qemu-cpu host --rounds {boot_rounds} --ours-timeout 900 --qemu-timeout 900",
        "echo '=== where xenkvm spends the rig boot ==='",
        f"{py} benchmarks/profile_rig_boot.py",
        "echo '=== hypercall round trip in the rig ==='",
        f"{py} benchmarks/bench_hypercall.py -n {n} --rounds {rounds}",
    ]
    return ["sh", "-c", "; ".join(steps)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20_000, help="hypercalls per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--boot-rounds", type=int, default=3, help="plain boots of QEMU and of xenkvm, interleaved")
    p.add_argument("--timeout", type=float, default=3000, help="seconds for the whole rig run")
    p.add_argument("--skip-host", action="store_true", help="skip the hypercall benchmark on this host")
    a = p.parse_args(argv)
    for guest, make in (("linux.yaml", "linux-image"), ("linux-pvh.yaml", "linux-xen-image"),
                        ("linux-hvm.yaml", "linux-xen-image")):
        if not (ROOT / "guests" / guest).is_file():
            print(f"bench_rig: guests/{guest} missing: run `make {make}` first", file=sys.stderr)
            return 2
    if not a.skip_host:
        print("=== hypercall round trip on this host ===", flush=True)
        with tempfile.TemporaryDirectory(prefix="xks", dir="/tmp") as d:  # never the host's xenstored socket
            subprocess.call([sys.executable, str(ROOT / "benchmarks" / "bench_hypercall.py"),
                             "-n", str(a.n), "--rounds", str(a.rounds)], cwd=ROOT,
                            env={**os.environ, "XENSTORED_PATH": f"{d}/sock"})
    try:
        l1 = image.build(ROOT / ".cache" / "rig")
        with tempfile.TemporaryDirectory(prefix="xenkvm-rig-") as tmp:
            t = time.monotonic()
            res = runner.run(l1, inner_script(a.n, a.rounds, a.boot_rounds), cwd=ROOT, out_dir=Path(tmp),
                             timeout=a.timeout, echo=sys.stdout)
    except (image.RigImageError, runner.RigError) as e:
        print(f"bench_rig: {e}", file=sys.stderr)
        return 1
    uptime = f"{res.l1_uptime_s:.1f}" if res.l1_uptime_s is not None else "-"
    print(f"\nL1 (QEMU TCG, -cpu max, kvm_amd): ready after {res.ready_s:.1f} s wall ({uptime} s L1 uptime); "
          f"whole rig run {time.monotonic() - t:.1f} s, inner exit status {res.status}")
    return 0 if res.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
