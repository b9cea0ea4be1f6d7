"""Debian's kernel on our vif: xen-netfront gets an address, pings, and moves data both ways.

One PVH boot (1 vCPU) with two vifs in a network namespace the test creates
(tests/linux/netboot.py): ``eth0`` on tap ``xkn0`` with the backend's offloads
(GSO/TSO v4 and v6, checksum offload), ``eth1`` on tap ``xkn1`` with ``offload=off``
(no GSO, no IPv6 checksum offload; the tap hands over finished frames only).  The
guest loads xen-netfront.ko (images.XEN_MODULES), takes 10.90.0.2 and 10.91.0.2
(static), and per vif pings the host and sends and receives :data:`SIZE` random bytes
over TCP (busybox ``nc``), both ways checksummed.  Checked: every ping, both checksums
per vif against the host's, a clean dmesg, and the backend's counters (logged when the
vif closes): on eth0 GSO frames crossed the rings both ways (TSO in the guest, and the
host's TSO through the tap), on eth1 none did, and nothing was malformed or dropped.

Marked ``hw`` (the rig boots it: ``flock /tmp/xenkvm-rig.lock .venv/bin/python -m
xenkvm.rig test tests/linux/test_linux_net.py``) and ``linux_more`` (on PVM hosts only in
``make test-linux``: minutes there).  Needs root (a namespace, taps).  SIZE is 1 MiB
(``XENKVM_NET_BYTES`` sets it): in the rig guest->host TCP runs at ~0.1 MB/s (each
tx completion crosses L1's emulated CPU several times, and the guest's TCP small
queues wait for it), so more would make the boot longer than CI can pay for.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.linux import netboot
from tests.linux.test_linux_xen import TIMEOUT
from tests.linux.xenboot import XenBoot
from xenkvm.images import XEN_CMDLINE

pytestmark = [pytest.mark.linux, pytest.mark.linux_more, pytest.mark.hw, pytest.mark.timeout(TIMEOUT + 300)]

SIZE = int(os.environ.get("XENKVM_NET_BYTES", str(1 << 20)))
VIFS = (("xkn0", "eth0", "10.90.0", "on"), ("xkn1", "eth1", "10.91.0", "off"))


def guest_yaml(tmp: Path, vifs=VIFS, size: int = SIZE, xen_extra: str = "") -> Path:
    """A PVH guest (1 vCPU, 256 MiB) booting to netboot's /net-init over ``vifs``; ``xen_extra``:
    more ``xen:`` keys, one per line (``pv_time: false``: the guest's own LAPIC timer and TSC)."""
    init = netboot.net_init(["xen-netfront.ko"], [(eth, net) for _t, eth, net, _o in vifs], size)
    cmdline = XEN_CMDLINE.replace("rdinit=/init", "rdinit=/net-init") + " pci=off"
    lines = "".join(f'  - "vifname={tap}, mac=00:16:3e:5a:00:0{i}, offload={off}"\n'
                    for i, (tap, _eth, _net, off) in enumerate(vifs))
    y = tmp / "net.yaml"
    initrd = netboot.initramfs(tmp / "net.cpio.gz", init)
    y.write_text(f"name: debian-net\nkernel: {netboot.KERNEL}\ninitrd: {initrd}\nboot: pvh\nmemory: 256M\n"
                 f"vcpus: 1\ncmdline: \"{cmdline}\"\n"
                 "xen:\n  version: \"4.17\"\n  domid: 1\n  hypercall_trap: auto\n"
                 + "".join(f"  {k}\n" for k in xen_extra.splitlines()) + "vifs:\n" + lines)
    return y


def run_xenkvm(ns: str, tmp: Path, vifs=VIFS, size: int = SIZE, timeout: float = TIMEOUT,
               fill: bool = False, xen_extra: str = "", prefix: tuple[str, ...] = ()) -> netboot.NetRun:
    """Boot the net guest in ``ns``; ``prefix``: a command to run the VMM under (a profiler)."""
    console = tmp / "console.log"
    cmd = [*prefix, sys.executable, "-m", "xenkvm", "-v", "run", str(guest_yaml(tmp, vifs, size, xen_extra)),
           "--console", f"file:{console}"]
    return netboot.run_in_ns(ns, cmd, [(tap, net) for tap, _e, net, _o in vifs], size, console, timeout, fill)


def need() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 (a namespace and taps)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    if not netboot.IMAGE.is_file() or not netboot.KERNEL.is_file():
        pytest.skip("no Xen Linux image: run `make linux-xen-image` first")


def vif_stats(stderr: str, tap: str) -> dict[str, int]:
    """The counters the backend logs when the vif closes (xenkvm/backends/net.py)."""
    m = re.search(rf"tap {tap}: (tx_packets=.*)$", stderr, re.M)
    assert m, f"no counters for {tap} in the VMM's log"
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def test_pvh_netfront_ping_and_tcp_both_ways(tmp_path: Path) -> None:
    need()
    with netboot.netns(f"xkn{os.getpid()}") as ns:
        # fill: the host's sink first lets its window close, so the guest's TCP queues TSO-sized segments;
        # ACK-clocked, a slow guest (the rig's) sends one MSS per ACK and no GSO frame crosses at all
        r = run_xenkvm(ns, tmp_path, fill=True)
    ctx = f"\nhost helper:\n{r.host[-1500:]}\nVMM stderr:\n{r.stderr[-3000:]}\nconsole tail:\n{r.console[-3000:]}"
    print(f"\nDebian PVH, 2 vifs, {SIZE >> 10} KiB each way each: {r.elapsed:.1f} s wall, exit {r.returncode}")
    print("\n".join(line for line in (r.host + r.console).splitlines() if line.startswith(("SINK", "SENT", "FILLED", "NET-"))))
    assert "NET-ERROR" not in r.console and "ERROR" not in r.host, ctx
    problems = [p for _tap, eth, net, _o in VIFS for p in r.transfers(eth, net, SIZE)]
    assert not problems, "; ".join(problems) + ctx
    problems = XenBoot(r.returncode, r.elapsed, None, r.console, r.stderr).dmesg_problems()
    assert not problems, "dmesg: " + "; ".join(problems[:10]) + ctx
    assert r.returncode == 0, f"exit {r.returncode}" + ctx
    on, off = vif_stats(r.stderr, "xkn0"), vif_stats(r.stderr, "xkn1")
    print(f"xkn0 (offload on): {on}\nxkn1 (offload off): {off}")
    assert on["tx_gso"] > 0 and on["rx_gso"] > 0, f"no GSO frame crossed the offloading vif{ctx}"
    assert off["tx_gso"] == off["rx_gso"] == 0, f"GSO frames on the vif with offload=off{ctx}"
    assert not (on["tx_malformed"] or off["tx_malformed"] or on["rx_dropped"] or off["rx_dropped"]), ctx
