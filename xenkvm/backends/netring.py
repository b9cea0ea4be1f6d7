"""The tx and rx rings of a vif, mapped from the frontend's grants, and what it negotiated.

``open_netif`` reads the frontend's keys (io/netif.h, Linux netfront's
``talk_to_netback``): ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel``,
``request-rx-copy`` (must be 1: "rx-flip" is gone from modern Xen, as here),
``feature-rx-notify`` (mandatory, as Linux netback has it since 3.x),
``feature-sg``, ``feature-gso-tcpv4``, ``feature-gso-tcpv6``,
``feature-no-csum-offload``, ``feature-ipv6-csum-offload``.  Every key is the
guest's and checked; a missing or malformed one, a ring grant that does not
map, or a port that is not unbound to dom0 is a ConnectError (one line) and
whatever was mapped or bound by then is released.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xenkvm.xen.evtchn import EvtchnError
from xenkvm.xen.gnttab import GrantError

from ._netif_cffi import ffi, lib
from .blkring import _number
from .xenbus import ConnectError

RING = lib.XKN_RING_SIZE


@dataclass(frozen=True)
class Features:
    """What the frontend asked for (each key "1" or absent)."""

    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    csum: bool = True                  #: not feature-no-csum-offload
    ipv6_csum: bool = False


class NetifRings:
    """The back end of one vif's tx and rx rings and its event channel."""

    def __init__(self, mappings: list, port: int, features: Features):
        self.mappings = mappings
        self.port = port
        self.features = features
        self._bufs = [ffi.from_buffer(m.view) for m in mappings]
        self.tx_page, self.rx_page = self._bufs
        self.tx_cons = 0
        self.tx_rsp_prod = ffi.new("uint32_t *")
        self.tx_reqs = ffi.new("netif_tx_request_t[]", RING)
        self.tx_rsps = ffi.new("netif_tx_response_t[]", RING)
        self.rx_cons = 0
        self.rx_rsp_prod = ffi.new("uint32_t *")
        self.rx_reqs = ffi.new("netif_rx_request_t[]", RING)
        self.rx_rsps = ffi.new("netif_rx_response_t[]", RING)

    def close(self, domain) -> None:
        """Close the event channel and unmap both rings."""
        domain.evtchn.close_vmm_port(self.port)
        self._bufs.clear()
        self.tx_page = self.rx_page = None
        for m in self.mappings:
            m.unmap()
        self.mappings = []


def _flag(keys: dict[str, str], name: str) -> bool:
    return keys.get(name, "0").strip() == "1"


def negotiated(keys: dict[str, str]) -> Features:
    """The frontend's feature keys; rx-copy and rx-notify are required."""
    if not _flag(keys, "request-rx-copy"):
        raise ConnectError("request-rx-copy is not 1 (only rx-copy is supported)")
    if not _flag(keys, "feature-rx-notify"):
        raise ConnectError("feature-rx-notify is mandatory")
    if "multi-queue-num-queues" in keys and keys["multi-queue-num-queues"].strip() != "1":
        raise ConnectError("multi-queue-num-queues: only one queue is offered")
    sg = _flag(keys, "feature-sg")
    return Features(sg=sg, gso_tcpv4=sg and _flag(keys, "feature-gso-tcpv4"),
                    gso_tcpv6=sg and _flag(keys, "feature-gso-tcpv6"),
                    csum=not _flag(keys, "feature-no-csum-offload"),
                    ipv6_csum=_flag(keys, "feature-ipv6-csum-offload"))


def open_netif(domain, keys: dict[str, str], on_notify: Callable[[], None]) -> NetifRings:
    """Map both rings and bind the event channel; all or nothing."""
    features = negotiated(keys)
    refs = [_number(keys, "tx-ring-ref", 1 << 32), _number(keys, "rx-ring-ref", 1 << 32)]
    port = _number(keys, "event-channel", 1 << 17)
    try:
        mappings = domain.gnttab.map_refs(domain.domid, refs, True)
    except GrantError as e:
        raise ConnectError(f"tx/rx-ring-ref {refs}: {e}") from None
    try:
        domain.evtchn.bind_vmm_to_guest_port(port, on_notify)
    except EvtchnError as e:
        for m in mappings:
            m.unmap()
        raise ConnectError(f"event-channel {port}: {e}") from None
    return NetifRings(mappings, port, features)
