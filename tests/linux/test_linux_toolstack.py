"""Debian Xen guests under the toolstack, driven as a user drives them (issue 12, items 2 and 5).

Each guest (``deb-a``, ``deb-b``) is PVH, from its own ``xenkvm create`` of an xl.cfg
file the test writes: each has its own copy of ``.cache/linux/rootfs.ext4`` as ``xvda``
and a vif on one host bridge the test makes in a network namespace (the VMMs run in it,
so their taps are there).  The image copies carry ``/xenkvm/net.sh`` (loads
``xen-netfront`` and gives ``eth0`` its address) and the module files; with no
``/xenkvm/run`` the rootfs init starts a shell on ``hvc0``, which the test types into
through the control API's console op (:class:`Shell`).

Two tests of two Debian boots each, so that each can run (and fail) alone:

``test_two_debian_guests_side_by_side``
    1. both guests get addresses, ping each other and the host, and move 256 KiB over TCP
       (busybox ``nc``) from a to b, checksummed; ``xenkvm list`` shows both running;
    2. ``xenkvm destroy deb-b``: ``deb-a`` still runs and answers the host's ping; Debian's
       ``xenstore-ls`` against the shared xenstored lists a's nodes and backends, none of b's;
    3. ``xenkvm shutdown deb-a --wait``: the list is empty.

``test_one_debian_guest_driven_and_restarted`` (``deb-a`` alone: ``maxvcpus = 2, vcpus = 1``,
``on_reboot = "restart"``)
    1. a command typed through ``xenkvm console`` in a pty comes back; ``pause``/``unpause``
       (the guest's uptime does not advance by the pause); ``mem-set`` (its balloon reaches the
       target); ``vcpu-set 2`` then ``1`` (Linux's xen cpu hotplug makes cpu1 present, the guest
       onlines it as udev would, then takes it offline); ``block-attach`` of a second disk (the
       guest reads it, checksummed) and ``network-attach`` of a second vif;
    2. ``xenkvm reboot deb-a --wait``: the guest comes back with ``xvdb`` (same data) and
       ``eth1``, as xl keeps hot-plugged devices in the domain's config, and pings the host.

Markers ``linux`` and ``linux_more`` (on PVM hosts only in ``make test-linux``: each boot takes
10+ minutes there); in the rig: ``flock /tmp/xenkvm-rig.lock .venv/bin/python -m xenkvm.rig
test tests/linux/test_linux_toolstack.py -s``.  Needs root (namespace, bridge, taps).
"""
from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.linux import netboot
from tests.linux.xenboot import ROOT
from xenkvm.images import XEN_CMDLINE
from xenkvm.rootfs import ROOTFS_ERROR, ROOTFS_MARKER, install_binary, install_script
from xenkvm.toolstack.client import ControlClient

#: Seconds for one phase (a boot, a command): seconds in an idle rig, far more on a busy host.
TIMEOUT = float(os.environ.get("XENKVM_TOOLSTACK_TIMEOUT", "900"))
#: hw: in make test's rig part (both passed there on 2026-12-02: 212 s and 337 s on a loaded host)
pytestmark = [pytest.mark.linux, pytest.mark.linux_more, pytest.mark.hw, pytest.mark.timeout(TIMEOUT * 6)]

CACHE = ROOT / ".cache" / "linux"
#: Debian's busybox-static (unpacked by the image builds): the host side's ping (hosts may have none)
BUSYBOX = CACHE / "busybox" / "bin" / "busybox"
BRIDGE, NET = "xkbr0", "10.92.0"
A, B = "deb-a", "deb-b"
MIB = 1 << 20
NETFRONT = "xen-netfront"
#: a -> b over TCP: small, as guest TCP in the rig runs at ~0.1 MB/s (tests/linux/test_linux_net.py)
TCP_BYTES = 256 << 10
VCPU_CYCLES = int(os.environ.get("XENKVM_TOOLSTACK_VCPU_CYCLES", "1"))


