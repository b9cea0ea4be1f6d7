#!/usr/bin/env python3
"""Xenstore benchmark: ops/s over the UNIX socket and the read round-trip time.

Starts ``xenkvm xenstored`` and, for comparison, a bare Python UNIX-socket echo
server (same selector loop, no xenstore work) as separate processes, then
drives them from client processes:

* ops/s for READ, WRITE, DIRECTORY and small transactions (START, READ, WRITE,
  END = 4 round trips) with 1, 8 and 64 concurrent clients, each keeping one
  request in flight as libxenstore does;
* the latency of one READ round trip against the echo server's floor.

Only loopback UNIX sockets on this machine; total runtime well under a minute.
Usage: ``python benchmarks/bench_xenstore.py [--duration SECONDS] [--clients 1,8,64]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xenkvm.xenstore.client import XsClient  # noqa: E402
from xenkvm.xenstore.protocol import HEADER, XsType, encode  # noqa: E402

VALUE = b"v" * 32
OPS = ("read", "write", "directory", "transaction")


# ---------------------------------------------------------------- servers
def echo_server(path: str, ready) -> None:
    """Bare UNIX-socket echo server: the round-trip floor for a Python selector loop."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    ready.set()
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, conn)
                continue
            data = key.data.recv(65536)
            if not data:
                sel.unregister(key.data)
                key.data.close()
                continue
            key.data.sendall(data)


def start_xenstored(path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm.xenstore.daemon", "--socket", path],
                            env=env)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("xenstored did not start")
        time.sleep(0.02)
    return proc


