"""Offload metadata between netif and the tap's virtio_net_hdr (xenkvm/backends/netpkt.py)."""
from __future__ import annotations

import struct

from xenkvm.backends import netpkt

ETH = bytes(12) + b"\x08\x00"
IP4 = bytes([0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]) + bytes(8)
TCP = bytes(12) + bytes([0x50, 0x18]) + bytes(6)


def test_tcp4_csum_and_gso():
    head = ETH + IP4 + TCP
    assert netpkt.find_l4(head) == netpkt.L4(34, 6, False, 20)
    hdr = netpkt.VNET_HDR.unpack(netpkt.tx_vnet_hdr(head, True, 1, 1448))
    assert hdr == (netpkt.F_NEEDS_CSUM, netpkt.GSO_TCPV4, 54, 1448, 34, 16)
    assert netpkt.tx_vnet_hdr(head, False, 0, 0) == netpkt.NO_OFFLOAD


def test_vlan_ipv6_udp_with_an_extension_header():
    ip6 = bytes([0x60, 0, 0, 0, 0, 16, 0, 64]) + bytes(32)           # next header: hop-by-hop
    hop = bytes([17, 0]) + bytes(6)                                 # then UDP
    head = bytes(12) + b"\x81\x00\x00\x05\x86\xdd" + ip6 + hop + bytes(8)
    assert netpkt.find_l4(head) == netpkt.L4(18 + 40 + 8, 17, True, 8)
    hdr = netpkt.VNET_HDR.unpack(netpkt.tx_vnet_hdr(head, True, 0, 0))
    assert hdr[0] == netpkt.F_NEEDS_CSUM and (hdr[4], hdr[5]) == (66, 6)


def test_offloads_without_headers_are_refused():
    assert netpkt.tx_vnet_hdr(bytes(60), True, 0, 0) is None                      # not IP
    frag = ETH + IP4[:6] + b"\x20\x00" + IP4[8:] + TCP                           # an IPv4 fragment
    assert netpkt.tx_vnet_hdr(frag, True, 0, 0) is None
    udp = ETH + IP4[:9] + b"\x11" + IP4[10:] + bytes(8)
    assert netpkt.tx_vnet_hdr(udp, True, 1, 1448) is None                        # GSO of UDP
    assert netpkt.tx_vnet_hdr(ETH + IP4 + TCP, True, 1, 0) is None               # mss 0
    assert netpkt.tx_vnet_hdr(ETH + IP4 + TCP[:12] + b"\x40" + TCP[13:], True, 0, 0) is None   # doff 4


def test_rx_offload():
    assert netpkt.rx_offload(struct.pack("<BBHHHH", 1, 0x81, 54, 1448, 34, 16)) == (1, 1, 1448)
