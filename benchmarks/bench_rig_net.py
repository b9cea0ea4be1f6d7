"""TCP throughput guest<->host in the rig: xenkvm's vif vs QEMU virtio-net on a tap, beside loopback.

    python benchmarks/bench_rig_net.py [--bytes N] [--timeout 3000] [--compare DIR]...   # boots the rig (docs/hw-rig.md)
    python benchmarks/bench_rig_net.py --inner                        # inside L1 (or any hardware KVM host)

In one L1 (QEMU TCG with SVM), side by side, with the same Debian cloud kernel and
the same guest init (tests/linux/netboot.py: busybox ``nc`` sends N random bytes to
the host and receives N back, both checksummed):

* **xenkvm vif**: the kernel as a Xen PVH guest, xen-netfront on our vif
  (GSO/TSO and checksum offload on), its tap in a network namespace;
* **QEMU virtio-net**: ``qemu-system-x86_64 -accel kvm -cpu host`` with
  ``virtio-net-pci`` on a tap in the same kind of namespace (what a KVM user would
  pick instead; vhost-net when L1 has it, else QEMU's own virtio-net);
* **loopback floor**: the same N bytes over TCP on L1's 127.0.0.1 from Python, the
  host-side helper's own ceiling.

Figures are MB/s as the host side timed them (accept to close).  L1 is emulated,
so absolute figures depend on how busy the host's CPUs are; the ratios between the
rows of one run are what to read.  ``--compare DIR`` adds the xenkvm row again with the
xenkvm package of another built checkout (the commit before a change), in the same L1
(repeatable: several checkouts side by side);
``--vif-opt KEY=VALUE`` adds it with that key in its vif spec (``txcoalesce=500``: tx completions
held up to 500 us, docs/pv-backends.md), ``--pv-time-off`` adds it with ``xen.pv_time: false``, ``--fast-path-off`` with ``xen.fast_path: false``
(ring kicks and single-shot timers completed in C, xen/fastpath.py), ``--kernel-kicks-off`` with
``xen.kernel_kicks: false`` (kicks exit to the C loop instead of KVM's ioeventfds, xen/sendstub.py).
Under the rows, the vif's cost lines (hypercalls and upcalls per packet, 5-s windows) and
event latencies (each direction's kick to pass and notify call, and an rx notify to the guest's
next tx kick), its
counters when it closed, the namespace's (TCP retransmissions, the tap's drops), and per
direction L1 KVM's exits per data frame (``KVMSTAT``, tests/linux/nethost.py), for the
virtio-net row too.
``--trace DIR``: a 0.4-s window of L1's ftrace in each row's host->guest transfer, 0.5 s after
its start (tests/linux/nethost.py), saved to DIR and summarised under the row
(benchmarks/l1trace.py).
``--profile FILE``: py-spy (``.venv/bin/pip install py-spy``) samples the first xenkvm row's
VMM, every thread, into FILE (raw collapsed stacks: one ``thread;frame;...;frame count`` a line).
Needs root.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.linux import netboot  # noqa: E402
from tests.linux.test_linux_net import guest_yaml, run_xenkvm  # noqa: E402

QEMU_CMDLINE = ("console=ttyS0 rdinit=/net-init panic=-1 quiet loglevel=4 nokaslr mitigations=off nowatchdog "
                "random.trust_cpu=on cryptomgr.notests")


def loopback_in_ns(size: int) -> tuple[float, float]:
    """:func:`loopback` in a fresh namespace (L1's own has no ``lo`` up)."""
    with netboot.netns(f"xkl{os.getpid()}") as ns:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--loopback", "--bytes", str(size)],
                             check=True, capture_output=True, text=True).stdout
    secs = float(out.split()[-1])
    return secs, secs


