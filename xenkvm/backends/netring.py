"""The tx and rx rings of a vif's queues, mapped from the frontend's grants, and what it negotiated.

``open_queues`` reads the frontend's keys (io/netif.h, Linux netfront's
``talk_to_netback``): ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel``,
``request-rx-copy`` (must be 1: only rx-copy, as Linux netback, which dropped rx-flip),
``feature-rx-notify`` (mandatory, as in Linux netback; io/netif.h: without it
"the backend will assume that it cannot safely queue packets"),
``feature-sg``, ``feature-gso-tcpv4``, ``feature-gso-tcpv6``,
``feature-no-csum-offload``, ``feature-ipv6-csum-offload``; per queue
(under ``queue-N/`` with ``multi-queue-num-queues`` > 1) ``event-channel``
or, with ``feature-split-event-channels``, ``event-channel-tx`` and
``event-channel-rx``.  Every key is the guest's and checked; a missing or malformed one, a ring grant that does not
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
from .xenbus import ConnectError, bind_kick

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
    """The back end of one queue: its tx and rx rings, its event channel(s), its tap queue fd."""

    def __init__(self, index: int, mappings: list, tx_port: int, rx_port: int, features: Features):
        self.index = index
        self.mappings = mappings
        self.tx_port, self.rx_port = tx_port, rx_port     #: equal unless split event channels
        self.features = features
        self.fd = -1                                      #: the tap queue its rx reads (net.py sets it)
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
        """Close the event channel(s) and unmap both rings."""
        for port in {self.tx_port, self.rx_port}:
            domain.evtchn.close_vmm_port(port)
        self._bufs.clear()
        self.tx_page = self.rx_page = None
        for m in self.mappings:
            m.unmap()
        self.mappings = []


def _flag(keys: dict[str, str], name: str) -> bool:
    return keys.get(name, "0").strip() == "1"


def negotiated(keys: dict[str, str], offload: bool = True) -> Features:
    """The frontend's feature keys; rx-copy and rx-notify are required.

    Without ``offload`` the backend offered no GSO and no IPv6 checksum offload, so a
    frontend's ``feature-gso-tcpv4``/``-tcpv6``/``feature-ipv6-csum-offload`` do not count
    (a GSO extra is then refused as not negotiated)."""
    if not _flag(keys, "request-rx-copy"):
        raise ConnectError("request-rx-copy is not 1 (only rx-copy is supported)")
    if not _flag(keys, "feature-rx-notify"):
        raise ConnectError("feature-rx-notify is mandatory")
    sg = _flag(keys, "feature-sg")
    return Features(sg=sg, gso_tcpv4=offload and sg and _flag(keys, "feature-gso-tcpv4"),
                    gso_tcpv6=offload and sg and _flag(keys, "feature-gso-tcpv6"),
                    csum=not _flag(keys, "feature-no-csum-offload"),
                    ipv6_csum=offload and _flag(keys, "feature-ipv6-csum-offload"))


def open_queues(domain, keys: dict[str, str], on_tx: Callable[[int], None], on_rx: Callable[[int], None],
                max_queues: int, offload: bool = True, *, tx_fd: int | None = None,
                rx_fd: Callable[[int], int] | None = None) -> tuple[Features, list[NetifRings]]:
    """Map and bind every queue (``multi-queue-num-queues``, keys under ``queue-N/``); all or nothing.

    ``on_tx(q)`` / ``on_rx(q)`` run when queue q's tx / rx event channel fires (both for one channel);
    with split event channels, ``tx_fd`` (the tx worker's eventfd) and ``rx_fd(q)`` (queue q's rx
    thread's) are bound instead, so a guest's kick wakes the thread from the vCPU's C loop
    (xen/fastpath.py).  ``offload``: whether the backend offered GSO and IPv6 checksum offload
    (:func:`negotiated`).
    """
    features = negotiated(keys, offload)
    count = 1
    if "multi-queue-num-queues" in keys:
        count = _number(keys, "multi-queue-num-queues", max_queues + 1)
        if count == 0:
            raise ConnectError("multi-queue-num-queues 0")
    queues: list[NetifRings] = []
    try:
        for q in range(count):
            where = f"queue-{q}/" if count > 1 else ""
            sub = {k[len(where):]: v for k, v in keys.items() if k.startswith(where)}
            queues.append(_open_queue(domain, q, sub, where, features, on_tx, on_rx, tx_fd, rx_fd))
    except ConnectError:
        for queue in queues:
            queue.close(domain)
        raise
    return features, queues


def _open_queue(domain, q: int, keys: dict[str, str], where: str, features: Features, on_tx, on_rx,
                tx_fd: int | None = None, rx_fd: Callable[[int], int] | None = None) -> NetifRings:
    refs = [_number(keys, "tx-ring-ref", 1 << 32, where), _number(keys, "rx-ring-ref", 1 << 32, where)]
    if "event-channel-tx" in keys or "event-channel-rx" in keys:        # feature-split-event-channels
        ports = [_number(keys, "event-channel-tx", 1 << 17, where), _number(keys, "event-channel-rx", 1 << 17, where)]
        if ports[0] == ports[1]:
            raise ConnectError(f"{where}event-channel-tx and -rx are the same port {ports[0]}")
        callbacks = [tx_fd if tx_fd is not None else (lambda: on_tx(q)),
                     rx_fd(q) if rx_fd is not None else (lambda: on_rx(q))]
    else:       # one port wakes both threads: the callback, in the sender's thread
        ports = [_number(keys, "event-channel", 1 << 17, where)]
        callbacks = [lambda: (on_tx(q), on_rx(q))]
    try:
        mappings = domain.gnttab.map_refs(domain.domid, refs, True)
    except GrantError as e:
        raise ConnectError(f"{where}tx/rx-ring-ref {refs}: {e}") from None
    bound: list[int] = []
    try:
        for port, cb in zip(ports, callbacks):
            # direct: the kick reaches the tx worker / rx thread from the guest's own EVTCHNOP_send
            # (a queue put, an eventfd write), without the I/O thread's hop
            bind_kick(domain, port, cb)
            bound.append(port)
    except EvtchnError as e:
        for p in bound:
            domain.evtchn.close_vmm_port(p)
        for m in mappings:
            m.unmap()
        raise ConnectError(f"{where}event channel {port}: {e}") from None
    return NetifRings(q, mappings, ports[0], ports[-1], features)