# ---------------------------------------------------------------- load clients
class Conn:
    """One benchmark client connection with its request script."""

    def __init__(self, path: str, op: str, index: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.op = op
        self.step = 0
        self.tx = 0
        key = f"/bench/c{index}".encode()
        self.frames = {
            "read": encode(XsType.READ, 0, 0, b"/bench/key\0"),
            "write": encode(XsType.WRITE, 0, 0, key + b"\0" + VALUE),
            "directory": encode(XsType.DIRECTORY, 0, 0, b"/bench/dir\0"),
        }
        self.key = key

    def next_frame(self) -> bytes:
        if self.op != "transaction":
            return self.frames[self.op]
        if self.step == 0:
            return encode(XsType.TRANSACTION_START, 0, 0, b"\0")
        if self.step == 1:
            return encode(XsType.READ, 0, self.tx, b"/bench/key\0")
        if self.step == 2:
            return encode(XsType.WRITE, 0, self.tx, self.key + b"\0" + VALUE)
        return encode(XsType.TRANSACTION_END, 0, self.tx, b"T\0")

    def on_reply(self, rtype: int, payload: bytes) -> bool:
        """Returns True when one benchmark operation completed."""
        if rtype == XsType.ERROR:
            raise RuntimeError(f"{self.op}: error {payload!r}")
        if self.op != "transaction":
            return True
        if self.step == 0:
            self.tx = int(payload.rstrip(b"\0"))
        self.step = (self.step + 1) % 4
        return self.step == 0

    def replies(self):
        """Complete frames received so far."""
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("server closed connection")
        self.buf += data
        while len(self.buf) >= 16:
            rtype, _, _, length = HEADER.unpack_from(self.buf)
            if len(self.buf) < 16 + length:
                break
            payload = bytes(self.buf[16:16 + length])
            del self.buf[:16 + length]
            yield rtype, payload


def load_worker(path, op, first_index, count, warmup, duration, barrier, results) -> None:
    """Drive ``count`` connections, one request in flight each; report ops in the window."""
    conns = [Conn(path, op, first_index + i) for i in range(count)]
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    barrier.wait()
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + duration
    done = 0
    for conn in conns:
        conn.sock.send(conn.next_frame())
    now = start
    while now < t1:
        for key, _ in sel.select(timeout=0.5):
            conn = key.data
            for rtype, payload in conn.replies():
                if conn.on_reply(rtype, payload) and t0 <= time.perf_counter() < t1:
                    done += 1
                conn.sock.send(conn.next_frame())
        now = time.perf_counter()
    results.put(done)
    for conn in conns:
        conn.sock.close()


def measure(path: str, op: str, clients: int, workers: int, warmup: float,
            duration: float) -> float:
    """Aggregate ops/s for ``clients`` concurrent connections."""
    ctx = mp.get_context("fork")
    workers = max(1, min(workers, clients))
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs, index = [], 0
    for w in range(workers):
        count = clients // workers + (1 if w < clients % workers else 0)
        procs.append(ctx.Process(target=load_worker, args=(
            path, op, index, count, warmup, duration, barrier, results)))
        index += count
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join()
    return total / duration


# ---------------------------------------------------------------- latency
def round_trips(path: str, frame: bytes, reply_len: int | None, count: int) -> list[float]:
    """Per-request round-trip times (seconds) of a blocking client."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    times = []
    want = reply_len
    for _ in range(count):
        t = time.perf_counter()
        sock.sendall(frame)
        data = sock.recv(65536)
        if want is None:
            want = 16 + struct.unpack_from("<I", data, 12)[0]
        while len(data) < want:
            data += sock.recv(65536)
        times.append(time.perf_counter() - t)
    sock.close()
    return times


def prepare(path: str, max_clients: int) -> None:
    """The nodes the benchmark touches."""
    with XsClient(path) as c:
        c.write("/bench/key", VALUE)
        for i in range(16):
            c.write(f"/bench/dir/child{i:02d}", "")
        for i in range(max_clients):
            c.write(f"/bench/c{i}", VALUE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=0.6, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per point; the median is reported")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="client processes (default: CPUs - 1, the server gets one)")
    parser.add_argument("--rtt-samples", type=int, default=4000)
    args = parser.parse_args(argv)
    client_counts = [int(c) for c in args.clients.split(",")]

    tmp = tempfile.mkdtemp(prefix="xsbench-")
    xs_path, echo_path = os.path.join(tmp, "xenstored"), os.path.join(tmp, "echo")
    ready = mp.get_context("fork").Event()
    echo = mp.get_context("fork").Process(target=echo_server, args=(echo_path, ready), daemon=True)
    echo.start()
    ready.wait(10)
    xenstored = start_xenstored(xs_path)
    try:
        prepare(xs_path, max(client_counts))
        print(f"xenstore benchmark: {os.cpu_count()} CPUs, {args.workers} client processes, "
              f"median of {args.repeats} x {args.duration:.1f} s per point, "
              f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
        print()
        header = f"{'op':<12}" + "".join(f"{f'{n} client' + ('s' if n > 1 else ''):>14}"
                                         for n in client_counts)
        print(header + "   (ops/s; transaction = START+READ+WRITE+END)")
        print("-" * len(header))
        for op in OPS:
            row = [statistics.median(
                measure(xs_path, op, n, args.workers, args.warmup, args.duration)
                for _ in range(args.repeats)) for n in client_counts]
            print(f"{op:<12}" + "".join(f"{r:>14,.0f}" for r in row))
        print()
        read_frame = encode(XsType.READ, 0, 0, b"/bench/key\0")
        round_trips(xs_path, read_frame, None, 500)        # warm up both
        round_trips(echo_path, read_frame, len(read_frame), 500)
        xs, floor = [], []
        batch = 250     # interleaved batches: both see the same machine load
        for _ in range(max(1, args.rtt_samples // batch)):
            floor += round_trips(echo_path, read_frame, len(read_frame), batch)
            xs += round_trips(xs_path, read_frame, None, batch)
        xs_med, floor_med = statistics.median(xs), statistics.median(floor)
        print(f"{'round trip':<26}{'median':>10}{'mean':>10}{'p99':>10}")
        for name, samples in (("echo server (floor)", floor), ("xenstored READ", xs)):
            p99 = sorted(samples)[int(len(samples) * 0.99)]
            print(f"{name:<26}{samples and statistics.median(samples) * 1e6:>8.1f}us"
                  f"{statistics.fmean(samples) * 1e6:>8.1f}us{p99 * 1e6:>8.1f}us")
        print(f"READ round trip / echo floor: {xs_med / floor_med:.2f}x (target <= 3x)")
    finally:
        xenstored.terminate()
        xenstored.wait(10)
        echo.terminate()
        echo.join(5)
        for name in (xs_path, echo_path):
            try:
                os.unlink(name)
            except OSError:
                pass
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
