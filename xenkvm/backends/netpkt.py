"""Offload metadata between netif flags/extras and the tap's ``virtio_net_hdr``.

A frontend that sends ``NETTXF_csum_blank`` leaves the TCP/UDP checksum for
the backend (Linux netfront does for every TCP/UDP packet); its GSO extra
(``XEN_NETIF_EXTRA_TYPE_GSO``) asks for segmentation at ``size`` bytes.  The
tap takes both as a ``virtio_net_hdr`` (linux/virtio_net.h): ``NEEDS_CSUM``
with ``csum_start`` (where the L4 header begins) and ``csum_offset`` (the
checksum field within it), ``gso_type``/``gso_size``/``hdr_len``.  Finding
the L4 header means reading the Ethernet, VLAN and IP headers: at most the
first 128 bytes, unpacked with ``struct`` (what Linux netback's
``skb_checksum_setup`` does).  A ``csum_blank`` packet whose L4 header
cannot be found is dropped, as netback drops it.

The other way, a frame read from the tap with ``NEEDS_CSUM`` goes to the
guest with ``NETRXF_csum_blank | NETRXF_data_validated`` and one with
``DATA_VALID`` with ``NETRXF_data_validated``; a GSO frame gets a GSO extra.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

VNET_HDR = struct.Struct("<BBHHHH")      #: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size             #: 10: TUNSETVNETHDRSZ left at its default
F_NEEDS_CSUM, F_DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
NO_OFFLOAD = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0)
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPPROTO_TCP, IPPROTO_UDP = 6, 17
_IPV6_EXT = (0, 43, 60)                  #: hop-by-hop, routing, destination options: skipped
CSUM_FIELD = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


@dataclass(frozen=True)
class L4:
    """Where a packet's transport header starts and what it is."""

    start: int
    proto: int
    ipv6: bool
    header_len: int          #: of the TCP header (for GSO's hdr_len); 8 for UDP


def find_l4(head: bytes) -> L4 | None:
    """The TCP/UDP header of an Ethernet frame (``head``: its first bytes), or None."""
    if len(head) < 14:
        return None
    off, etype = 14, struct.unpack_from("!H", head, 12)[0]
    while etype in (ETH_P_8021Q, ETH_P_8021AD) and len(head) >= off + 4:
        etype = struct.unpack_from("!H", head, off + 2)[0]
        off += 4
    if etype == ETH_P_IP and len(head) >= off + 20:
        vihl, proto = head[off], head[off + 9]
        frag = struct.unpack_from("!H", head, off + 6)[0] & 0x3FFF
        if vihl >> 4 != 4 or (vihl & 15) < 5 or frag:
            return None
        return _l4(head, off + (vihl & 15) * 4, proto, False)
    if etype == ETH_P_IPV6 and len(head) >= off + 40:
        nxt, off = head[off + 6], off + 40
        while nxt in _IPV6_EXT and len(head) >= off + 8:
            nxt, off = head[off], off + (head[off + 1] + 1) * 8
        return _l4(head, off, nxt, True)
    return None


def _l4(head: bytes, start: int, proto: int, ipv6: bool) -> L4 | None:
    if proto == IPPROTO_UDP and len(head) >= start + 8:
        return L4(start, proto, ipv6, 8)
    if proto == IPPROTO_TCP and len(head) >= start + 20:
        doff = (head[start + 12] >> 4) * 4
        return L4(start, proto, ipv6, doff) if doff >= 20 else None
    return None


def tx_vnet_hdr(head: bytes, csum_blank: bool, gso_type: int, gso_size: int) -> bytes | None:
    """The header for a guest's packet: None if it asks for an offload we cannot place."""
    if not csum_blank and not gso_type:
        return NO_OFFLOAD
    l4 = find_l4(head)
    if l4 is None:
        return None
    vtype = GSO_NONE
    if gso_type:
        if l4.proto != IPPROTO_TCP or gso_size == 0:
            return None
        vtype = GSO_TCPV6 if l4.ipv6 else GSO_TCPV4
    return VNET_HDR.pack(F_NEEDS_CSUM, vtype, l4.start + l4.header_len if vtype else 0,
                         gso_size if vtype else 0, l4.start, CSUM_FIELD[l4.proto])


def rx_offload(hdr: bytes) -> tuple[int, int, int]:
    """``(flags, gso_type, gso_size)`` of a frame read from the tap (flags: F_NEEDS_CSUM/F_DATA_VALID)."""
    flags, gso_type, _hl, gso_size, _cs, _co = VNET_HDR.unpack_from(hdr)
    return flags, gso_type & 0x7F, gso_size
