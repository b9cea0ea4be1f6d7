"""Disk throughput inside Debian's kernel: xenkvm's block backend vs QEMU virtio-blk, in one rig run.

    python benchmarks/bench_diskguest.py [--size 256] [--seconds 5] [--timeout 3000] [--compare DIR]

benchmarks/diskbench.c (built here with ``gcc -static``) measures sequential 1 MiB
write and read MB/s and 4 KiB random-read IOPS at queue depth 1 and 32 (32 threads),
with O_DIRECT where the file system allows it.  It runs, side by side:

* on this host, on a file in /tmp (the floor of this machine);
* inside the nested SVM rig (docs/hw-rig.md), in one L1 boot:
  - on a file in L1 (the floor there: L1's files live in RAM, tmpfs, so buffered);
  - in Debian's cloud kernel as a Xen PVH guest of xenkvm, root on xvda (the image of
    ``make rootfs-image``), against a second disk ``xvdb`` (an L1 file, served by
    xenkvm/backends/block.py);
  - in the same kernel, initramfs and image under ``qemu-system-x86_64 -accel kvm``
    with virtio-blk (``-drive if=virtio``, QEMU's default cache=writeback), against ``vdb``.

After the xenkvm row come the block backend's event-path latencies per disk
(xenkvm/backends/latency.py, logged by ``xenkvm -v``) and its cost lines (the hypercalls by op
and the upcalls per request, one per 5-s window while busy).  Under every guest row, per phase:
L1's KVM exits per request (``/sys/kernel/debug/kvm``'s counters, read at each
``DISKBENCH-MARK`` the guest prints, divided by the requests the guest's own
``/sys/block/*/stat`` counted), so xenkvm's and virtio-blk's costs stand side by side.
``--pv-time-off`` adds the xenkvm row again with ``xen.pv_time: false``, ``--fast-path-off`` with
``xen.fast_path: false`` (ring kicks and single-shot timers through Python, not C: xen/fastpath.py),
``--kernel-kicks-off`` with ``xen.kernel_kicks: false`` (no send stub: kicks exit to the C loop
instead of KVM's ioeventfds, xen/sendstub.py), ``--fifo-on`` with ``xen.fifo_events: true``
(FIFO event channels, whose backend notifies go through Python; the default 2-level ones' are
delivered in C: xen/evtchn/cdeliver.py),
``--persistent`` with both disks offering persistent grants (blkfront then copies every byte
between its persistent pages and the bio's), ``--guest-arg ARG`` with ARG on the guest's
command line after the default's (``xen_blkfront.max_indirect_segments=32``: blkfront's own
default, 128-KiB requests, instead of the 256 of xenkvm's guests).  ``--compare DIR`` adds the xenkvm
row again with the xenkvm package of another built checkout (the commit before a change,
say), in the same L1 boot, so a change is measured side by side.

Both guests get 256 MiB and one vCPU.  QEMU TCG emulates L1, so absolute figures depend
on the host's load; compare the rows of one run.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.linux.xenboot import stacks_then_kill  # noqa: E402

CACHE = ROOT / ".cache" / "linux"
BINARY = CACHE / "diskbench"
LINE = re.compile(r"^DISKBENCH (\S+) ([\d.]+) (\S+) direct=(\d)", re.M)
#: xenkvm's backend's event-path latencies (xenkvm/backends/latency.py), logged at -v when a disk closes
LATENCY = re.compile(r"(d\d+ vbd \d+ \(\w+\)): event latency: (.*)$", re.M)
#: its hypercalls and upcalls per request, one line per 5-s window while the disk is busy
COSTS = re.compile(r"(d\d+ vbd \d+ \(xvdb\)): costs: (.*)$", re.M)
MARK = re.compile(r"DISKBENCH-MARK (\S+) (-?\d+)")
KVM_STATS = Path("/sys/kernel/debug/kvm")
#: L1 KVM's counters (all VMs) shown per request: every exit, then the kinds that matter here
EXIT_KINDS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "irq_window_exits",
              "signal_exits", "hypercalls", "irq_injections", "halt_wakeup", "insn_emulation")
#: The guest's /xenkvm/run: the benchmark on the second disk, whichever driver named it.
GUEST_SCRIPT = """#!/bin/sh
for d in /dev/xvdb /dev/vdb; do [ -b $d ] && dev=$d; done
echo "diskbench on $dev"
/xenkvm/diskbench $dev {size} {seconds}
"""


def build_binary() -> Path:
    src = ROOT / "benchmarks" / "diskbench.c"
    if not BINARY.is_file() or BINARY.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-static", "-O2", "-pthread", "-Wall", "-o", str(BINARY), str(src)], check=True)
    return BINARY


def kvm_counters() -> dict[str, int]:
    """L1 KVM's global counters (debugfs; empty where it is not mounted or readable)."""
    out = {}
    for name in EXIT_KINDS:
        try:
            out[name] = int((KVM_STATS / name).read_text())
        except (OSError, ValueError):
            pass
    return out


