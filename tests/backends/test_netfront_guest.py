"""The network backend under /dev/kvm, driven by the freestanding netfront (guests/xen_netfront.c).

The VMM creates the tap; tests/backends/netpeer.py sits on it with a packet
socket as the host peer: answers ARP and ICMP, injects frames, keeps what
the guest sent.  Each frame is compared byte for byte with one rebuilt here;
the checksum-offload frame is finished as the kernel would (at the
csum_start/csum_offset the backend gave the tap) and must then verify.
Needs root (a tap, a packet socket): skipped otherwise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import netpeer
from netpeer import Peer, csum
from guestbuild import build_guests

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                 reason="needs root and /dev/net/tun for a tap and a packet socket")]

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
SUMMARY = re.compile(r"^SUMMARY: (\d+) passed, (\d+) failed$", re.M)
MAC = "00:16:3e:0a:0b:0c"


@pytest.fixture(scope="module")
def kernel() -> Path:
    build_guests()
    return GUESTS / "out" / "xen_netfront.elf"


def tap_name(tag: str) -> str:
    return f"xk{tag}{os.getpid() % 100000}"


def run(tmp_path: Path, kernel: Path, cmdline: str, vifs: list[str], peer: Peer | None = None, verbose=False):
    y = tmp_path / "guest.yaml"
    y.write_text(f'name: net-test\nkernel: {kernel}\ncmdline: "{cmdline}"\nmemory: 64M\nvcpus: 1\n'
                 "xen:\n  domid: 1\n  hypercall_trap: auto\nvifs:\n" + "".join(f'  - "{v}"\n' for v in vifs))
    if peer:
        peer.start()
    try:
        return subprocess.run([sys.executable, "-m", "xenkvm", *(["-v"] if verbose else []), "run", str(y)], cwd=ROOT,
                              capture_output=True, text=True, errors="replace", timeout=300)
    finally:
        if peer:
            peer.stop.set()
            peer.join(10)


def assert_passed(r: subprocess.CompletedProcess) -> int:
    context = f"\n--- stdout ---\n{r.stdout[-5000:]}\n--- stderr ---\n{r.stderr[-3000:]}"
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails) + context
    m = SUMMARY.search(r.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, context
    assert r.returncode == 0 and "NET-DONE" in r.stdout, f"exit {r.returncode}" + context
    assert "Traceback" not in r.stderr, context
    return int(m.group(1))


def check_frames(peer: Peer) -> None:
    """Every frame the guest sent, byte for byte, in order; the offload metadata the tap carried."""
    assert not peer.errors, peer.errors
    mac = peer.mac
    frames = [f for _h, f in peer.frames]
    assert netpeer.arp_request(mac) in frames
    assert netpeer.icmp_echo(mac) in frames
    assert netpeer.udp(mac, 9999, 3000 - 42, 1, "full") in frames          # three tx slots gathered
    # UDP to 9998: csum_blank
    (hdr, frame), = [(h, f) for h, f in peer.frames if f[36:38] == (9998).to_bytes(2, "big")]
    assert frame == netpeer.udp(mac, 9998, 200, 2, "partial")
    flags, gso_type, _hl, _gs, start, offset = hdr
    assert flags & 1 and (start, offset) == (34, 6)
    done = frame[:start + offset] + (~csum(frame[start:], 0) & 0xFFFF).to_bytes(2, "big") + frame[start + offset + 2:]
    assert csum(done[start:], netpeer.pseudo(17, len(frame) - start)) == 0xFFFF     # a valid UDP checksum
    # TCP to 9997: GSO
    (hdr, frame), = [(h, f) for h, f in peer.frames if f[36:38] == (9997).to_bytes(2, "big")]
    assert frame == netpeer.tcp_gso(mac)
    assert hdr[1] == 1 and hdr[3] == 1448 and hdr[0] & 1 and (hdr[4], hdr[5]) == (34, 16)


@pytest.mark.parametrize("trap", ["page", "direct"])
def test_netfront_sends_and_receives(tmp_path, kernel, trap):
    """``direct``: the guest calls its hypercall pair, so the patch trap's send stub is in and
    the vif's tx and rx kicks are matched inside KVM (xen/sendstub.py)."""
    name = tap_name("n")
    peer = Peer(name, bytes.fromhex(MAC.replace(":", "")))
    r = run(tmp_path, kernel, f"xk.trap={trap}", [f"mac={MAC}, vifname={name}"], peer, verbose=True)
    assert assert_passed(r) >= 12
    for check in ("net.arp_answered", "net.icmp_echo_reply", "net.rx_60", "net.rx_1514", "net.rx_9014_three_slots",
                  "net.rx_csum_blank", "net.rx_gso_tcpv4", "net.tx_sg_three_slots", "net.tx_csum_blank",
                  "net.tx_gso_tcpv4",
                  "net.reset", "net.mq.connected", "net.mq.tx_queue_1", "net.mq.rx_16_flows", "net.mq.rx_both_queues",
                  "net.mq.split_ports_notified"):
        assert f"PASS {check}" in r.stdout
    check_frames(peer)
    assert netpeer.udp(peer.mac, 9996, 100, 6, "full") in [f for _h, f in peer.frames]   # out of queue 1
    assert not os.path.exists(f"/sys/class/net/{name}")          # the tap went with the VM
    latency = [line for line in r.stderr.splitlines() if "vif 0" in line and ": event latency: " in line]
    assert latency and " rx: " in latency[-1], r.stderr[-3000:]
    if trap == "page":      # kicks inside KVM leave no send time to measure from
        assert "tx: notify_to_service n=" in latency[-1], r.stderr[-3000:]
    else:
        assert "send stub over xen_hypercall_amd/_intel" in r.stderr
        m = re.search(r" (\d+) EVTCHNOP_send, \d+ single-shot timer calls completed in C; (\d+) ring port",
                      r.stderr)
        before = re.search(r"ring kicks inside KVM from now \((\d+) completed in C before\)", r.stderr)
        assert m and before and m.group(1) == before.group(1) and int(m.group(2)) >= 1, r.stderr[-3000:]


