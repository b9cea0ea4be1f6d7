#!/usr/bin/env python3
"""Xenstore READ round trip over a guest ring: the VMM's embedded store vs the shared xenstored.

The same guest-side code drives both, in one run:

* ``embedded``: an in-process :class:`XenstoreServer` thread with the ring on a
  bytearray; the guest's notify is ``server.schedule(ring)`` (what the VMM's
  I/O thread does for a send on the store port), the reply's notify sets an event;
* ``shared``: ``xenkvm xenstored --introduce`` in its own process, the ring in a
  sealed memfd, kick and notify eventfds (what ``xenkvm create`` uses);
* ``socket``: a dom0 READ over the shared daemon's UNIX socket, for scale.

Neither includes the guest's own event-channel delivery (the same in both).
Usage: ``python benchmarks/bench_xenstore_shared.py [-n ROUNDS]``
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "xenstore")]

from xenkvm.xenstore import XenstoreServer, Xenstored  # noqa: E402
from xenkvm.xenstore import ring as ringmod  # noqa: E402
from xenkvm.xenstore.client import XsClient  # noqa: E402
from xenkvm.xenstore.layout import DomainInfo, initial_tree, write_tree  # noqa: E402
from xenkvm.xenstore.protocol import HEADER, HEADER_SIZE, XsType, encode  # noqa: E402
from xsvmm import Vmm, start_daemon  # noqa: E402

REQUEST = encode(int(XsType.READ), 1, 0, b"name\0")


class Ring:
    """The guest end of a ring page, slice copies only (no wrapping: every frame is reset)."""

    def __init__(self, page: memoryview) -> None:
        self.page = page

    def put(self) -> None:
        prod = ringmod._U32.unpack_from(self.page, ringmod.REQ_PROD)[0]
        start = prod & 1023
        if start + len(REQUEST) > 1024:           # keep the copy in one piece
            prod += 1024 - start
            start = 0
            ringmod._PAIR.pack_into(self.page, ringmod.REQ_CONS, prod, prod)
        self.page[start:start + len(REQUEST)] = REQUEST
        ringmod._U32.pack_into(self.page, ringmod.REQ_PROD, (prod + len(REQUEST)) & 0xFFFFFFFF)

    def take(self) -> bytes | None:
        """Consume the reply if it is all there (the guest waits for whole frames)."""
        cons, prod = ringmod._PAIR.unpack_from(self.page, ringmod.RSP_CONS)
        avail, start = (prod - cons) & 0xFFFFFFFF, cons & 1023
        data = bytes(self.page[1024 + start:1024 + min(1024, start + avail)])
        data += bytes(self.page[1024:1024 + avail - len(data)])
        if len(data) < HEADER_SIZE or len(data) < HEADER_SIZE + HEADER.unpack_from(data)[3]:
            return None
        ringmod._U32.pack_into(self.page, ringmod.RSP_CONS, prod)
        return data


def check(reply: bytes) -> None:
    """Every round must have read the domain's name (a benchmark of errors is no benchmark)."""
    if HEADER.unpack_from(reply)[0] != XsType.READ or reply[HEADER_SIZE:] != b"bench":
        raise SystemExit(f"unexpected reply {reply!r}")


def embedded(rounds: int) -> list[float]:
    core = Xenstored()
    write_tree(core, initial_tree(DomainInfo(1, "bench", "00000000-0000-0000-0000-000000000001", 1, 65536, 1, 0)))
    server = XenstoreServer(core, socket_path="")
    replied = threading.Event()
    page = memoryview(bytearray(4096))
    ring = server.add_ring(1, page, replied.set)
    server.start()
    guest, times = Ring(page), []
    try:
        for _ in range(rounds):
            t = time.perf_counter_ns()
            replied.clear()
            guest.put()
            server.schedule(ring)
            while (reply := guest.take()) is None:
                replied.wait(5)
                replied.clear()
            times.append(time.perf_counter_ns() - t)
            check(reply)
    finally:
        server.stop()
    return times


def shared(rounds: int, intro: str) -> list[float]:
    vmm = Vmm(intro, 1, "bench")
    guest, times = Ring(vmm.guest.page), []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        guest.put()
        os.eventfd_write(vmm.kick, 1)
        while (reply := guest.take()) is None:
            if select.select([vmm.notify], [], [], 5)[0]:
                os.eventfd_read(vmm.notify)
        times.append(time.perf_counter_ns() - t)
        check(reply)
    vmm.release()
    return times


def socket_reads(rounds: int, sock: str) -> list[float]:
    with XsClient(sock) as xs:
        xs.write("/bench", "x")
        times = []
        for _ in range(rounds):
            t = time.perf_counter_ns()
            xs.read("/bench")
            times.append(time.perf_counter_ns() - t)
    return times


def row(name: str, times: list[float], base: float) -> None:
    times = sorted(times)
    med = statistics.median(times) / 1000
    p99 = times[int(len(times) * 0.99)] / 1000
    print(f"{name:<10} {med:9.1f} {p99:9.1f} {med / base:7.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--rounds", type=int, default=3000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xsb", dir="/tmp"))
    proc, sock, intro = start_daemon(tmp)
    try:
        results = {"embedded": embedded(args.rounds), "shared": shared(args.rounds, intro),
                   "socket": socket_reads(args.rounds, sock)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    base = statistics.median(results["embedded"]) / 1000
    print(f"xenstore READ round trip, {args.rounds} rounds each (us; ratio to embedded)")
    print(f"{'store':<10} {'median':>9} {'p99':>9} {'ratio':>8}")
    for name, times in results.items():
        row(name, times, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
