"""The host's end of tests/linux/test_linux_net.py, run inside the test's network namespace.

``python nethost.py SIZE TAP=ADDR/PREFIX ...`` (under ``ip netns exec``): waits for
each tap the VMM creates in the namespace, gives it its address, then serves two
TCP ports on that address until killed:

* :data:`SINK_PORT`: reads everything a client sends until it closes, prints
  ``SINK <addr> <bytes> <sha256> <seconds>``;
* :data:`SOURCE_PORT`: prints ``SOURCE <addr> <bytes> <sha256>`` of SIZE random bytes
  (what the guest must get), sends them to the first client and closes, prints
  ``SENT <addr> <bytes> <seconds>``.

One line per event on stdout (flushed); problems as ``ERROR ...`` lines.  Each
connection is served once per address (the guest makes one of each per vif).
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

SINK_PORT, SOURCE_PORT = 5001, 5002
WAIT_S = 600.0            #: for the VMM to create a tap (the rig's L1 is a slow TCG machine)


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


def sink(addr: str) -> None:
    with listener(addr, SINK_PORT) as s:
        conn, _ = s.accept()
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


def guarded(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test as a line
        say(f"ERROR {fn.__name__}{args[:1]}: {e!r}")


def main(argv: list[str]) -> int:
    size = int(argv[0])
    threads = []
    for spec in argv[1:]:
        tap, cidr = spec.split("=", 1)
        addr = cidr.split("/")[0]
        threads += [threading.Thread(target=guarded, args=(fn, *a), daemon=True)
                    for fn, a in ((sink, (addr,)), (source, (addr, size)), (plumb, (tap, cidr)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
