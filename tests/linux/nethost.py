"""The host's end of tests/linux/test_linux_net.py, run inside the test's network namespace.

``python nethost.py [--fill] SIZE TAP=ADDR/PREFIX ...`` (under ``ip netns exec``): waits for
each tap the VMM creates in the namespace, gives it its address, then serves two
TCP ports on that address until killed:

* :data:`SINK_PORT`: reads everything a client sends until it closes, prints
  ``SINK <addr> <bytes> <sha256> <seconds>``; with ``--fill`` it first lets the
  socket's receive buffer fill (reads nothing until the queued byte count stops
  growing), so the sender becomes window-limited and queues whole TSO-sized
  segments instead of sending each MSS as the previous one is ACKed (what a slow
  guest CPU against a fast host otherwise does: no GSO frame at all);
* :data:`SOURCE_PORT`: prints ``SOURCE <addr> <bytes> <sha256>`` of SIZE random bytes
  (what the guest must get), sends them to the first client and closes, prints
  ``SENT <addr> <bytes> <seconds>``.

One line per event on stdout (flushed); problems as ``ERROR ...`` lines.  Each
connection is served once per address (the guest makes one of each per vif).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import termios
import threading
import time

SINK_PORT, SOURCE_PORT = 5001, 5002
WAIT_S = 600.0            #: for the VMM to create a tap (the rig's L1 is a slow TCG machine)
FILL_STILL_S = 0.5        #: --fill: the receive queue has stopped growing for this long
FILL_MAX_S = 30.0         #: --fill: read anyway after this long


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def plumb(tap: str, cidr: str) -> None:
    """Wait for ``tap`` to exist, then give it ``cidr`` (the VMM has brought it up)."""
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(f"/sys/class/net/{tap}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no interface {tap} after {WAIT_S:.0f} s")
        time.sleep(0.05)
    subprocess.run(["ip", "addr", "add", cidr, "dev", tap], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    say(f"UP {tap} {cidr}")


def listener(addr: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IP, 15, 1)        # IP_FREEBIND: the tap may get its address later
    s.bind((addr, port))
    s.listen(1)
    return s


def queued(conn: socket.socket) -> int:
    """Bytes received and not yet read (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0" * 4), "little")


def fill(conn: socket.socket) -> None:
    """Read nothing until the receive queue stops growing (the sender is then blocked on our window)."""
    last, still, deadline = -1, time.monotonic(), time.monotonic() + FILL_MAX_S
    while time.monotonic() < deadline:
        n = queued(conn)
        if n != last:
            last, still = n, time.monotonic()
        elif n and time.monotonic() - still >= FILL_STILL_S:
            break
        time.sleep(0.05)
    say(f"FILLED {conn.getsockname()[0]} {last}")


def sink(addr: str, fill_first: bool) -> None:
    with listener(addr, SINK_PORT) as s:
        conn, _ = s.accept()
        if fill_first:
            fill(conn)
        h, n, t0 = hashlib.sha256(), 0, time.monotonic()
        with conn:
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
        say(f"SINK {addr} {n} {h.hexdigest()} {time.monotonic() - t0:.3f}")


def source(addr: str, size: int) -> None:
    data = os.urandom(size)
    say(f"SOURCE {addr} {size} {hashlib.sha256(data).hexdigest()}")
    with listener(addr, SOURCE_PORT) as s:
        conn, _ = s.accept()
        with conn:
            t0 = time.monotonic()
            conn.sendall(data)
        say(f"SENT {addr} {size} {time.monotonic() - t0:.3f}")


def counters(taps: list[str]) -> str:
    """NETSTAT: the namespace's TCP retransmissions and each tap's drops (why a transfer was slow)."""
    tcp = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
    fields = dict(zip(tcp[0][1:], tcp[1][1:])) if len(tcp) == 2 else {}
    out = [f"retrans_segs={fields.get('RetransSegs', '?')}"]
    for tap in taps:
        for name in ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped"):
            try:
                value = open(f"/sys/class/net/{tap}/statistics/{name}").read().strip()
            except OSError:
                value = "gone"
            out.append(f"{tap}.{name}={value}")
    return "NETSTAT " + " ".join(out)


def guarded(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test as a line
        say(f"ERROR {fn.__name__}{args[:1]}: {e!r}")


def main(argv: list[str]) -> int:
    fill_first = argv[:1] == ["--fill"]
    argv = argv[1:] if fill_first else argv
    size = int(argv[0])
    threads = []
    for spec in argv[1:]:
        tap, cidr = spec.split("=", 1)
        addr = cidr.split("/")[0]
        threads += [threading.Thread(target=guarded, args=(fn, *a), daemon=True)
                    for fn, a in ((sink, (addr, fill_first)), (source, (addr, size)), (plumb, (tap, cidr)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say(counters([spec.split("=", 1)[0] for spec in argv[1:]]))
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
