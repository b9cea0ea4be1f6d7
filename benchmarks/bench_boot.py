"""Boot time of Debian's cloud kernel to the initramfs marker: xenkvm vs QEMU/KVM, plain and as Xen guest.

    python benchmarks/bench_boot.py [--guest guests/linux.yaml] [--rounds 1] [--ours-timeout 1800]
                                    [--qemu-timeout 300] [--qemu-cpu host] [--skip-ours] [--skip-qemu]
                                    [--skip-xen] [--pvh-guest ...] [--hvm-guest ...]

Both boot the same bzImage, initramfs, memory size and kernel command line
(including the parameters xenkvm appends on this host, see xenkvm/machine/host.py)
through the Linux boot protocol with the console on ttyS0.  Each run is timed from
process start to the marker line and to process exit, with a time limit; a run
that ends without the marker is reported with how it ended (e.g. QEMU 7.2 on a PVM
host stops at the first instruction KVM's emulator refuses: "KVM internal error.
Suberror: 1 / emulation failure").  The ratio is printed when both reach the marker;
with ``--rounds N`` the plain boots alternate N times and the best of each is compared.

The Xen rows boot the same kernel as a Xen guest (guests/linux-pvh.yaml, 2 vCPUs,
and guests/linux-hvm.yaml, from ``make linux-xen-image``) to their marker, which
comes after a xenstore round trip with this process (tests/linux/xenboot.py), and
print the hypercalls of each boot by number: count and total host time in the
handlers (the dispatcher's statistics, dumped by benchmarks/run_guest.py).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xenkvm.config import load_config  # noqa: E402

MARKER = b"XENKVM-LINUX-BOOT-OK"
QEMU_FAIL = re.compile(rb"KVM internal error\.? Suberror: (\d+)|emulation failure|"
                       rb"Kernel panic[^\n]*|KVM: entry failed[^\n]*")


@dataclass
class Outcome:
    name: str
    marker_s: float | None
    exit_s: float | None
    how: str

    def cell(self, v: float | None) -> str:
        return f"{v:8.1f}" if v is not None else "       -"


def host_kernel_params() -> tuple[str, ...]:
    from xenkvm.kvm.system import Kvm
    from xenkvm.machine.host import Host
    with Kvm() as kvm:
        return Host.probe(kvm).kernel_params


def _watch(proc: subprocess.Popen, stream, buf: bytearray, seen: dict, t0: float, fail_re=None) -> None:
    for chunk in iter(lambda: stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096), b""):
        buf += chunk
        if "marker" not in seen and MARKER in buf:
            seen["marker"] = time.monotonic() - t0
        if fail_re is not None and "fail" not in seen:
            m = fail_re.search(buf)
            if m:
                seen["fail"] = (time.monotonic() - t0, m.group(0).decode(errors="replace"))


def _run(name: str, cmd: list[str], timeout: float, console: Path | None = None,
         fail_re=None) -> tuple[Outcome, bytes]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    buf = bytearray()
    seen: dict = {}
    reader = threading.Thread(target=_watch, args=(proc, proc.stdout, buf, seen, t0, fail_re), daemon=True)
    reader.start()
    how = ""
    while True:
        if console is not None and "marker" not in seen and console.exists():
            if MARKER in console.read_bytes()[-65536:]:
                seen["marker"] = time.monotonic() - t0
        if proc.poll() is not None:
            break
        if "fail" in seen:  # QEMU pauses the VM after an internal error; nothing more will happen
            time.sleep(0.5)
            proc.kill()
            how = f"{seen['fail'][1]} at {seen['fail'][0]:.1f}s"
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            how = f"timed out after {timeout:.0f}s"
            break
        time.sleep(0.2)
    proc.wait()
    exit_s = time.monotonic() - t0
    reader.join(timeout=2)
    out = bytes(buf) + (console.read_bytes() if console is not None and console.exists() else b"")
    if console is not None and "marker" not in seen and MARKER in out:
        seen["marker"] = exit_s
    if not how:
        how = f"exit status {proc.returncode}" + (" (power-off)" if proc.returncode == 0 else "")
    return Outcome(name, seen.get("marker"), exit_s, how), out


def run_ours(guest: Path, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory() as d:
        console = Path(d) / "console.log"
        cmd = [sys.executable, "-m", "xenkvm", "run", str(guest), "--console", f"file:{console}"]
        out, _ = _run("xenkvm", cmd, timeout, console=console)
        return out


def run_qemu(guest: Path, timeout: float, params: tuple[str, ...], cpu: str | None = None) -> Outcome:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return Outcome("qemu", None, None, "qemu-system-x86_64 not installed "
                       "(apt-get install -y qemu-system-x86)")
    cfg = load_config(guest)
    cmdline = " ".join((*params, cfg.cmdline)).strip()
    cmd = [qemu, "-accel", "kvm", *(["-cpu", cpu] if cpu else []), "-kernel", str(cfg.kernel),
           "-m", f"{cfg.memory >> 20}", "-smp", str(cfg.vcpus), "-append", cmdline, "-nographic", "-no-reboot"]
    if cfg.initrd is not None:
        cmd[cmd.index("-m"):cmd.index("-m")] = ["-initrd", str(cfg.initrd)]
    out, text = _run("qemu", cmd, timeout, fail_re=QEMU_FAIL)
    m = re.search(rb"RIP: [0-9a-f]+:([0-9a-f]+)|RIP=([0-9a-f]+)", text)
    if out.marker_s is None and m:
        out.how += f", RIP={(m.group(1) or m.group(2)).decode()}"
    code = re.search(rb"Code=((?:[0-9a-f]{2} )*)<([0-9a-f]{2})>((?: [0-9a-f]{2}){0,5})", text)
    if out.marker_s is None and code:  # the bytes at RIP: which instruction the emulator refused
        out.how += f" (code at RIP: {(code.group(2) + code.group(3)).decode()})"
    return out


def run_xen(name: str, guest: Path, timeout: float) -> tuple[Outcome, dict | None]:
    sys.path.insert(0, str(ROOT / "tests" / "linux"))
    from xenboot import boot  # noqa: E402 - tests/linux/xenboot.py
    with tempfile.TemporaryDirectory() as d:
        r = boot(guest, Path(d), timeout=timeout, stats=True)
    how = f"exit status {r.returncode}" + (" (power-off)" if r.returncode == 0 else "")
    if r.marker_s is None and r.elapsed >= timeout:
        how = f"timed out after {timeout:.0f}s"
    if r.marker_s is not None and r.returncode == 0 and r.dmesg_problems():
        how += "; dmesg: " + "; ".join(r.dmesg_problems()[:3])
    refused = sorted(set(re.findall(r"completing refused instruction (\S+)", r.stderr)))
    if refused:
        print(f"{name}: refused instructions completed: {', '.join(refused)}", flush=True)
    return Outcome(name, r.marker_s, r.elapsed, how), (r.stats or {}).get("hypercalls")


def print_hypercalls(name: str, table: dict) -> None:
    total_n = sum(v["count"] for v in table.values())
    total_s = sum(v["seconds"] for v in table.values())
    print(f"\nhypercalls of the {name} boot: {total_n} calls, {total_s * 1e3:.1f} ms host time in handlers")
    print(f"{'nr':>4} {'name':<22} {'count':>8} {'total ms':>10} {'us/call':>8}")
    for nr, v in sorted(table.items(), key=lambda kv: int(kv[0])):
        per = v["seconds"] / v["count"] * 1e6 if v["count"] else 0.0
        print(f"{int(nr):>4} {v['name']:<22} {v['count']:>8} {v['seconds'] * 1e3:>10.1f} {per:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest", default=str(ROOT / "guests" / "linux.yaml"))
    p.add_argument("--ours-timeout", type=float, default=float(os.environ.get("BENCH_OURS_TIMEOUT", 1800)))
    p.add_argument("--qemu-timeout", type=float, default=float(os.environ.get("BENCH_QEMU_TIMEOUT", 300)))
    p.add_argument("--rounds", type=int, default=1, help="plain boots of each VMM, interleaved; "
                   "the ratio compares the best of each")
    p.add_argument("--qemu-cpu", help="QEMU's -cpu (e.g. host; default: QEMU's own default model)")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-qemu", action="store_true")
    p.add_argument("--skip-xen", action="store_true", help="skip the PVH and HVM Xen-guest boots")
    p.add_argument("--pvh-guest", default=str(ROOT / "guests" / "linux-pvh.yaml"))
    p.add_argument("--hvm-guest", default=str(ROOT / "guests" / "linux-hvm.yaml"))
    a = p.parse_args(argv)
    guest = Path(a.guest)
    if not guest.is_file():
        print(f"bench_boot: {guest} missing: run `make linux-image` first", file=sys.stderr)
        return 2
    params = host_kernel_params()
    print(f"kernel parameters added on this host: {' '.join(params) or '(none)'}", flush=True)
    rows: list[Outcome] = []
    for _ in range(a.rounds):   # interleaved, so both see the same host load
        if not a.skip_qemu:
            rows.append(run_qemu(guest, a.qemu_timeout, params, a.qemu_cpu))
            print(f"qemu done: {rows[-1].how}", flush=True)
        if not a.skip_ours:
            rows.append(run_ours(guest, a.ours_timeout))
            print(f"xenkvm done: {rows[-1].how}", flush=True)
    hypercalls: list[tuple[str, dict]] = []
    if not a.skip_xen:
        for name, g in (("xen-pvh", Path(a.pvh_guest)), ("xen-hvm", Path(a.hvm_guest))):
            if not g.is_file():
                rows.append(Outcome(name, None, None, f"{g} missing: run `make linux-xen-image`"))
                continue
            row, table = run_xen(name, g, a.ours_timeout)
            rows.append(row)
            if table:
                hypercalls.append((name, table))
            print(f"{name} done: {row.how}", flush=True)
    print()
    print(f"{'VMM':<8} {'marker s':>8} {'exit s':>8}  how it ended")
    for r in rows:
        print(f"{r.name:<8} {r.cell(r.marker_s)} {r.cell(r.exit_s)}  {r.how}")
    plain = best(rows, "xenkvm")
    for r in rows:
        if r.name.startswith("xen-") and r.marker_s is not None and plain is not None:
            print(f"ratio {r.name}/plain xenkvm (time to marker): {r.marker_s / plain.marker_s:.2f}")
    for name, table in hypercalls:
        print_hypercalls(name, table)
    ours, qemu = best(rows, "xenkvm"), best(rows, "qemu")
    if ours is not None and qemu is not None:
        print(f"\nratio xenkvm/qemu (time to marker, best of {a.rounds} each): {ours.marker_s / qemu.marker_s:.2f}")
    else:
        reached = ", ".join(r.name for r in (ours, qemu) if r is not None)
        print(f"\nratio: n/a ({'only ' + reached if reached else 'no run'} reached the marker)")
    return 0


def best(rows: list[Outcome], name: str) -> Outcome | None:
    """The fastest of ``name``'s runs that reached the marker."""
    done = [r for r in rows if r.name == name and r.marker_s is not None]
    return min(done, key=lambda r: r.marker_s) if done else None


if __name__ == "__main__":
    sys.exit(main())