def test_hostile_netfront_keeps_the_vif_up(tmp_path, kernel):
    name = tap_name("h")
    peer = Peer(name, bytes.fromhex(MAC.replace(":", "")))
    r = run(tmp_path, kernel, "xk.trap=page xk.net_hostile", [f"mac={MAC}, vifname={name}"], peer)
    assert assert_passed(r) >= 20
    for check in ("hostile.ungranted_ref", "hostile.huge_ref", "hostile.slot_crosses_page", "hostile.runt",
                  "hostile.nineteen_slots", "hostile.slots_exceed_size", "hostile.unknown_extra",
                  "hostile.far_ahead_not_served", "hostile.good_frame_after", "hostile.rx.far_ahead_not_served",
                  "hostile.rx.revoked_buffer_error"):
        assert f"PASS {check}" in r.stdout
    assert "tx malformed" in r.stderr and "the vif stays up" in r.stderr
    assert "bad index" in r.stderr and "rx req_prod more than a ring ahead" in r.stderr
    assert "rx dropped: rx buffer grant" in r.stderr
    check_frames(peer)
    bad = [f for _h, f in peer.frames
           if f[36:38] == (9999).to_bytes(2, "big") and f[14 + 20 + 8:14 + 20 + 9] == b"\x04"]
    assert len(bad) == 1                                         # only the good 142-byte frame got out


def test_missing_bridge_is_one_line(tmp_path, kernel):
    r = run(tmp_path, kernel, "xk.trap=page", [f"bridge=xknobr{os.getpid() % 10000}"])
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_tap_joins_an_existing_bridge():
    from xenkvm.backends.tap import Tap
    br, name = tap_name("b"), tap_name("t")
    subprocess.run(["ip", "link", "add", br, "type", "bridge"], check=True)
    try:
        tap = Tap(name, br)
        try:
            assert os.path.realpath(f"/sys/class/net/{name}/master").endswith(f"/{br}")
            assert int(open(f"/sys/class/net/{name}/flags").read(), 16) & 1       # IFF_UP
        finally:
            tap.close()
        assert not os.path.exists(f"/sys/class/net/{name}")
    finally:
        subprocess.run(["ip", "link", "del", br], check=False)


def test_vif_and_console_nodes_hotplug_and_unplug(tmp_path, kernel):
    """A built (not running) domain: libxl's nodes; unplug removes the tap, attach/detach of a pty console."""
    from xenkvm.config import GuestConfig, XenConfig
    from xenkvm.consolespec import ConsoleSpec
    from xenkvm.build import build_machine, xen_domain
    from xenkvm.vifspec import parse_vifs

    name = tap_name("p")
    cfg = GuestConfig(name="plug", kernel=kernel, memory=64 << 20, console="none", xen=XenConfig(),
                      vifs=parse_vifs([f"vifname={name}, ip=10.99.0.2"], "plug"))
    m = build_machine(cfg)
    m.io.start()
    try:
        core, devices = xen_domain(m).store.core, xen_domain(m).devices
        be, fe = "/local/domain/0/backend/vif/1/0", "/local/domain/1/device/vif/0"
        mac = cfg.vifs[0].mac.encode()
        assert core.read_path(f"{fe}/mac") == mac and core.read_path(f"{be}/mac") == mac
        assert core.read_path(f"{be}/feature-rx-copy") == b"1" and core.read_path(f"{be}/ip") == b"10.99.0.2"
        assert core.read_path(f"{be}/state") == b"2" and os.path.exists(f"/sys/class/net/{name}")
        assert devices.detach(0, "vif").wait(10)                 # never connected: removed at once
        assert core.read_path(be) is None and not os.path.exists(f"/sys/class/net/{name}")
        backend = devices.attach(ConsoleSpec(1, "pty"))
        pty = backend.device.tty
        assert core.read_path("/local/domain/0/backend/console/1/1/tty") == pty.encode()
        assert core.read_path("/local/domain/1/device/console/1/type") == b"xenconsoled"
        assert devices.detach(1, "console").wait(10) and backend.device.fd == -1
    finally:
        xen_domain(m).devices.close(timeout=10)
        m.close()