def loopback(size: int) -> tuple[float, float]:
    """(send, receive) seconds of ``size`` bytes over TCP on 127.0.0.1: connect to the last byte read."""
    data = os.urandom(size)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def sink() -> None:
            conn, _ = srv.accept()
            with conn:
                while conn.recv(1 << 16):
                    pass

        t = threading.Thread(target=sink, daemon=True)
        t.start()
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(data)
        t.join()
        secs = time.monotonic() - t0
    return secs, secs      # one direction is the other on loopback


def run_qemu(ns: str, tmp: Path, size: int, timeout: float) -> netboot.NetRun:
    """The same kernel and init under QEMU/KVM with virtio-net-pci on tap qtap0 (in ``ns``)."""
    mods = netboot.kernel_modules(["virtio_pci", "virtio_net"])
    init = netboot.net_init(list(mods), [("eth0", "10.92.0")], size)
    initrd = netboot.initramfs(tmp / "qemu.cpio.gz", init, mods)
    console = tmp / "qemu-console.log"
    vhost = "on" if os.path.exists("/dev/vhost-net") else "off"
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1", "-nodefaults",
           "-display", "none", "-no-reboot", "-serial", f"file:{console}", "-kernel", str(netboot.KERNEL),
           "-initrd", str(initrd), "-append", QEMU_CMDLINE,
           "-netdev", f"tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost={vhost}",
           "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:5a:00:02"]
    r = netboot.run_in_ns(ns, cmd, [("qtap0", "10.92.0")], size, console, timeout)
    r.stderr += f"\n(vhost={vhost})"
    return r


def row(name: str, size: int, secs: tuple[float, float], problems: list[str]) -> str:
    mbs = lambda s: f"{size / s / 1e6:>10.2f}" if s == s and s > 0 else f"{'-':>10}"  # noqa: E731
    return f"{name:<28} {mbs(secs[0])} {mbs(secs[1])}  {'; '.join(problems) or 'verified'}"


VIF = (("xkn0", "eth0", "10.90.0", "on"),)


def run_other_xenkvm(ns: str, tmp: Path, tree: Path, size: int, timeout: float) -> netboot.NetRun:
    """:func:`run_xenkvm` with the xenkvm package of ``tree`` (``-P``: not this checkout's from the cwd)."""
    console = tmp / "console.log"
    cmd = ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-m", "xenkvm", "-v", "run",
           str(guest_yaml(tmp, VIF, size)), "--console", f"file:{console}"]
    return netboot.run_in_ns(ns, cmd, [("xkn0", "10.90.0")], size, console, timeout)


def cost_lines(run: netboot.NetRun) -> list[str]:
    """The vif's hypercalls/upcalls per packet (5-s windows) from the VMM's log."""
    lines = [line for line in run.stderr.splitlines()
             if "vif" in line and any(k in line for k in (": costs: ", ": tap ", ": event latency: "))]
    host = [line for line in run.host.splitlines() if line.startswith(("NETSTAT", "KVMSTAT", "TRACE"))]
    return ["  " + line.strip() for line in lines + host]


#: the variant rows: option -> the ``xen:`` key it sets
VARIANTS = {"pv_time_off": "pv_time: false", "fast_path_off": "fast_path: false",
            "kernel_kicks_off": "kernel_kicks: false", "fifo_on": "fifo_events: true"}


#: The first VMM run after L1's boot reads its Python and the guest's images through 9p as it
#: goes, which cost its guest->host transfer 4x in two runs (0.34-0.38 vs 1.72-1.79 MB/s, the
#: same code second): a small transfer first, not compared.
WARM_UP = 256 << 10


