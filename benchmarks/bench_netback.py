"""The network backend alone, fed by the freestanding netfront, beside a host tap floor.

One run, side by side, for 64-byte and 1514-byte frames and 60000-byte GSO
frames (TCPv4, mss 1448):

* **backend tx**: guests/xen_netfront.c (``xk.net_bench``) keeps the tx ring
  full; the backend gathers each frame by grant copy and writes it to its
  tap.  *busy* is the backend's own time serving tx kicks (ring copy-out,
  checks, grant copies, the tap write, responses, notify): its ceiling;
  *wall* is what the guest saw (on a PVM host mostly the guest itself, whose
  ring 0 is emulated);
* **backend rx**: this process injects the frames on the tap with a packet
  socket (a burst at a time, flow-controlled by the backend's rx count so
  the tap's queue never overflows); the backend's rx thread reads them and
  grant-copies them into the guest's buffers.  *busy* is that thread's time
  delivering (tap reads, grant copies, responses, notify);
* **host floor**: the same frames written to a tap fd with their
  virtio_net_hdr from Python (tx), and injected with a packet socket and read
  from the tap fd (rx), no guest, no grants.

The guest's frames are addressed to a MAC nobody has: the host stack drops
them at once.  Needs root (taps).  ``--frames`` sets the 64/1514-byte count
(GSO rows use an eighth).

``--compare OLD_TREE`` measures another checkout (its cffi modules built, e.g.
``git archive`` of the commit before a change) against this one, interleaved
``--runs`` times (each side with this script, ``--tree``), and prints the best
backend busy figure of each side per row: before/after in one run.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The checkout whose xenkvm is measured (``--tree DIR``, else this one): set before it is imported.
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv[:-1] else ROOT
sys.path[:0] = [str(TREE)]

from benchlib import ConsoleLines  # noqa: E402  (this script's folder)
from xenkvm.backends.netpkt import VNET_HDR  # noqa: E402
from xenkvm.backends.tap import TUN_F_CSUM, TUN_F_TSO4, Tap  # noqa: E402
from xenkvm.config import GuestConfig, XenConfig  # noqa: E402
from xenkvm.machine.devices.console import ConsoleSink  # noqa: E402
from xenkvm.build import build_machine, xen_domain  # noqa: E402
from xenkvm.machine.machine import ExitStatus  # noqa: E402
from xenkvm.vifspec import parse_vifs  # noqa: E402

MAC = bytes.fromhex("00163e0a0b0c")
PLAIN = VNET_HDR.pack(0, 0, 0, 0, 0, 0)


def frame(size: int) -> tuple[bytes, bytes]:
    """(virtio_net_hdr, frame) to the guest: ethertype 0x88b5, or a TCPv4 GSO frame past 4096 bytes."""
    if size <= 4096:
        return PLAIN, MAC + bytes.fromhex("feffff000001") + b"\x88\xb5" + bytes(size - 14)
    ip = bytes([0x45, 0, (size - 14) >> 8 & 0xFF, (size - 14) & 0xFF, 0, 1, 0x40, 0, 64, 6, 0, 0,
                10, 99, 0, 1, 10, 99, 0, 2])
    tcp = bytes(12) + bytes([0x50, 0x18]) + bytes(6)
    body = MAC + bytes.fromhex("feffff000001") + b"\x08\x00" + ip + tcp
    return VNET_HDR.pack(1, 1, 54, 1448, 34, 16), body + bytes(size - len(body))


class Bench(ConsoleLines):
    """The guest's BENCH-START/END lines turned into per-row timings and backend busy times."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.device = None
        self.injector: threading.Thread | None = None
        self._cur: dict | None = None

    def line(self, line: str) -> None:
        st = self.device.sync_stats()
        if line.startswith("BENCH-START"):
            _, way, size, count = line.split()
            self._cur = {"way": way, "size": int(size), "count": int(count), "t0": time.perf_counter(),
                         "busy0": st[f"{way}_busy_ns"], "n0": st[f"{way}_packets"]}
            if way == "rx":
                self.injector = threading.Thread(target=self.inject, args=(int(size), int(count)), daemon=True)
                self.injector.start()
        elif line == "BENCH-END" and self._cur is not None:
            c = self._cur
            c["wall"] = time.perf_counter() - c["t0"]
            c["busy"] = (st[f"{c['way']}_busy_ns"] - c["busy0"]) / 1e9
            c["done"] = st[f"{c['way']}_packets"] - c["n0"]
            self.rows.append(c)
            self._cur = None
        elif line.startswith("FAIL"):
            print(line, file=sys.stderr)

    def inject(self, size: int, count: int, burst: int = 48) -> None:
        """Send ``count`` frames on the tap, a burst at a time, each once the backend delivered the last."""
        hdr, body = frame(size)
        st = self.device.sync_stats()
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            s.setsockopt(263, 15, 1)                       # SOL_PACKET, PACKET_VNET_HDR
            s.bind((self.device.name, 0))
            start, sent = st["rx_packets"], 0
            while sent < count:
                n = min(burst, count - sent)
                for _ in range(n):
                    s.send(hdr + body)
                sent += n
                end = time.monotonic() + 30
                while self.device.sync_stats()["rx_packets"] - start < sent and time.monotonic() < end:
                    time.sleep(0.0005)