def mount_debugfs() -> None:
    """KVM's counters live in debugfs; L1 (root) mounts it if it is not there yet."""
    if not KVM_STATS.is_dir() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"], check=False)


def run_streaming(cmd: list[str], timeout: float, cwd: Path | None,
                  trace: Path | None = None) -> tuple[str, list]:
    """Run ``cmd``; at each DISKBENCH-MARK line it prints, sample KVM's counters (and at the
    rand-qd1 one start a window of L1's ftrace saved to ``trace``, if given: benchmarks/l1trace.py).

    Returns the output and ``[(phase, guest requests so far, counters), ...]``.
    """
    from l1trace import Window
    window = Window(trace) if trace is not None else None
    marks: list = []
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=cwd)
    timer = threading.Timer(timeout, stacks_then_kill, (proc,))
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            m = MARK.search(line)
            if m:
                marks.append((m.group(1), int(m.group(2)), kvm_counters()))
                if window is not None and m.group(1) == TRACE_PHASE:
                    window.start()
        proc.wait()
    finally:
        timer.cancel()
        if window is not None:
            window.join()
    return "".join(lines), marks


def exits_per_request(marks: list) -> list[str]:
    """One line per phase: L1 KVM's exits per guest request between two marks."""
    out = []
    for (phase, reqs, c0), (_next, reqs1, c1) in zip(marks, marks[1:]):
        n = reqs1 - reqs
        if n <= 0 or not c0:
            continue
        per = "  ".join(f"{k} {(c1[k] - c0[k]) / n:.2f}" for k in EXIT_KINDS if k in c0 and k in c1)
        out.append(f"{phase}: {n} requests; per request: {per}")
    return out


#: where the inner run saves L1 traces (``--trace-qd1``): the rig's results share, inside L1
TRACE_DIR: Path | None = None
#: the phase whose start opens the trace window (``--trace-phase``)
TRACE_PHASE = "rand-qd1"


def run_bench(label: str, cmd: list[str], timeout: float, cwd: Path | None = None) -> dict[str, str]:
    """Run ``cmd`` (which prints DISKBENCH lines somewhere in its output) and report its figures."""
    t = time.monotonic()
    from l1trace import file_name
    trace = TRACE_DIR / file_name(label) if TRACE_DIR else None
    text, marks = run_streaming(cmd, timeout, cwd, trace)
    rows = {name: f"{value} {unit}" + ("" if direct == "1" else " (buffered)")
            for name, value, unit, direct in LINE.findall(text)}
    print(f"{label:<34} " + "  ".join(f"{k} {v}" for k, v in rows.items())
          + f"   [{time.monotonic() - t:.0f} s]", flush=True)
    for disk, line in dict(LATENCY.findall(text)).items():    # the last line logged for each disk
        print(f"  {disk}: {line}", flush=True)
    for disk, line in COSTS.findall(text):
        print(f"  {disk} costs: {line}", flush=True)
    for line in exits_per_request(marks):
        print(f"  L1 KVM {line}", flush=True)
    if trace is not None and trace.is_file():
        from l1trace import summarize
        for line in summarize(trace.read_text(errors="replace")):
            print(f"  L1 trace ({TRACE_PHASE}): {line}", flush=True)
    if len(rows) < 4:
        print(f"  {label}: incomplete; output tail:\n  " + "\n  ".join(text.splitlines()[-15:]), flush=True)
    return rows


def guest_image(work: Path, size_mib: int, seconds: float) -> tuple[Path, Path]:
    """A copy of the root image with diskbench and its script, and an empty second disk."""
    from xenkvm.rootfs import install_binary, install_script
    root = work / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(CACHE / "rootfs.ext4"), str(root)], check=True)
    install_binary(root, BINARY, "/xenkvm/diskbench")
    install_script(root, GUEST_SCRIPT.format(size=size_mib, seconds=seconds))
    disk = work / "bench.img"
    with open(disk, "wb") as f:
        f.truncate((size_mib + 16) << 20)
    return root, disk


