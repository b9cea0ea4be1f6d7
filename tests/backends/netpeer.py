"""The host peer of guests/xen_netfront.c: a packet socket on the VMM's tap.

It plays 10.99.0.1 (MAC fe:ff:ff:00:00:01): answers the guest's ARP request
and ICMP echo, then injects the frames the guest checks (ethertype 0x88b5
frames of 60, 1514 and 9014 bytes whose payload byte i is i*7 + seed, and a
UDP frame to port 5555 whose checksum is left partial: a virtio_net_hdr with
NEEDS_CSUM, and a 20000-byte TCP frame for segmentation: GSO_TCPV4).  Every frame from the guest's MAC is kept, with the
virtio_net_hdr the kernel attached (PACKET_VNET_HDR), for the test to check
byte for byte.  The frames the guest sends are rebuilt here independently.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
import time

ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING = 0x0003, 263, 15, 4
VNET = struct.Struct("<BBHHHH")
PEER_MAC = bytes.fromhex("feffff000001")
GUEST_IP, PEER_IP = bytes([10, 99, 0, 2]), bytes([10, 99, 0, 1])


def csum(data: bytes, start: int = 0) -> int:
    """The Internet checksum's ones-complement sum, folded (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(proto: int, length: int, src: bytes = GUEST_IP, dst: bytes = PEER_IP) -> int:
    return csum(src + dst, proto + length)


def ip4(proto: int, l4len: int, src: bytes = GUEST_IP, dst: bytes = PEER_IP) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4len, 1, 0x4000, 64, proto, 0, src, dst)
    return h[:10] + struct.pack("!H", ~csum(h) & 0xFFFF) + h[12:]


def eth(dst: bytes, src: bytes, etype: int) -> bytes:
    return dst + src + struct.pack("!H", etype)


def arp_request(mac: bytes) -> bytes:
    return eth(b"\xff" * 6, mac, 0x0806) + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, GUEST_IP,
                                                       bytes(6), PEER_IP)


def icmp_echo(mac: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4B58, 1) + bytes((i * 3 + 7) % 256 for i in range(56))
    body = body[:2] + struct.pack("!H", ~csum(body) & 0xFFFF) + body[4:]
    return eth(PEER_MAC, mac, 0x0800) + ip4(1, 64) + body


def udp(mac: bytes, dport: int, n: int, seed: int, mode: str) -> bytes:
    """The guest's UDP 7777 -> dport frames; mode 'full' or 'partial' checksum."""
    payload = bytes((i * 5 + seed) % 256 for i in range(n))
    u = struct.pack("!HHHH", 7777, dport, 8 + n, 0) + payload
    c = pseudo(17, 8 + n)
    value = (~csum(u, c) & 0xFFFF) if mode == "full" else c
    return eth(PEER_MAC, mac, 0x0800) + ip4(17, 8 + n) + u[:6] + struct.pack("!H", value) + u[8:]


def tcp_gso(mac: bytes, total: int = 20000) -> bytes:
    plen = total - 54
    t = struct.pack("!HHIIBBHHH", 7777, 9997, 0, 0, 5 << 4, 0x18, 65535, 0, 0)
    payload = bytes((i * 5 + 3) % 256 for i in range(plen))
    t = t[:16] + struct.pack("!H", pseudo(6, 20 + plen)) + t[18:]
    return eth(PEER_MAC, mac, 0x0800) + ip4(6, 20 + plen) + t + payload


def injected(mac: bytes, length: int, seed: int) -> bytes:
    return eth(mac, PEER_MAC, 0x88B5) + bytes((i * 7 + seed) % 256 for i in range(length - 14))


def partial_udp_to_guest(mac: bytes) -> tuple[bytes, bytes]:
    """A 342-byte UDP frame to the guest's port 5555, checksum left for the receiver (NEEDS_CSUM 34/6)."""
    n = 300
    u = struct.pack("!HHHH", 4444, 5555, 8 + n, pseudo(17, 8 + n, PEER_IP, GUEST_IP)) + bytes(range(256)) + bytes(44)
    frame = eth(mac, PEER_MAC, 0x0800) + ip4(17, 8 + n, PEER_IP, GUEST_IP) + u
    return VNET.pack(1, 0, 0, 0, 34, 6), frame