def xenkvm(run_dir: Path, *args: str, ns: str | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (in ``ns`` for ``create``, so the VMM's taps are made there)."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*pre, sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                          errors="replace", timeout=timeout, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"{' '.join(r.args[-4:])}: exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def net_script(modules: list[str]) -> str:
    """/xenkvm/net.sh ADDR: netfront and its dependencies in, each ethN up, eth0 gets ADDR/24."""
    loads = "\n".join(f"insmod /xenkvm/{m} 2>/dev/null || grep -q '^{m[:-3].replace('-', '_')} ' /proc/modules "
                      f"|| echo 'insmod {m} failed'" for m in modules)
    return f"""#!/bin/sh
{loads}
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do usleep 50000; i=$((i+1)); done
for d in /sys/class/net/eth*; do ip link set "${{d##*/}}" up; done
ip addr add "$1/24" dev eth0
"""


def image(tmp: Path, name: str) -> Path:
    """A copy of the rootfs image with net.sh and the netfront modules, no /xenkvm/run (a shell)."""
    root = tmp / f"{name}.ext4"
    subprocess.run(["cp", "--sparse=always", str(CACHE / "rootfs.ext4"), str(root)], check=True)
    mods = netboot.kernel_modules([NETFRONT])
    for file, elf in mods.items():
        src = tmp / file
        src.write_bytes(elf)
        install_binary(root, src, f"/xenkvm/{file}")
    install_script(root, net_script(list(mods)), "/xenkvm/net.sh")
    return root


def xl_cfg(tmp: Path, name: str, root: Path, mac: str, tap: str, extra_keys: str = "") -> Path:
    """An xl.cfg(5) file: PVH, 256 MiB, xvda = ``root``, one vif on the test's bridge."""
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "pvh"\nkernel = "{CACHE / "vmlinuz"}"\n'
                   f'ramdisk = "{CACHE / "initramfs-disk.cpio.gz"}"\ncmdline = "{XEN_CMDLINE} pci=off"\n'
                   f'memory = 256\nvcpus = 1\n'
                   f'disk = ["format=raw, vdev=xvda, access=rw, target={root}"]\n'
                   f'vif = ["mac={mac}, bridge={BRIDGE}, vifname={tap}"]\n'
                   f'on_poweroff = "destroy"\non_crash = "preserve"\n{extra_keys}')
    return cfg


class Shell:
    """A guest's shell on its console (the control API's console op), read on a thread."""

    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.client = ControlClient(str(run_dir / name / "control.sock"), timeout=10)
        self.out = bytearray(self.client.attach_console())
        self.client.sock.settimeout(None)
        self.n = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := self.client.sock.recv(65536):
                self.out += chunk
        except OSError:
            pass

    @property
    def text(self) -> str:
        return bytes(self.out).decode(errors="replace")

    def wait(self, pattern: str, start: int = 0, timeout: float = TIMEOUT) -> re.Match:
        """The first match of ``pattern`` in the console bytes after ``start`` (polled: cheap in the rig)."""
        rx = re.compile(pattern.encode(), re.M | re.S)
        deadline = time.monotonic() + timeout
        while (m := rx.search(self.out, start)) is None:
            assert ROOTFS_ERROR.encode() not in self.out[start:], self.text[-3000:]
            assert time.monotonic() < deadline, f"{self.name}: no {pattern!r} in time:\n{self.text[-3000:]}"
            time.sleep(0.2)
        return m

    def booted(self, start: int = 0) -> int:
        """Wait for the rootfs init's marker (after ``start``); the shell comes right after."""
        return self.wait(rf"^{ROOTFS_MARKER} \S+ root=/dev/xvda ext4", start).end()

    def run(self, cmd: str, timeout: float = TIMEOUT, check: bool = True) -> str:
        """Type ``cmd`` into the shell; its output (``\\r\\n`` made ``\\n``).  The markers are printed
        by ``printf``, so the echoed command line never matches them."""
        self.n += 1
        n, start = self.n, len(self.out)
        self.client.sock.sendall(f"printf 'XKO%s\\n' {n}; {cmd}; printf 'XKE%s %s\\n' {n} $?\n".encode())
        m = self.wait(rf"^XKO{n}\r?\n(.*?)^XKE{n} (\d+)\r?$", start, timeout)
        output = m.group(1).decode(errors="replace").replace("\r\n", "\n")
        assert not check or m.group(2) == b"0", f"{self.name}: `{cmd}` exit {int(m.group(2))}:\n{output[-2000:]}"
        return output

    def close(self) -> None:
        self.client.close()


def wait_guest(shell: Shell, cond: str, what: str) -> None:
    """Poll a shell test in the guest (up to 5 minutes of its time)."""
    shell.run(f"i=0; until {cond}; do i=$((i+1)); [ $i -gt 3000 ] && echo 'timeout: {what}' && break; "
              "usleep 100000; done")
    out = shell.run(f"{cond} && echo yes || echo no")
    assert out.strip() == "yes", f"{shell.name}: {what} never happened"


class Phases:
    """Seconds from the start to the end of each phase; each is printed as it ends (a long run in the
    rig shows how far it got)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ends: dict[str, float] = {}

    def done(self, name: str) -> None:
        self.ends[name] = time.monotonic() - self.t0
        print(f"\n[{self.ends[name]:.0f} s] {name}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.0f}s" for k, v in self.ends.items())


def figure(line: str) -> None:
    """A measurement for the docs (docs/control-api.md), printed as it is made."""
    print(f"\nFIGURE {line}", file=sys.stderr, flush=True)


def host_ping(ns: str, addr: str) -> str:
    """Three pings from the host's side of the bridge (in ``ns``); their output."""
    r = subprocess.run(["ip", "netns", "exec", ns, str(BUSYBOX), "ping", "-c", "3", "-W", "5", addr],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"host ping {addr}: exit {r.returncode}: {r.stdout[-800:]} {r.stderr[-800:]}"
    return r.stdout


def listing(run_dir: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(ok(xenkvm(run_dir, "list", "--json")))}


def _need() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 (a namespace, a bridge, taps)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    for f in ("vmlinuz", "initramfs-disk.cpio.gz", "rootfs.ext4", "busybox/bin/busybox"):
        if not (CACHE / f).is_file():
            pytest.skip("no root file system image: run `make rootfs-image` first")
    if not shutil.which("debugfs") and not os.path.exists("/usr/sbin/debugfs"):
        pytest.skip("no debugfs (e2fsprogs)")
    if not shutil.which("xenstore-ls"):
        pytest.skip("no xenstore-ls (Debian's xenstore-utils)")


class Lab:
    """One test's world: a network namespace with the bridge (the VMMs run in it), a run
    directory, the shells opened; everything destroyed and stopped afterwards."""

    def __init__(self, tmp: Path, ns: str):
        self.tmp, self.ns = tmp, ns
        self.run_dir = tmp / "run"
        self.shells: list[Shell] = []
        self.phases = Phases()

    def create(self, name: str, mac: str, tap: str, extra_keys: str) -> None:
        ok(xenkvm(self.run_dir, "create", str(xl_cfg(self.tmp, name, image(self.tmp, name), mac, tap, extra_keys)),
                  ns=self.ns))

    def shell(self, name: str) -> Shell:
        s = Shell(self.run_dir, name)
        self.shells.append(s)
        return s


@contextmanager
def lab(tmp: Path):
    """A :class:`Lab` for the test's guests (whatever it created is destroyed on the way out)."""
    _need()
    with netboot.netns(f"xkts{os.getpid()}") as ns:
        for cmd in (["ip", "link", "add", BRIDGE, "type", "bridge"], ["ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE],
                    ["ip", "link", "set", BRIDGE, "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        world = Lab(tmp, ns)
        try:
            yield world
        finally:
            for s in world.shells:
                s.close()
            for name in (A, B):
                xenkvm(world.run_dir, "destroy", name, timeout=120)
            xenkvm(world.run_dir, "xenstored", "--shared", "--stop", timeout=120)


def test_two_debian_guests_side_by_side(tmp_path: Path) -> None:
    """Two boots: both guests on the bridge (pings, TCP a -> b), then b destroyed while a runs on
    (the shared store keeps a's nodes and drops b's), then a shut down."""
    with lab(tmp_path) as w:
        w.create(A, "00:16:3e:5b:00:0a", "xka0", 'on_reboot = "destroy"\n')
        w.create(B, "00:16:3e:5b:00:0b", "xkb0", 'on_reboot = "destroy"\n')
        w.phases.done("both created")
        rows = listing(w.run_dir)
        assert {n: (r["domid"], r["state"]) for n, r in rows.items()} == {A: (1, "running"), B: (2, "running")}, rows
        a, b = w.shell(A), w.shell(B)
        a.booted()
        b.booted()
        w.phases.done("both booted")
        _network(a, b, w.ns)
        w.phases.done("network checked")
        assert {n: r["state"] for n, r in listing(w.run_dir).items()} == {A: "running", B: "running"}

        ok(xenkvm(w.run_dir, "destroy", B))
        assert {n: r["state"] for n, r in listing(w.run_dir).items()} == {A: "running"}
        host_ping(w.ns, f"{NET}.2")
        _store_after_destroy(w.run_dir)
        a.run("echo still here")
        w.phases.done("b destroyed, a and the store intact")

        ok(xenkvm(w.run_dir, "shutdown", A, "--wait", "--timeout", str(TIMEOUT)))
        assert listing(w.run_dir) == {}
        w.phases.done("a shut down")
        print(f"\ntwo Debian guests, rig={bool(os.environ.get('XENKVM_RIG'))}: {w.phases}")


def test_one_debian_guest_driven_and_restarted(tmp_path: Path) -> None:
    """Two boots of one guest (``maxvcpus = 2, vcpus = 1``, ``on_reboot = "restart"``): console,
    pause, mem-set, vcpu-set, hot-plugged disk and vif, then a reboot that keeps them."""
    with lab(tmp_path) as w:
        w.create(A, "00:16:3e:5b:00:0a", "xka0", 'maxvcpus = 2\non_reboot = "restart"\n')
        a = w.shell(A)
        a.booted()
        w.phases.done("booted")
        a.run(f"sh /xenkvm/net.sh {NET}.2")
        _console_cli(w.run_dir)
        w.phases.done("console typed into")
        _pause(w.run_dir, a)
        w.phases.done("paused and unpaused")
        _mem_set(w.run_dir, a)
        w.phases.done("mem-set down and up")
        _vcpu_set(w.run_dir, a)
        w.phases.done("vcpu-set 2 then 1")
        disk_md5 = _hotplug(w.run_dir, w.tmp, a)
        w.phases.done("hot-plugged")

        mark = len(a.out)
        ok(xenkvm(w.run_dir, "reboot", A, "--wait", "--timeout", str(TIMEOUT)))
        a.booted(mark)
        w.phases.done("restarted")
        assert listing(w.run_dir)[A]["state"] == "running"
        a.run(f"sh /xenkvm/net.sh {NET}.2")
        a.run("i=0; until [ -e /sys/class/net/eth1 ] && [ -b /dev/xvdb ]; do i=$((i+1)); [ $i -gt 600 ] && break; "
              "usleep 100000; done")
        assert a.run("ls /sys/class/net").split() == ["eth0", "eth1", "lo"], "the restarted guest lost its second vif"
        assert a.run("dd if=/dev/xvdb bs=1M count=16 2>/dev/null | md5sum").split()[0] == disk_md5
        a.run(f"i=0; until ping -c 1 -W 1 {NET}.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -ge 120 ] && break; done; "
              f"ping -c 3 -W 5 {NET}.1")
        w.phases.done("devices back")
        ok(xenkvm(w.run_dir, "destroy", A))
        assert listing(w.run_dir) == {}
        print(f"\none Debian guest, rig={bool(os.environ.get('XENKVM_RIG'))}: {w.phases}")


def _network(a: Shell, b: Shell, ns: str) -> None:
    """Addresses, pings every way, TCP_BYTES a -> b over TCP with checksums; the RTTs and the
    transfer's rate (by a's clock, from connect to b's close) are printed as figures."""
    a.run(f"sh /xenkvm/net.sh {NET}.2")
    b.run(f"sh /xenkvm/net.sh {NET}.3")
    for s, peer in ((a, f"{NET}.3"), (b, f"{NET}.2"), (a, f"{NET}.1")):
        out = s.run(f"i=0; until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -ge 120 ] && break; "
                    f"done; ping -c 3 -W 5 {peer}")
        rtt = re.search(r"min/avg/max = (\S+) ms", out)
        figure(f"ping {s.name} -> {peer}: min/avg/max {rtt.group(1) if rtt else '?'} ms")
    for addr in (f"{NET}.2", f"{NET}.3"):
        rtt = re.search(r"min/avg/max = (\S+) ms", host_ping(ns, addr))
        figure(f"ping host -> {addr}: min/avg/max {rtt.group(1) if rtt else '?'} ms")
    # nc half-closes when its stdin ends, and the other side then stops sending: the listener's
    # stdin is a pipe that stays open (a background job's stdin may be /dev/null)
    b.run("sleep 100000 | nc -l -p 5000 > /tmp/rx & echo $! > /tmp/nc.pid")
    a.run(f"dd if=/dev/urandom of=/tmp/tx bs=64k count={TCP_BYTES >> 16} 2>/dev/null")
    sent = a.run("md5sum < /tmp/tx").split()[0]
    span = a.run("t0=$(cut -d' ' -f1 /proc/uptime); i=0; "
                 f"until nc {NET}.3 5000 < /tmp/tx; do i=$((i+1)); [ $i -ge 20 ] && break; usleep 200000; done; "
                 "echo $t0 $(cut -d' ' -f1 /proc/uptime)").split()
    b.run("i=0; while grep -qs '^State:[[:space:]]*[RSD]' /proc/$(cat /tmp/nc.pid)/status; do "
          "i=$((i+1)); [ $i -gt 600 ] && break; usleep 100000; done")          # running, not yet a zombie
    assert b.run("wc -c < /tmp/rx").strip() == str(TCP_BYTES)
    assert b.run("md5sum < /tmp/rx").split()[0] == sent, "b received other bytes than a sent"
    seconds = float(span[-1]) - float(span[-2])
    figure(f"TCP a -> b: {TCP_BYTES >> 10} KiB in {seconds:.2f} s "
           f"({TCP_BYTES / max(seconds, 0.01) / 1e6:.3f} MB/s, a's clock, with connect)")


def _console_cli(run_dir: Path) -> None:
    """``xenkvm console deb-a`` in a pty: a typed command's output comes back; Ctrl-] detaches."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "console", A], cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + TIMEOUT

    def until(marker: bytes) -> None:
        while marker not in out:
            assert time.monotonic() < deadline, f"no {marker!r} on the console:\n{out[-1500:].decode(errors='replace')}"
            if select.select([master], [], [], 1.0)[0]:
                out.extend(os.read(master, 65536))
    try:
        until(ROOTFS_MARKER.encode())          # attached: the replay of what the guest printed came
        os.write(master, b"echo typed-$((6*7))-here\n")
        until(b"typed-42-here")
        os.write(master, b"\x1d")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def _pause(run_dir: Path, a: Shell) -> None:
    """Across a pause the guest's clock (Xen system time) stands still: its uptime grows by less
    than the host's wall time between the two readings minus most of the pause."""
    pause_s = 6.0
    up = lambda: float(a.run("cut -d' ' -f1 /proc/uptime").strip())  # noqa: E731
    before, t_before = up(), time.monotonic()
    ok(xenkvm(run_dir, "pause", A))
    assert listing(run_dir)[A]["state"] == "paused"
    time.sleep(pause_s)
    ok(xenkvm(run_dir, "unpause", A))
    after, t_after = up(), time.monotonic()
    assert after - before < (t_after - t_before) - pause_s / 2, \
        f"guest uptime {before} -> {after} across a {pause_s} s pause ({t_after - t_before:.1f} s host)"
    assert listing(run_dir)[A]["state"] == "running"


def _mem_set(run_dir: Path, a: Shell) -> None:
    """The balloon driver reaches a lower target and comes back (its target_kb is Linux's reading of
    memory/target, less what was never populated: compared with itself, as the balloon test does)."""
    d = "/sys/devices/system/xen_memory/xen_memory0"
    cur, tgt = f"$(cat {d}/info/current_kb)", f"$(cat {d}/target_kb)"
    start = int(a.run(f"cat {d}/info/current_kb").strip())
    ok(xenkvm(run_dir, "mem-set", A, "192M"))
    wait_guest(a, f"[ {tgt} -le {192 << 10} ] && [ {cur} -eq {tgt} ]", "the balloon reaching 192 MiB")
    ok(xenkvm(run_dir, "mem-set", A, "256M"))
    wait_guest(a, f"[ {cur} -eq {start} ]", "the balloon back at its start")


def _vcpu_set(run_dir: Path, a: Shell) -> None:
    """maxvcpus = 2, vcpus = 1: Linux's xen cpu_hotplug follows cpu/1/availability.  A CPU made
    present is onlined by the guest (udev's job; here the shell's), as on Xen."""
    cpu1 = "/sys/devices/system/cpu/cpu1"
    assert a.run("cat /sys/devices/system/cpu/online").strip() == "0"
    assert listing(run_dir)[A]["vcpus"] == 1
    for _ in range(VCPU_CYCLES):      # online, offline (and again: a CPU taken down comes back)
        ok(xenkvm(run_dir, "vcpu-set", A, "2"))
        wait_guest(a, f"[ -e {cpu1}/online ]", "cpu1 to be present")
        a.run(f"echo 1 > {cpu1}/online")
        assert a.run("cat /sys/devices/system/cpu/online").strip() == "0-1"
        assert a.run("grep -c ^processor /proc/cpuinfo").strip() == "2"
        assert listing(run_dir)[A]["vcpus"] == 2
        ok(xenkvm(run_dir, "vcpu-set", A, "1"))
        wait_guest(a, f"[ ! -e {cpu1}/online ] || [ $(cat {cpu1}/online) = 0 ]", "cpu1 to go offline")
        assert a.run("cat /sys/devices/system/cpu/online").strip() == "0"


def _hotplug(run_dir: Path, tmp: Path, a: Shell) -> str:
    """block-attach xvdb (16 MiB of random data: the guest's md5 must match) and network-attach eth1."""
    data = os.urandom(16 * MIB)
    disk = tmp / "second.img"
    disk.write_bytes(data)
    ok(xenkvm(run_dir, "block-attach", A, f"format=raw, vdev=xvdb, access=rw, target={disk}"))
    ok(xenkvm(run_dir, "network-attach", A, f"mac=00:16:3e:5b:01:0a, bridge={BRIDGE}, vifname=xka1"))
    wait_guest(a, "[ -b /dev/xvdb ] && [ -e /sys/class/net/eth1 ]", "xvdb and eth1")
    md5 = hashlib.md5(data).hexdigest()
    assert a.run("dd if=/dev/xvdb bs=1M count=16 2>/dev/null | md5sum").split()[0] == md5
    deadline = time.monotonic() + TIMEOUT
    while (rows := json.loads(ok(xenkvm(run_dir, "network-list", A, "--json")))) and \
            [r["frontend_state"] for r in rows] != [4, 4] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(r["devid"], r["ifname"], r["frontend_state"]) for r in rows] == [(0, "xka0", 4), (1, "xka1", 4)], rows
    return md5


def _store_after_destroy(run_dir: Path) -> None:
    """Debian's xenstore-ls against the shared xenstored: a's nodes and backends, nothing of b's."""
    env = {**os.environ, "XENSTORED_PATH": str(run_dir / ".xenstored" / "socket")}
    ls = lambda path: subprocess.run(["xenstore-ls", path], capture_output=True, text=True, env=env,  # noqa: E731
                                     timeout=60)
    home = ls("/local/domain")
    assert home.returncode == 0, home.stderr
    tops = re.findall(r"^(\d+) = ", home.stdout, re.M)
    assert "1" in tops and "2" not in tops, home.stdout[:2000]
    assert f'name = "{A}"' in home.stdout and B not in home.stdout
    for kind in ("vbd", "vif"):
        be = ls(f"/local/domain/0/backend/{kind}")
        assert be.returncode == 0, be.stderr
        assert re.findall(r"^(\d+) = ", be.stdout, re.M) == ["1"], be.stdout[:2000]