def xenkvm_cmd(work: Path, root: Path, disk: Path, xen_extra: str = "", cmdline_extra: str = "",
               disk_flags: str = "") -> list[str]:
    """``xen_extra``: more ``xen:`` keys (a variant row), e.g. ``pv_time: false``; ``cmdline_extra``:
    more guest kernel arguments (a guest-side variant row), e.g. ``xen_blkfront.max_indirect_segments=32``;
    ``disk_flags``: more disk spec words for both disks, e.g. ``persistent``."""
    flags = f" {disk_flags}," if disk_flags else ""
    from xenkvm.images import XEN_CMDLINE
    cfg = work / "disk.yaml"
    cfg.write_text(
        f"name: diskbench\nkernel: {CACHE / 'vmlinuz'}\ninitrd: {CACHE / 'initramfs-disk.cpio.gz'}\n"
        f"boot: pvh\nmemory: 256M\nvcpus: 1\nconsole: stdio\ncmdline: \"{XEN_CMDLINE} pci=off{' ' + cmdline_extra if cmdline_extra else ''}\"\n"
        f"xen:\n  version: \"4.17\"\n  domid: 1\n  hypercall_trap: auto\n"
        + "".join(f"  {line}\n" for line in xen_extra.splitlines()) +
        f"disks:\n  - \"format=raw, vdev=xvda, access=rw,{flags} target={root}\"\n"
        f"  - \"format=raw, vdev=xvdb, access=rw,{flags} target={disk}\"\n")
    return [sys.executable, "-m", "xenkvm", "-v", "run", str(cfg)]


def qemu_cmd(root: Path, disk: Path) -> list[str]:
    from xenkvm.images import XEN_CMDLINE
    cmdline = XEN_CMDLINE.replace("console=hvc0 earlyprintk=xen", "console=ttyS0") + " xenkvm.root=/dev/vda"
    return [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host",
            "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-kernel", str(CACHE / "vmlinuz"),
            "-initrd", str(CACHE / "initramfs-disk.cpio.gz"), "-append", cmdline,
            "-drive", f"file={root},if=virtio,format=raw", "-drive", f"file={disk},if=virtio,format=raw"]


#: the variant rows: option -> (its label, the xenkvm_cmd keyword that makes it)
VARIANTS = {"pv_time_off": ("pv_time=false", {"xen_extra": "pv_time: false"}),
            "fast_path_off": ("fast_path=false", {"xen_extra": "fast_path: false"}),
            "kernel_kicks_off": ("kernel_kicks=false", {"xen_extra": "kernel_kicks: false"}),
            "fifo_on": ("fifo_events=true", {"xen_extra": "fifo_events: true"}),
            "persistent": ("disk=persistent", {"disk_flags": "persistent"})}


def inner(size: int, seconds: float, timeout: float, compare: Path | None = None,
          variants: tuple[str, ...] = (), guest_args: tuple[str, ...] = ()) -> int:
    """In L1: the floor, xenkvm (and xenkvm from the ``compare`` checkout, and xenkvm with each
    of ``variants``' ``xen:`` keys, and with each of ``guest_args`` on the guest's command line), QEMU."""
    mount_debugfs()
    with tempfile.TemporaryDirectory(prefix="diskbench-") as tmp:
        work = Path(tmp)
        floor = work / "floor.img"
        floor.write_bytes(b"")
        run_bench("L1 file (floor, tmpfs)", [str(BINARY), str(floor), str(size), str(seconds)], timeout)
        floor.unlink()
        for label, make in (("xenkvm PV block, Debian xvdb", lambda r, d: xenkvm_cmd(work, r, d)),
                            ("QEMU -accel kvm virtio-blk, vdb", qemu_cmd)):
            sub = work / label.split()[0]
            sub.mkdir()
            root, disk = guest_image(sub, size, seconds)
            run_bench(label, make(root, disk), timeout)
            shutil.rmtree(sub)
            if compare is not None and label.startswith("xenkvm"):
                compare_row(work, compare, size, seconds, timeout)
            if label.startswith("xenkvm"):
                rows = [VARIANTS[v] for v in variants] + [(f"guest {a}", {"cmdline_extra": a}) for a in guest_args]
                for i, (label, extra) in enumerate(rows):
                    variant_row(work / f"variant{i}", label, extra, size, seconds, timeout)
    return 0


def compare_row(work: Path, tree: Path, size: int, seconds: float, timeout: float) -> None:
    """The xenkvm row again with the xenkvm package of another checkout (a change side by side)."""
    sub = work / "compare"
    sub.mkdir()
    root, disk = guest_image(sub, size, seconds)
    run_bench(f"xenkvm from {tree.name}, Debian xvdb", xenkvm_cmd(sub, root, disk), timeout, cwd=tree)
    shutil.rmtree(sub)