def profiler(out: Path) -> tuple[str, ...]:
    """py-spy recording every thread of the VMM into ``out`` (raw collapsed stacks, CPU time only)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.is_file():
        raise SystemExit(f"bench_rig_net: --profile needs py-spy: {spy.parent}/pip install py-spy")
    return (str(spy), "record", "-r", "250", "-f", "raw", "--threads", "-o", str(out), "--")


def traced(trace: Path | None, label: str) -> Path | None:
    """The row's trace file (``--trace``), handed to the host helper (nethost.py) through its
    environment; None without ``--trace``."""
    if trace is None:
        os.environ.pop("XENKVM_L1TRACE", None)
        return None
    from l1trace import file_name
    dest = trace / file_name(label, "-h2g")
    os.environ["XENKVM_L1TRACE"] = str(dest)
    return dest


def trace_lines(dest: Path | None) -> list[str]:
    if dest is None or not dest.is_file():
        return []
    from l1trace import summarize
    return [f"  L1 trace (h->g): {line}" for line in summarize(dest.read_text(errors="replace"))]


def inner(size: int, timeout: float, compare: tuple[Path, ...] = (), variants: tuple[str, ...] = (),
          profile: Path | None = None, trace: Path | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rig-net-"))
    for sub in ["w", "x", "q"] + [str(i) for i in range(len(variants))] + [f"c{i}" for i in range(len(compare))]:
        (tmp / sub).mkdir()
    with netboot.netns(f"xkw{os.getpid()}") as ns:
        w = run_xenkvm(ns, tmp / "w", vifs=VIF, size=WARM_UP, timeout=timeout)
    traces = {"x": traced(trace, "xenkvm")}
    with netboot.netns(f"xkb{os.getpid()}") as ns:
        x = run_xenkvm(ns, tmp / "x", vifs=VIF, size=size, timeout=timeout,
                       prefix=profiler(profile) if profile else ())
    rows = []
    for i, v in enumerate(variants):
        traces[f"v{i}"] = traced(trace, f"variant{i}")
        with netboot.netns(f"xkp{i}{os.getpid()}") as ns:
            if v.startswith("vif:"):        # --vif-opt: a key added to the vif's spec
                vif = ((*VIF[0][:3], f"{VIF[0][3]}, {v[4:]}"),)
                rows.append((v[4:], run_xenkvm(ns, tmp / str(i), vifs=vif, size=size, timeout=timeout)))
            else:
                rows.append((VARIANTS[v], run_xenkvm(ns, tmp / str(i), vifs=VIF, size=size, timeout=timeout,
                                                     xen_extra=VARIANTS[v])))
    others = []
    for i, tree in enumerate(compare):
        traces[f"c{i}"] = traced(trace, f"compare{i}")
        with netboot.netns(f"xkc{i}{os.getpid()}") as ns:
            others.append((tree, run_other_xenkvm(ns, tmp / f"c{i}", tree, size, timeout)))
    traces["q"] = traced(trace, "qemu")
    with netboot.netns(f"xkq{os.getpid()}") as ns:
        q = run_qemu(ns, tmp / "q", size, timeout)
    traced(None, "")
    print(f"TCP, {size >> 10} KiB each way, MB/s as the host timed it (guest runs: xenkvm {x.elapsed:.0f} s, "
          f"QEMU {q.elapsed:.0f} s wall, {q.stderr.strip().splitlines()[-1]})")
    print(f"{'row':<28} {'guest->host':>10} {'host->guest':>10}  checks")
    print(row(f"(warm-up, {WARM_UP >> 10} KiB)", WARM_UP, w.seconds("10.90.0"), w.transfers("eth0", "10.90.0", WARM_UP)))
    print(row("xenkvm vif (Xen PVH)", size, x.seconds("10.90.0"), x.transfers("eth0", "10.90.0", size)))
    print("\n".join(cost_lines(x) + trace_lines(traces["x"])))
    for i, (key, p) in enumerate(rows):
        print(row(f"xenkvm vif, {key.replace(': ', '=')}", size, p.seconds("10.90.0"),
                  p.transfers("eth0", "10.90.0", size)))
        print("\n".join(cost_lines(p) + trace_lines(traces[f"v{i}"])))
    for i, (tree, c) in enumerate(others):
        print(row(f"xenkvm from {tree.name}"[:28], size, c.seconds("10.90.0"), c.transfers("eth0", "10.90.0", size)))
        print("\n".join(cost_lines(c) + trace_lines(traces[f"c{i}"])))
    print(row("QEMU virtio-net + tap", size, q.seconds("10.92.0"), q.transfers("eth0", "10.92.0", size)))
    print("\n".join(cost_lines(q) + trace_lines(traces["q"])))
    print(row("loopback floor (L1, Python)", size, loopback_in_ns(size), []))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=32 << 20, help="bytes each way (default 32 MiB, the docs' figures)")
    p.add_argument("--timeout", type=float, default=3000, help="seconds for the whole rig run")
    p.add_argument("--inner", action="store_true", help="measure here (inside L1)")
    p.add_argument("--loopback", action="store_true", help="only the loopback floor here: print its seconds")
    p.add_argument("--compare", type=Path, action="append", default=[],
                   help="also run the xenkvm row with this checkout's xenkvm (built; repeatable)")
    p.add_argument("--pv-time-off", action="store_true",
                   help="also run the xenkvm row with xen.pv_time: false (docs/linux-xen.md)")
    p.add_argument("--fast-path-off", action="store_true",
                   help="also run the xenkvm row with xen.fast_path: false (kicks and timers through Python)")
    p.add_argument("--kernel-kicks-off", action="store_true",
                   help="also run the xenkvm row with xen.kernel_kicks: false (kicks exit to the C loop)")
    p.add_argument("--fifo-on", action="store_true",
                   help="also run the xenkvm row with xen.fifo_events: true (FIFO channels, notifies through Python)")
    p.add_argument("--vif-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="also run the xenkvm row with KEY=VALUE added to its vif (txcoalesce=500; repeatable)")
    p.add_argument("--trace", type=Path, metavar="DIR",
                   help="save a window of L1's ftrace in each row's host->guest transfer to DIR (benchmarks/l1trace.py)")
    p.add_argument("--profile", type=Path,
                   help="py-spy the first xenkvm row's VMM into this file (raw stacks; needs py-spy in the venv)")
    a = p.parse_args(argv)
    if a.loopback:
        print(f"{loopback(a.bytes)[0]:.6f}")
        return 0
    if os.geteuid() != 0:
        print("bench_rig_net: needs root (namespaces, taps); skipped")
        return 0
    if a.inner:
        variants = tuple(v for v in VARIANTS if getattr(a, v)) + tuple(f"vif:{o}" for o in a.vif_opt)
        return inner(a.bytes, a.timeout, tuple(a.compare), variants, a.profile, a.trace)
    for need in (netboot.IMAGE, netboot.KERNEL):
        if not need.is_file():
            print(f"bench_rig_net: {need} missing: run `make linux-xen-image` first")
            return 1
    from xenkvm.rig import image, runner
    l1 = image.build(ROOT / ".cache" / "rig")
    with tempfile.TemporaryDirectory(prefix="bench-rig-net-") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", "--bytes", str(a.bytes)]
        for tree in a.compare:
            cmd += ["--compare", str(tree.resolve())]
        cmd += [f"--{v.replace('_', '-')}" for v in VARIANTS if getattr(a, v)]
        for opt in a.vif_opt:
            cmd += ["--vif-opt", opt]
        if a.profile:
            profiler(a.profile)          # fails here, before L1 boots, without py-spy
            cmd += ["--profile", f"{image.CHROOT_OUT}/profile.txt"]
        if a.trace is not None:
            cmd += ["--trace", image.CHROOT_OUT]
        res = runner.run(l1, cmd, cwd=ROOT, out_dir=Path(out), timeout=a.timeout)
        if a.profile and (Path(out) / "profile.txt").is_file():
            shutil.copyfile(Path(out) / "profile.txt", a.profile)
        if a.trace is not None:
            a.trace.mkdir(parents=True, exist_ok=True)
            for f in Path(out).glob("trace-*.txt"):
                shutil.copy(f, a.trace / f.name)
    print(res.output, end="")
    print(f"(rig: L1 ready after {res.ready_s:.1f} s, {res.total_s:.0f} s in all)")
    return res.status


if __name__ == "__main__":
    sys.exit(main())