def gso_tcp_to_guest(mac: bytes, total: int = 20000) -> tuple[bytes, bytes]:
    """A TCP frame to the guest's port 5556 for segmentation at 1448 (GSO_TCPV4, NEEDS_CSUM 34/16)."""
    plen = total - 54
    t = struct.pack("!HHIIBBHHH", 4444, 5556, 0, 0, 5 << 4, 0x18, 65535, pseudo(6, 20 + plen, PEER_IP, GUEST_IP), 0)
    frame = eth(mac, PEER_MAC, 0x0800) + ip4(6, 20 + plen, PEER_IP, GUEST_IP) + t + bytes(
        (i * 7 + 4) % 256 for i in range(plen))
    return VNET.pack(1, 1, 54, 1448, 34, 16), frame


def udp_flow_to_guest(mac: bytes, flow: int) -> bytes:
    """One of 16 flows to the guest's ports 6000-6015: 64 payload bytes, byte k = flow*13 + k."""
    payload = bytes((flow * 13 + k) % 256 for k in range(64))
    u = struct.pack("!HHHH", 7000 + flow, 6000 + flow, 72, 0) + payload
    return eth(mac, PEER_MAC, 0x0800) + ip4(17, 72, PEER_IP, GUEST_IP) + u


class Peer(threading.Thread):
    """Runs beside the VMM until stopped; ``frames``: (vnet header, frame) from the guest, in order."""

    def __init__(self, ifname: str, guest_mac: bytes):
        super().__init__(daemon=True)
        self.ifname, self.mac = ifname, guest_mac
        self.frames: list[tuple[tuple, bytes]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._serve()
        except Exception as e:       # reported by the test
            self.errors.append(repr(e))

    def _open(self) -> socket.socket:
        end = time.monotonic() + 120
        while not os.path.exists(f"/sys/class/net/{self.ifname}"):
            if time.monotonic() > end or self.stop.is_set():
                raise TimeoutError(f"no interface {self.ifname}")
            time.sleep(0.02)
        for knob in (f"/proc/sys/net/ipv6/conf/{self.ifname}/disable_ipv6",):
            try:
                with open(knob, "w") as f:
                    f.write("1")
            except OSError:
                pass
        subprocess.run(["ip", "link", "set", "dev", self.ifname, "mtu", "9000"], check=True)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((self.ifname, 0))
        s.settimeout(0.2)
        return s

    def _serve(self) -> None:
        s = self._open()
        with s:
            while not self.stop.is_set():
                try:
                    data, addr = s.recvfrom(70000)
                except TimeoutError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                        return     # the VMM ended and its tap went down
                    raise
                if addr[2] == PACKET_OUTGOING or data[10 + 6:10 + 12] != self.mac:
                    continue
                hdr, frame = VNET.unpack(data[:10]), data[10:]
                self.frames.append((hdr, frame))
                self._answer(s, frame)

    def _answer(self, s: socket.socket, frame: bytes) -> None:
        plain = VNET.pack(0, 0, 0, 0, 0, 0)
        if frame == arp_request(self.mac):
            reply = eth(self.mac, PEER_MAC, 0x0806) + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, PEER_MAC,
                                                                  PEER_IP, self.mac, GUEST_IP)
            s.send(plain + reply)
        elif frame == icmp_echo(self.mac):
            body = b"\0\0\0\0" + frame[38:]
            body = body[:2] + struct.pack("!H", ~csum(body) & 0xFFFF) + body[4:]
            s.send(plain + eth(self.mac, PEER_MAC, 0x0800) + ip4(1, 64, PEER_IP, GUEST_IP) + body)
            for length, seed in ((60, 1), (1514, 2), (9014, 3)):
                s.send(plain + injected(self.mac, length, seed))
            s.send(b"".join(partial_udp_to_guest(self.mac)))
            s.send(b"".join(gso_tcp_to_guest(self.mac)))
        elif frame == udp(self.mac, 9996, 100, 6, "full"):         # the guest's second queue is up
            for flow in range(16):
                s.send(plain + udp_flow_to_guest(self.mac, flow))
