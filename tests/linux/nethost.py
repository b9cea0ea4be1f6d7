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
  (what the guest must get), sends them to the first client, shuts its side and waits
  for the client to close (then every byte is in), prints ``SENT <addr> <bytes> <seconds>``.

With ``XENKVM_L1TRACE=FILE`` in its environment (benchmarks/bench_rig_net.py ``--trace``), the
host->guest transfer records a window of L1's ftrace (benchmarks/l1trace.py) into FILE, from
0.5 s after its start: past the slow start.

Each transfer also prints ``KVMSTAT <direction> <tap>: ...``: the frames the tap moved each
way during it and L1 KVM's exit counters (debugfs; mounted here if it is not: ``ip netns
exec`` gives the helper a mount namespace of its own) divided by the data frames, where
this host is itself a KVM host (the rig's L1); absent elsewhere.

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
from pathlib import Path

SINK_PORT, SOURCE_PORT = 5001, 5002
WAIT_S = 600.0            #: for the VMM to create a tap (the rig's L1 is a slow TCG machine)
FILL_STILL_S = 0.5        #: --fill: the receive queue has stopped growing for this long
FILL_MAX_S = 30.0         #: --fill: read anyway after this long
KVM_STATS = "/sys/kernel/debug/kvm"
#: L1 KVM's counters (all VMs) per data frame: every exit, then the kinds that tell where it went
EXIT_KINDS = ("exits", "io_exits", "halt_exits", "irq_window_exits", "irq_injections", "insn_emulation",
              "halt_wakeup")


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


def snapshot(tap: str) -> dict[str, int]:
    """The tap's packet counters and L1 KVM's exit counters, now."""
    out = {}
    for name in ("tx_packets", "rx_packets"):
        try:
            out[name] = int(open(f"/sys/class/net/{tap}/statistics/{name}").read())
        except (OSError, ValueError):
            pass
    if not os.path.isdir(KVM_STATS) and os.path.isdir("/sys/kernel/debug"):
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"], check=False,
                       stderr=subprocess.DEVNULL)
    for name in EXIT_KINDS:
        try:
            out[name] = int(open(f"{KVM_STATS}/{name}").read())
        except (OSError, ValueError):
            pass
    return out


def kvm_line(direction: str, tap: str, before: dict[str, int], after: dict[str, int]) -> str | None:
    """KVMSTAT: the frames each way and L1's exits per data frame (the tap's rx for guest->host)."""
    frames = {k: after[k] - before[k] for k in ("tx_packets", "rx_packets") if k in before and k in after}
    data = frames.get("rx_packets" if direction == "g->h" else "tx_packets", 0)
    kinds = [k for k in EXIT_KINDS if k in before and k in after]
    if data <= 0 or not kinds:
        return None
    per = " ".join(f"{k} {(after[k] - before[k]) / data:.2f}" for k in kinds)
    return (f"KVMSTAT {direction} {tap}: {frames.get('rx_packets', 0)} frames in, {frames.get('tx_packets', 0)} out;"
            f" per data frame: {per}")


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


def sink(addr: str, tap: str, fill_first: bool) -> None:
    with listener(addr, SINK_PORT) as s:
        conn, _ = s.accept()
        if fill_first:
            fill(conn)
        h, n, t0, before = hashlib.sha256(), 0, time.monotonic(), snapshot(tap)
        with conn:
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
        say(f"SINK {addr} {n} {h.hexdigest()} {time.monotonic() - t0:.3f}")
        line = kvm_line("g->h", tap, before, snapshot(tap))
        if line:
            say(line)


def source(addr: str, tap: str, size: int) -> None:
    data = os.urandom(size)
    say(f"SOURCE {addr} {size} {hashlib.sha256(data).hexdigest()}")
    with listener(addr, SOURCE_PORT) as s:
        conn, _ = s.accept()
        with conn:
            t0, before = time.monotonic(), snapshot(tap)
            traced = trace_window(os.environ.get("XENKVM_L1TRACE"))
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)              # the guest's close: it has every byte (sendall left a send buffer's worth)
            elapsed = time.monotonic() - t0
            traced()
        say(f"SENT {addr} {size} {elapsed:.3f}")
        line = kvm_line("h->g", tap, before, snapshot(tap))
        if line:
            say(line)


def trace_window(dest: str | None, after_s: float = 0.5):
    """With ``dest``: L1's ftrace window (benchmarks/l1trace.py) into it, ``after_s`` from now.
    Returns what to call when the transfer ends: it waits until the window is written (a window
    not yet open by then is not opened), so the helper never exits with L1's tracing left on."""
    if not dest:
        return lambda: None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
    from l1trace import Window
    if not os.path.exists("/sys/kernel/tracing/tracing_on"):     # ip netns exec remounted /sys
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"], check=False,
                       stderr=subprocess.DEVNULL)
    window = Window(Path(dest))

    def start() -> None:
        if not window.start():
            say(f"TRACE none: no tracefs for {dest}")

    timer = threading.Timer(after_s, start)
    timer.daemon = True
    timer.start()

    def finish() -> None:
        timer.cancel()
        timer.join()
        window.join()
    return finish


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
                    for fn, a in ((sink, (addr, tap, fill_first)), (source, (addr, tap, size)),
                                  (plumb, (tap, cidr)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say(counters([spec.split("=", 1)[0] for spec in argv[1:]]))
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