def variant_row(sub: Path, label: str, extra: dict[str, str], size: int, seconds: float, timeout: float) -> None:
    """The xenkvm row again with ``extra`` passed to :func:`xenkvm_cmd` (``xen_extra``: ``pv_time:
    false``, the LAPIC timer and TSC, or ``fast_path: false``, kicks and single-shot timers through
    Python; ``disk_flags``; ``cmdline_extra``: a frontend setting on the guest's command line)."""
    sub.mkdir()
    root, disk = guest_image(sub, size, seconds)
    run_bench(f"xenkvm {label}, Debian xvdb", xenkvm_cmd(sub, root, disk, **extra), timeout)
    shutil.rmtree(sub)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256,
                   help="MiB written and read sequentially (default 256: 64-MiB phases, ~0.3 s, moved 10-15%% between boots)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per random-read phase (default 5)")
    p.add_argument("--timeout", type=float, default=3000, help="seconds for the whole rig run")
    p.add_argument("--compare", type=Path, help="also run the xenkvm row with this checkout's xenkvm "
                   "(built, same .cache/linux), e.g. the commit before a change")
    p.add_argument("--pv-time-off", action="store_true",
                   help="also run the xenkvm row with xen.pv_time: false (docs/linux-xen.md)")
    p.add_argument("--fast-path-off", action="store_true",
                   help="also run the xenkvm row with xen.fast_path: false (kicks and timers through Python)")
    p.add_argument("--kernel-kicks-off", action="store_true",
                   help="also run the xenkvm row with xen.kernel_kicks: false (kicks exit to the C loop)")
    p.add_argument("--fifo-on", action="store_true",
                   help="also run the xenkvm row with xen.fifo_events: true (FIFO channels: notifies through Python)")
    p.add_argument("--persistent", action="store_true",
                   help="also run the xenkvm row with both disks offering persistent grants (`persistent`)")
    p.add_argument("--guest-arg", action="append", default=[], metavar="ARG",
                   help="also run the xenkvm row with ARG on the guest's command line (repeatable)")
    p.add_argument("--trace-qd1", type=Path, metavar="DIR",
                   help="save a window of L1's ftrace in each row's QD1 phase to DIR (benchmarks/l1trace.py)")
    p.add_argument("--trace-phase", default="rand-qd1", choices=("seq-write", "seq-read", "rand-qd1", "rand-qd32"),
                   help="the phase --trace-qd1 traces instead of rand-qd1 (its first 0.4 s)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.inner:
        if a.trace_qd1 is not None:
            global TRACE_DIR, TRACE_PHASE
            TRACE_DIR, TRACE_PHASE = a.trace_qd1, a.trace_phase
        return inner(a.size, a.seconds, a.timeout / 3, a.compare, tuple(v for v in VARIANTS if getattr(a, v)),
                     tuple(a.guest_arg))
    for f in ("vmlinuz", "initramfs-disk.cpio.gz", "rootfs.ext4"):
        if not (CACHE / f).is_file():
            print("bench_diskguest: no root file system image: run `make rootfs-image` first", file=sys.stderr)
            return 2
    build_binary()
    with tempfile.TemporaryDirectory(prefix="diskbench-", dir="/tmp") as tmp:
        floor = Path(tmp) / "floor.img"
        floor.write_bytes(b"")
        run_bench("this host's file (floor)", [str(BINARY), str(floor), str(a.size), str(a.seconds)], 600)
    from xenkvm.rig import image, runner
    try:
        l1 = image.build(ROOT / ".cache" / "rig")
        with tempfile.TemporaryDirectory(prefix="xenkvm-rig-") as tmp:
            cmd = [sys.executable, "benchmarks/bench_diskguest.py", "--inner", "--size", str(a.size),
                   "--seconds", str(a.seconds), "--timeout", str(a.timeout)]
            if a.compare is not None:
                cmd += ["--compare", str(a.compare.resolve())]
            cmd += [f"--{v.replace('_', '-')}" for v in VARIANTS if getattr(a, v)]
            cmd += [f"--guest-arg={arg}" for arg in a.guest_arg]
            if a.trace_qd1 is not None:
                cmd += ["--trace-qd1", image.CHROOT_OUT, "--trace-phase", a.trace_phase]
            res = runner.run(l1, cmd, cwd=ROOT, out_dir=Path(tmp), timeout=a.timeout, echo=sys.stdout)
            if a.trace_qd1 is not None:
                a.trace_qd1.mkdir(parents=True, exist_ok=True)
                for f in Path(tmp).glob("trace-*.txt"):
                    shutil.copy(f, a.trace_qd1 / f.name)
    except (image.RigImageError, runner.RigError) as e:
        print(f"bench_diskguest: {e}", file=sys.stderr)
        return 1
    return 0 if res.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