def run_backend(frames: int) -> list[dict]:
    kernel = ROOT / "guests" / "out" / "xen_netfront.elf"
    name = f"xkbench{os.getpid() % 10000}"
    cfg = GuestConfig(name="bench-netback", kernel=kernel,
                      cmdline=f"xk.trap=page xk.net_bench xk.net_bench_frames={frames}", memory=64 << 20,
                      vcpus=1, console="none", xen=XenConfig(),
                      vifs=parse_vifs([f"mac=00:16:3e:0a:0b:0c, vifname={name}"], "bench"))
    bench = Bench()
    sink = ConsoleSink(None)
    sink.add_listener(bench.feed)
    m = build_machine(cfg, sink=sink)
    bench.device = xen_domain(m).devices.find(0, "vif").device
    quiet(name)
    try:
        result = m.run()
    finally:
        m.close()
    if result.status is not ExitStatus.POWEROFF or len(bench.rows) != 6:
        raise SystemExit(f"bench guest: {result.status.name} {result.message}; rows {len(bench.rows)}")
    return bench.rows


def quiet(ifname: str) -> None:
    """No IPv6 on the tap: the host would send its own router solicitations to the guest mid-row."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass


def floor(way: str, size: int, count: int) -> float:
    """Seconds for ``count`` frames through a bare tap from Python (write; or inject + read)."""
    hdr, body = frame(size)
    tap = Tap(f"xkfloor{os.getpid() % 10000}")
    quiet(tap.name)
    try:
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)
        data = hdr + body
        if way == "tx":
            t0 = time.perf_counter()
            for _ in range(count):
                os.write(tap.fd, data)
            return time.perf_counter() - t0
        buf = bytearray(70000)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            s.setsockopt(263, 15, 1)
            s.bind((tap.name, 0))
            t0, got = time.perf_counter(), 0
            while got < count:
                for _ in range(min(48, count - got)):
                    s.send(data)
                while True:
                    try:
                        os.readv(tap.fd, [buf])
                        got += 1
                    except BlockingIOError:
                        break
            return time.perf_counter() - t0
    finally:
        tap.close()


def compare(old: Path, runs: int, frames: int) -> int:
    """Old tree and this one, interleaved; best backend busy time of each per row."""
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    sizes: dict[str, int] = {}
    for _ in range(max(1, runs)):
        for side, tree in (("old", old), ("new", ROOT)):
            out = subprocess.run([sys.executable, __file__, "--tsv", "--frames", str(frames), "--tree", str(tree)],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                row, count, size, busy = line.split("\t")
                sizes[row] = int(count) * int(size)
                best[side][row] = min(best[side].get(row, float("inf")), float(busy))
    print(f"backend busy, best of {runs} interleaved runs: {old} (old) vs {ROOT} (new)")
    print(f"{'row':<12} {'old MB/s':>10} {'new MB/s':>10} {'new/old':>8}")
    for row, nbytes in sizes.items():
        o, n = best["old"].get(row), best["new"][row]
        print(f"{row:<12} {nbytes / o / 1e6 if o else float('nan'):>10.1f} {nbytes / n / 1e6:>10.1f} "
              f"{o / n if o else float('nan'):>7.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000, help="64/1514-byte frames per row (default 2000)")
    ap.add_argument("--tree", type=Path, help="measure this checkout's xenkvm (read before import)")
    ap.add_argument("--tsv", action="store_true", help="print row<TAB>count<TAB>size<TAB>busy-seconds only")
    ap.add_argument("--compare", type=Path, metavar="OLD_TREE", help="old tree vs this one, interleaved")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs of --compare (default 3)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_netback: needs root for taps; skipped")
        return 0
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    if args.compare:
        return compare(args.compare.resolve(), args.runs, args.frames)
    rows = run_backend(args.frames)
    if args.tsv:
        for r in rows:
            print(f"{r['way']} {r['size']}\t{r['count']}\t{r['size']}\t{r['busy']}")
        return 0
    print(f"{'row':<12} {'backend busy':>26} {'guest wall':>24} {'python tap floor':>26} {'busy/floor':>10}")
    for r in rows:
        n, size = r["count"], r["size"]
        assert r["done"] >= n, f"{r['way']} {size}: backend moved {r['done']} of {n}"
        fl = floor(r["way"], size, n)
        rate = lambda secs: f"{n / secs:>9.0f} pkt/s {n * size / secs / 1e6:>7.1f} MB/s"  # noqa: E731
        print(f"{r['way'] + ' ' + str(size):<12} {rate(r['busy'])} {rate(r['wall'])} {rate(fl)} "
              f"{fl / r['busy']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
