"""The host side of a vif: a tap device the VMM creates, optionally enslaved to a bridge.

``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE``
(linux/if_tun.h; one fd per netif queue, the kernel picks the queue of a
frame by its flow):
every frame read or written is preceded by a 10-byte ``struct
virtio_net_hdr`` (checksum and GSO offload metadata, which is how netif's
``NETTXF_csum_blank`` / GSO extras travel to the host stack and back).
``TUNSETOFFLOAD`` says which offloads the kernel may hand us on reads: set
from what the frontend negotiated.  The tap is not persistent: closing the
fd removes it (unplug, VM end, or a crash of the VMM).  A bridge is joined
with ``SIOCBRADDIF``; a missing bridge is one line.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

from xenkvm.config import ConfigError

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100
IFF_TUN_EXCL = 0x8000                     #: TUNSETIFF fails with EBUSY if the interface exists
FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFINDEX, SIOCBRADDIF = 0x8913, 0x8914, 0x8933, 0x89A2
IFF_UP = 0x1
IFNAMSIZ = 16


class TapError(ConfigError):
    """The tap cannot be created or plugged (one line for the user)."""


class TapExists(TapError):
    """An interface of that name exists (another VMM's tap, or a host interface)."""


def _ifreq(name: str, fmt: str = "", *values) -> bytearray:
    buf = bytearray(40)
    buf[:IFNAMSIZ] = name.encode().ljust(IFNAMSIZ, b"\0")
    if fmt:
        struct.pack_into(fmt, buf, IFNAMSIZ, *values)
    return buf


class Tap:
    """An open, up tap device named ``name``; ``fd`` reads and writes vnet-header frames."""

    def __init__(self, name: str, bridge: str | None = None):
        self.name = name
        self.fd = -1
        self.queues: list[int] = []       #: fds of the queues after the first
        if os.path.exists(f"/sys/class/net/{name}"):     # else TUNSETIFF would join someone's queues
            raise TapExists(f"vifs: interface {name!r} already exists (pick another vifname)")
        try:
            self.fd = self._attach(name, exclusive=True)
            self.set_offload(0)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                if bridge:
                    self._enslave(s, bridge)
                flags = bytearray(_ifreq(self.name))
                fcntl.ioctl(s, SIOCGIFFLAGS, flags)
                up = struct.unpack_from("H", flags, IFNAMSIZ)[0] | IFF_UP
                fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(self.name, "H", up))
        except TapError:
            self.close()
            raise
        except OSError as e:
            self.close()
            if e.errno == errno.EBUSY:     # created by someone else since the check above
                raise TapExists(f"vifs: interface {name!r} already exists (pick another vifname)") from None
            raise TapError(f"vifs: tap {name!r}: {e.strerror}") from None
        log.info("tap %s up%s", self.name, f", in bridge {bridge}" if bridge else "")

    @staticmethod
    def _attach(name: str, exclusive: bool = False) -> int:
        """A new fd for a queue of tap ``name`` (created by the first: ``exclusive``, so a tap
        another process created meanwhile is EBUSY rather than joined as a queue)."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", FLAGS | (IFF_TUN_EXCL if exclusive else 0)))
        except OSError:
            os.close(fd)
            raise
        return fd

    def add_queue(self) -> int:
        """Another queue (IFF_MULTI_QUEUE): the kernel spreads frames to us over the queues by flow."""
        fd = self._attach(self.name)
        self.queues.append(fd)
        return fd

    def remove_queues(self) -> None:
        """Back to the first queue only (closing a queue's fd detaches it)."""
        while self.queues:
            os.close(self.queues.pop())

    def _enslave(self, s: socket.socket, bridge: str) -> None:
        if not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
            what = "is not a bridge" if os.path.exists(f"/sys/class/net/{bridge}") else "does not exist"
            raise TapError(f"vifs: bridge={bridge!r} {what} (create it first: ip link add {bridge} type bridge)")
        idx = bytearray(_ifreq(self.name))
        fcntl.ioctl(s, SIOCGIFINDEX, idx)
        ifindex = struct.unpack_from("i", idx, IFNAMSIZ)[0]
        try:
            fcntl.ioctl(s, SIOCBRADDIF, _ifreq(bridge, "i", ifindex))
        except OSError as e:
            raise TapError(f"vifs: tap {self.name!r} cannot join bridge {bridge!r}: {e.strerror}") from None

    def set_offload(self, flags: int) -> None:
        """Which offloads (TUN_F_*) the kernel may leave to us on frames we read."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        """Closing the only fd of a non-persistent tap removes the interface."""
        self.remove_queues()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            log.info("tap %s removed", self.name)
