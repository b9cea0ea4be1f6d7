"""The VMM and guest ends of a domain introduced to a shared xenstored, for tests.

:class:`Vmm` does what ``xenkvm.xen.shared_store`` does for a real guest (a sealed
memfd page, the kick and notify eventfds, the introduce request over SCM_RIGHTS);
:class:`GuestRing` plays the guest on that page: it writes requests, kicks, waits
on the notify eventfd and reads replies, so tests can drive the real daemon
process across a real process boundary.  ``tests/toolstack/test_xenstored_shared.py``
runs real guests under /dev/kvm against the same daemon.
"""
from __future__ import annotations

import array
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from xenkvm.xenstore import ring as ringmod
from xenkvm.xenstore.protocol import FrameDecoder, XsType, encode

ROOT = Path(__file__).resolve().parents[2]
U32 = struct.Struct("<I")
PAGE = 4096
WAIT = 30.0


def start_daemon(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """``xenkvm xenstored --introduce``: (process, xenstore socket, introduce socket)."""
    sock, intro = str(tmp / "socket"), str(tmp / "introduce.sock")
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "xenstored", "--socket", sock,
                             "--introduce", intro], cwd=ROOT)
    deadline = time.monotonic() + WAIT
    while not (os.path.exists(sock) and os.path.exists(intro)):
        assert proc.poll() is None and time.monotonic() < deadline, "xenstored did not start"
        time.sleep(0.02)
    return proc, sock, intro


def sealed_memfd(size: int = 4 * PAGE, seal: bool = True) -> int:
    fd = os.memfd_create("xsvmm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def info(name: str = "guest", uuid: str = "00000000-0000-0000-0000-000000000001") -> dict:
    return {"name": name, "uuid": uuid, "vcpus": 1, "memory_kib": 65536, "store_port": 1,
            "store_gfn": 0xFEFF0, "console_port": 2, "console_gfn": 0xFEFF1, "hvm": False}


def request(link: socket.socket, obj: dict | bytes, fds: list[int] = ()) -> dict:
    """One introduce-socket request; the daemon's reply."""
    data = obj if isinstance(obj, bytes) else json.dumps({"v": 1, **obj}).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    link.sendmsg([data], anc)
    return json.loads(link.recv(65536))


class Vmm:
    """One domain's VMM end: the memfd page, both eventfds and the introduce connection."""

    OFFSET = PAGE     # the ring page is the second page of the memfd, as in a special region

    def __init__(self, intro: str, domid: int, name: str = "guest") -> None:
        self.domid = domid
        self.memfd = sealed_memfd()
        self.mm = mmap.mmap(self.memfd, 4 * PAGE, flags=mmap.MAP_SHARED)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.link.settimeout(WAIT)
        self.link.connect(intro)
        uuid = f"00000000-0000-0000-0000-{domid:012d}"
        self.reply = request(self.link, {"op": "introduce", "domid": domid, "page_offset": self.OFFSET,
                                         "info": info(name, uuid)}, [self.memfd, self.kick, self.notify])
        self.guest = GuestRing(memoryview(self.mm)[self.OFFSET:self.OFFSET + PAGE], self.kick, self.notify)

    def release(self) -> dict:
        return request(self.link, {"op": "release"})

    def close(self) -> None:
        """Close the introduce connection without a release (what a killed VMM does)."""
        self.link.close()


class GuestRing:
    """The guest side of a ring page: requests in, kick, wait for notify, replies out."""

    def __init__(self, page: memoryview, kick: int, notify: int) -> None:
        self.page, self.kick, self.notify = page, kick, notify
        self.decoder = FrameDecoder()
        self.pending: list = []
        self.req_id = 0

    def get(self, off: int) -> int:
        return U32.unpack_from(self.page, off)[0]

    def set(self, off: int, value: int) -> None:
        U32.pack_into(self.page, off, value & 0xFFFFFFFF)

    def send(self, data: bytes) -> None:
        """Write ``data`` (at most the free space) into the request ring and kick."""
        prod = self.get(ringmod.REQ_PROD)
        for i, byte in enumerate(data):     # guest side, tests only: a byte loop is fine
            self.page[(prod + i) & 1023] = byte
        self.set(ringmod.REQ_PROD, prod + len(data))
        os.eventfd_write(self.kick, 1)

    def _drain(self) -> None:
        cons, prod = self.get(ringmod.RSP_CONS), self.get(ringmod.RSP_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        self.decoder.feed(bytes(self.page[1024 + ((cons + i) & 1023)] for i in range(n)))
        self.set(ringmod.RSP_CONS, cons + n)
        while (msg := self.decoder.next()) is not None:
            self.pending.append(msg)

    def wait(self, want, timeout: float = WAIT):
        """The first received message ``want(msg)`` accepts (waiting on the notify eventfd)."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for msg in self.pending:
                if want(msg):
                    self.pending.remove(msg)
                    return msg
            left = deadline - time.monotonic()
            assert left > 0, "no such message from xenstored"
            if select.select([self.notify], [], [], left)[0]:
                os.eventfd_read(self.notify)

    def call(self, type_: XsType, *args: str, value: bytes | None = None) -> tuple[int, bytes]:
        """One request; (reply type, payload)."""
        self.req_id += 1
        payload = b"".join(a.encode() + b"\0" for a in args) + (value or b"")
        self.send(encode(int(type_), self.req_id, 0, payload))
        req = self.req_id
        msg = self.wait(lambda m: m.req_id == req and m.type != XsType.WATCH_EVENT)
        return msg.type, msg.payload
