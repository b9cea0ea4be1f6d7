"""Debian's kernel with a NIC in a network namespace: ping and TCP both ways, checksummed.

The harness of tests/linux/test_linux_net.py (xenkvm, Xen PVH, vifs) and
benchmarks/bench_rig_net.py (the same, and QEMU with virtio-net on a tap).  The
test creates a namespace and runs the VMM inside it (``ip netns exec``), so the
VMM's taps are created there; tests/linux/nethost.py, also inside, gives each tap
its host address and serves two TCP ports on it.

The guest's init is :func:`net_init`'s (``rdinit=/net-init``), in a second cpio
archive appended to the Xen initramfs (the kernel unpacks concatenated archives in
order) with the NIC driver's modules: it loads them, gives each interface
``<net>.2/24``, and per interface pings ``<net>.1``, sends SIZE random bytes with
busybox ``nc`` and prints their sha256, receives SIZE bytes and prints their sha256
(``NET-TX``/``NET-RX`` lines), then dumps dmesg and powers off.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.linux.xenboot import ROOT, stacks_then_kill
from xenkvm.images import DMESG_BEGIN, DMESG_END
from xenkvm.machine.boot.initramfs import Cpio

IMAGE = ROOT / ".cache" / "linux" / "initramfs-xen.cpio.gz"
KERNEL = ROOT / ".cache" / "linux" / "vmlinuz"
MODULES = ROOT / ".cache" / "linux" / "kernel" / "lib" / "modules"
NET_APPLETS = ("ip", "ping", "nc", "sha256sum", "cut", "usleep")


def net_init(modules: list[str], ifaces: list[tuple[str, str]], size: int) -> str:
    """/net-init: load ``modules`` (file names), then per (interface, /24 prefix) ping and move data."""
    pairs = " ".join(f'"{eth} {net}"' for eth, net in ifaces)
    return f"""#!/bin/sh
# tests/linux/netboot.py: NIC up, ping, TCP both ways with checksums, dmesg, power off.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in {" ".join(modules)}; do insmod /lib/modules/$m || echo "NET-ERROR insmod $m"; done
i=0
while [ ! -e /sys/class/net/{ifaces[-1][0]} ] && [ $i -lt 3000 ]; do usleep 20000; i=$((i+1)); done
for v in {pairs}; do
    set -- $v
    ip link set "$1" up && ip addr add "$2.2/24" dev "$1" || echo "NET-ERROR $1 address"
done
for v in {pairs}; do
    set -- $v
    i=0
    until ping -c 1 -W 1 "$2.1" >/dev/null 2>&1; do i=$((i+1)); [ $i -ge 120 ] && break; done
    ping -c 3 -W 5 "$2.1" >/dev/null 2>&1 && echo "NET-PING-OK $1" || echo "NET-PING-FAIL $1"
    dd if=/dev/urandom of=/tx bs=65536 count={size // 65536} 2>/dev/null
    echo "NET-TX $1 $(wc -c < /tx) $(sha256sum < /tx | cut -d' ' -f1) at $(cut -d' ' -f1 /proc/uptime)"
    nc "$2.1" 5001 < /tx || echo "NET-ERROR $1 nc send $?"
    nc "$2.1" 5002 < /dev/null > /rx || echo "NET-ERROR $1 nc receive $?"
    echo "NET-RX $1 $(wc -c < /rx) $(sha256sum < /rx | cut -d' ' -f1) at $(cut -d' ' -f1 /proc/uptime)"
    rm -f /tx /rx
done
echo {DMESG_BEGIN}
dmesg
echo {DMESG_END}
poweroff -f
"""


def initramfs(path: Path, init: str, modules: dict[str, bytes] | None = None) -> Path:
    """The Xen initramfs with ``init`` as /net-init, the applets and ``modules`` (file name: ELF) appended."""
    extra = Cpio().add_file("net-init", init, mode=0o755)
    for applet in NET_APPLETS:
        extra.add_symlink(f"bin/{applet}", "busybox")
    for name, elf in (modules or {}).items():
        extra.add_file(f"lib/modules/{name}", elf)
    path.write_bytes(IMAGE.read_bytes() + extra.to_bytes(compress="gzip"))
    return path


def kernel_modules(names: list[str]) -> dict[str, bytes]:
    """The cloud kernel's modules ``names`` and their dependencies, in load order (file name: ELF)."""
    from xenkvm.rig.kmod import ModuleTree
    tree = ModuleTree(sorted(MODULES.iterdir())[-1])
    return {f"{m.name}.ko": m.elf for m in tree.load_order(names)}


@contextmanager
def netns(name: str):
    """A fresh network namespace with ``lo`` up; deleted afterwards."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@dataclass
class NetRun:
    returncode: int | None
    console: str
    host: str          #: nethost.py's lines
    stderr: str        #: the VMM's (or QEMU's)
    elapsed: float

    def transfers(self, eth: str, net: str, size: int) -> list[str]:
        """What is wrong with ``eth``'s ping and transfers (empty: all verified)."""
        out = [] if f"NET-PING-OK {eth}" in self.console else [f"{eth}: no ping"]
        tx = re.search(rf"^NET-TX {eth} (\d+) (\w+)", self.console, re.M)
        sink = re.search(rf"^SINK {net}\.1 (\d+) (\w+)", self.host, re.M)
        if not (tx and sink and tx.groups() == sink.groups() == (str(size), sink.group(2))):
            out.append(f"{eth}: guest->host {tx and tx.groups()} vs {sink and sink.groups()}")
        rx = re.search(rf"^NET-RX {eth} (\d+) (\w+)", self.console, re.M)
        source = re.search(rf"^SOURCE {net}\.1 (\d+) (\w+)", self.host, re.M)
        if not (rx and source and rx.groups() == source.groups()):
            out.append(f"{eth}: host->guest {rx and rx.groups()} vs {source and source.groups()}")
        return out

    def seconds(self, net: str) -> tuple[float, float]:
        """(guest->host, host->guest) seconds of ``net``'s transfers, as the host measured them."""
        sink = re.search(rf"^SINK {net}\.1 \d+ \w+ ([\d.]+)", self.host, re.M)
        sent = re.search(rf"^SENT {net}\.1 \d+ ([\d.]+)", self.host, re.M)
        return float(sink.group(1)) if sink else float("nan"), float(sent.group(1)) if sent else float("nan")


def run_in_ns(ns: str, cmd: list[str], taps: list[tuple[str, str]], size: int, console: Path,
              timeout: float, fill: bool = False) -> NetRun:
    """Run ``cmd`` (the VM) in ``ns`` beside nethost.py serving ``taps`` ((tap, /24 prefix)); ``fill``: the
    host's sink lets its receive buffer fill before reading (nethost.py ``--fill``)."""
    exec_ns = ["ip", "netns", "exec", ns]
    helper = subprocess.Popen([*exec_ns, sys.executable, str(ROOT / "tests" / "linux" / "nethost.py"),
                               *(["--fill"] if fill else []), str(size),
                               *(f"{tap}={net}.1/24" for tap, net in taps)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    vm = subprocess.Popen([*exec_ns, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace")
    try:
        try:
            _, err = vm.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:   # past its time: its threads' stacks into stderr, then killed
            stacks_then_kill(vm)
            _, err = vm.communicate(timeout=30)
            err += f"\n(killed after {timeout:.0f} s)"
    finally:
        elapsed = time.monotonic() - t0
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        helper.kill()
        out, _ = helper.communicate(timeout=30)
    text = console.read_text(errors="replace") if console.exists() else ""
    return NetRun(vm.returncode, text, out, err, elapsed)
