"""The network backend (vif): a host tap device served over netif tx and rx rings.

Keys follow Linux's xen-netback and libxl (io/netif.h): the backend node has
``mac``, ``bridge``, ``handle``, ``type``, ``feature-rx-copy`` = 1,
``feature-rx-flip`` = 0, ``feature-sg``, ``feature-gso-tcpv4``,
``feature-gso-tcpv6``, ``feature-ipv6-csum-offload``,
``feature-split-event-channels``, ``multi-queue-max-queues``; the frontend
node ``mac`` and ``handle``.  The frontend answers with the keys netring.py
reads; each queue gets its own tap queue fd (IFF_MULTI_QUEUE).

**Tx** (guest -> host) runs on the device's xenbus worker, per kick, for
every queue: every request up to ``req_prod`` is copied out of the ring (C),
each packet's slots are checked, gathered by grant copy into one
preallocated buffer behind the ``virtio_net_hdr`` netpkt.py builds (checksum
and GSO offload) and written to the tap in one ``write``.  Responses go back
in one push per batch.  The worker does this in C (nettx.py, ``xkn_tx_loop``,
the same rules) and hands Python only the packets C refuses, which
``_tx_packet`` below serves with the exact reason.  io/netif.h's wire format: fragment 1's ``size`` is
the total packet size, extras follow it, and "the actual size of fragment 1
can only be determined by subtracting the sizes of fragments 2..N from the
total packet size"; a frontend may use "slots up to" XEN_NETIF_NR_SLOTS_MIN
(18).  A malformed packet is dropped, its slots answered
``NETIF_RSP_ERROR``, counted (``stats``; a log line on the first and every
100th) and the vif stays up: a bad grant, a slot running past the end of its
page, fragments 2..N larger than the total, a runt (under an Ethernet
header), more than 18 slots, an unknown extra, an offload whose headers
cannot be found.  A producer index more than a ring ahead is refused as a
whole (nothing consumed, counted) until the frontend publishes a sane one;
Linux netback would disable the vif instead.

**Rx** (host -> guest) runs on one thread per connected queue, which waits on
its tap queue fd and on its rx event channel (an eventfd): a pass in C
(``xkn_rx_pass``, without the GIL) reads frames and copies each into the guest's
posted rx buffers by grant copy, one page per slot (``NETRXF_more_data`` between
them; without ``feature-sg`` a frame must fit one page), a GSO frame with its
extra slot; the offload flags come from the frame's ``virtio_net_hdr``.  With no
posted buffer it re-arms ``req_event`` (``feature-rx-notify``) and stops reading:
frames wait in the tap's queue (and the kernel drops past it), as in netback.
The thread sleeps and serves in C (``xkn_rx_loop``): it pushes the responses and
notifies once per pass through C delivery (2-level channels: xen/evtchn/cdeliver.py),
so a frame costs no Python; Python runs only for a frame whose copy C left (the
exact grant error in its slot), a notify C declined (FIFO channels), a bad ring
index, a tap error, and to park the thread for a snapshot (it pushes first).
(A thread of its own, not the I/O thread: a tap busy with host traffic must
not delay vCPU timers and other devices' kicks.)

Just past ~400 lines: the vif's tx and rx paths with their per-request checks belong to one
device object; the ring setup (netring.py) and header translation (netpkt.py) are apart.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from xenkvm.vifspec import VifSpec
from xenkvm.xen.evtchn.cdeliver import notify

from . import netpkt
from ._netif_cffi import ffi, lib
from .gntcopy import BatchCopy
from .latency import CostWindow, EventLatency
from .netring import RING, NetifRings, open_queues
from .nettx import TxLoop
from .tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap
from .xenbus import ConnectError, XenbusDevice

log = logging.getLogger(__name__)

PAGE = 4096
MAX_SLOTS = lib.XEN_NETIF_NR_SLOTS_MIN
COST_LOG_NS = 5_000_000_000   #: while packets flow, log their cost this often (at -v)
MORE, EXTRA, CSUM_BLANK = lib.NETTXF_more_data, lib.NETTXF_extra_info, lib.NETTXF_csum_blank
OKAY, ERROR, NULL = lib.NETIF_RSP_OKAY, lib.NETIF_RSP_ERROR, lib.NETIF_RSP_NULL
GSO_TYPES = {lib.XEN_NETIF_GSO_TYPE_TCPV4: "gso_tcpv4", lib.XEN_NETIF_GSO_TYPE_TCPV6: "gso_tcpv6"}
HDR = netpkt.VNET_HDR_LEN
assert HDR == lib.XKN_VNET_HDR
FRAME_MAX = 65536 + 64
MAX_QUEUES = 4                           #: multi-queue-max-queues (one tap queue fd each)


class Malformed(Exception):
    """A tx packet the frontend should not have sent (the reason, for the log)."""


class VifDevice(XenbusDevice):
    """A vif: the tap lives as long as the device, the rings as long as a connection."""

    type = "vif"

    def __init__(self, spec: VifSpec, domid: int):
        super().__init__(spec.devid, spec.vifname or f"vif{domid}.{spec.devid}")
        self.spec = spec
        self.tap = Tap(self.name, spec.bridge)
        self.name = self.tap.name
        self.queues: list[NetifRings] = []
        self.stats = {"tx_packets": 0, "tx_bytes": 0, "tx_gso": 0, "tx_malformed": 0, "tx_dropped": 0,
                      "tx_bad_index": 0, "rx_packets": 0, "rx_bytes": 0, "rx_gso": 0, "rx_dropped": 0,
                      "rx_bad_index": 0, "rx_c_notifies": 0, "tx_c_notifies": 0,
                      "tx_busy_ns": 0, "rx_busy_ns": 0}   #: busy: CPU time serving (bench_netback.py)
        self._tx_buf = bytearray(HDR + 65536)
        self._tx_mv = memoryview(self._tx_buf)
        self._tx_ptr = ffi.from_buffer(self._tx_buf)
        self._tx_copy: BatchCopy | None = None       #: the tx worker's (connect)
        self._tx_loop: TxLoop | None = None          #: the worker's C serve loop over the connection's queues
        self._gso = ffi.new("struct xkn_gso *")
        self._rx: list[RxWorker] = []
        #: per queue index: the rx thread's wake-up eventfd, leased from the domain's fast-path pool
        #: for the device's life (a kick may still write one after its port closed)
        self._rx_fds: dict[int, int] = {}
        self.costs: CostWindow | None = None   #: the domain's hypercalls/upcalls per packet (log lines)
        #: the event path per direction (latency.py): "tx" the guest's tx kicks and the worker's
        #: passes, "rx" its rx-buffer kicks and the rx passes; "turn": an rx notify to the guest's next
        #: tx kick (at most an ACK's turn: the upcall, the guest's rx, its reply queued and kicked)
        self.latency = {"tx": EventLatency(), "rx": EventLatency(), "turn": EventLatency()}
        self._seen: dict[int, int] = {}        #: port -> the last fast-path send stamp taken
        self._window = (0, 0, 0)               #: (perf_counter_ns, tx, rx packets) at the last cost line

    # -- xenstore ----------------------------------------------------------------------
    def frontend_keys(self) -> dict[str, str]:
        return {"mac": self.spec.mac, "handle": str(self.devid)}

    def backend_keys(self) -> dict[str, str]:
        offload = "1" if self.spec.offload else "0"     # offload=off: no GSO, no IPv6 csum offload
        keys = {"mac": self.spec.mac, "handle": str(self.devid), "type": "vif", "vifname": self.name,
                "hotplug-status": "connected", "feature-rx-copy": "1", "feature-rx-flip": "0",
                "feature-sg": "1", "feature-gso-tcpv4": offload, "feature-gso-tcpv6": offload,
                "feature-ipv6-csum-offload": offload, "feature-split-event-channels": "1",
                "multi-queue-max-queues": str(MAX_QUEUES)}
        if self.spec.bridge:
            keys["bridge"] = self.spec.bridge
        if self.spec.ip:
            keys["ip"] = self.spec.ip
        return keys

    def connect(self, frontend: dict[str, str], before_rx: Callable[[], None] | None = None) -> None:
        f, self.queues = open_queues(self.domain, frontend, self._tx_kick, self._rx_kick, MAX_QUEUES,
                                     self.spec.offload, tx_fd=self.backend.kick_fd, rx_fd=self.rx_wake_fd)
        csum = f.csum and self.spec.offload       # offload=off: the host finishes every frame it hands us
        self.tap.set_offload((TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if f.gso_tcpv4 and csum else 0)
                             | (TUN_F_TSO6 if f.gso_tcpv6 and csum and f.ipv6_csum else 0))
        try:
            for q in self.queues:
                q.fd = self.tap.fd if q.index == 0 else self.tap.add_queue()
        except OSError as e:
            self.disconnect()
            raise ConnectError(f"tap {self.name}: queue: {e.strerror}") from None
        self._tx_copy = BatchCopy(self.domain, MAX_SLOTS)
        self.costs = CostWindow(self.domain)
        self._window = (time.perf_counter_ns(), self.stats["tx_packets"], self.stats["rx_packets"])
        if before_rx is not None:      # a restore: the saved indexes, before any rx thread runs
            try:
                before_rx()
            except (ConnectError, KeyError, TypeError, ValueError):
                self.disconnect()
                raise
        self._rx = [RxWorker(self, q) for q in self.queues]
        q0 = self.queues[0]
        log.info("%s: connected, tap %s, %d queue(s), ports %d/%d, %s", self.backend.label, self.name,
                 len(self.queues), q0.tx_port, q0.rx_port,
                 ", ".join(k for k, v in vars(f).items() if v) or "no offloads")

    def disconnect(self) -> None:
        if self._tx_loop is not None:       # the worker's: it is not in the loop while it disconnects
            self._tx_loop.account()
            self._tx_loop = None
        workers, self._rx = self._rx, []
        for rx in workers:
            rx.stop()
        queues, self.queues = self.queues, []
        for q in queues:
            q.close(self.domain)
        for rx in workers:
            rx.close()
        if queues:
            self.tap.remove_queues()
            self.tap.set_offload(0)

    def close(self) -> None:
        """Unplug or VM end: stop serving, log the counters (what a user asks ``ip -s link`` for), drop the tap."""
        self.disconnect()
        for fd in self._rx_fds.values():
            self.domain.fast.release_fd(fd)
        self._rx_fds.clear()
        self._log_latency()
        log.info("%s: tap %s: %s", self.backend.label, self.name,
                 " ".join(f"{k}={v}" for k, v in self.stats.items() if not k.endswith("_ns")))
        self.tap.close()

    # -- snapshots (backends/snapshot.py) ----------------------------------------------------
    def event_ports(self) -> set[int]:
        return {p for q in self.queues for p in (q.tx_port, q.rx_port)}

    def quiesce(self) -> None:
        """Each rx thread pushes what it served and waits (the xenbus worker, tx, is parked)."""
        for rx in self._rx:
            rx.pause()

    def unquiesce(self) -> None:
        for rx in self._rx:
            rx.resume()

    def save_state(self) -> dict:
        """The tap's name and per queue the private tx/rx indexes.  A frame an rx thread read from
        the tap but had no buffer for yet is not saved: the restored vif drops it, as a NIC would."""
        return {"tap": self.name, "queues": [{"tx_cons": q.tx_cons, "tx_rsp_prod": q.tx_rsp_prod[0],
                                              "rx_cons": q.rx_cons, "rx_rsp_prod": q.rx_rsp_prod[0]}
                                             for q in self.queues]}

    def restore_state(self, state: dict, frontend: dict[str, str] | None) -> None:
        """Connect to the saved queues again (the tap is new: built with the saved name when free),
        then put the indexes back before the rx threads look at the rings."""
        saved = state["queues"]
        if frontend is None:
            return
        self.connect(frontend, before_rx=lambda: self._load_indexes(saved))

    def _load_indexes(self, saved: list) -> None:
        if len(saved) != len(self.queues):
            raise ConnectError(f"{len(saved)} queues saved, the frontend keys give {len(self.queues)}")
        for q, st in zip(self.queues, saved):
            q.tx_cons, q.rx_cons = int(st["tx_cons"]) & 0xFFFFFFFF, int(st["rx_cons"]) & 0xFFFFFFFF
            q.tx_rsp_prod[0] = int(st["tx_rsp_prod"]) & 0xFFFFFFFF
            q.rx_rsp_prod[0] = int(st["rx_rsp_prod"]) & 0xFFFFFFFF

    def _tx_kick(self, _queue: int) -> None:
        """A tx event (in the guest's EVTCHNOP_send, under the domain's lock): every queue's tx is
        served on the worker, kicks coalesced."""
        self.backend.kick()

    def rx_wake_fd(self, queue: int) -> int:
        """Queue ``queue``'s rx eventfd: its rx port is bound to it, its rx thread sleeps on it."""
        fd = self._rx_fds.get(queue)
        if fd is None:
            fd = self._rx_fds[queue] = self.domain.fast.lease_fd()
        return fd

    def _rx_kick(self, queue: int) -> None:
        """An rx event (in the guest's EVTCHNOP_send): the frontend posted buffers on ``queue``."""
        workers = self._rx
        if queue < len(workers):
            workers[queue].wake()

    # -- tx --------------------------------------------------------------------------------
    def serve_loop(self, ctl_fd: int) -> bool:
        """The worker sleeps and serves tx in C until it has an event (nettx.py)."""
        if not self.queues:
            return False
        if self._tx_loop is None or self._tx_loop.queues is not self.queues:
            self._tx_loop = TxLoop(self, ctl_fd, COST_LOG_NS)
        self._tx_loop.run()
        return True

    def service(self) -> None:
        """Send every complete packet the frontend queued; re-arm ``req_event`` (Python's pass:
        the worker's first after an event; then it serves in C, :meth:`serve_loop`)."""
        start = time.thread_time_ns()
        for w in self._rx:
            ns = w.c_notified()
            if ns is not None:
                self.latency["turn"].pushed(ns)
        for q in self.queues:
            ns = self.kick_stamp(q.tx_port)
            if ns is not None:
                self.latency["tx"].kicked(at=ns)
                self.latency["turn"].kicked(at=ns)
        self.latency["tx"].serving()
        try:
            self._tx_service()
        finally:
            self.stats["tx_busy_ns"] += time.thread_time_ns() - start
            self._log_costs()

    def sync_stats(self) -> dict[str, int]:
        """``stats`` with the rx threads' C counters folded in (their loops fold them only when
        they return to Python)."""
        for w in self._rx:
            w.account()
        if self._tx_loop is not None:
            self._tx_loop.account()
        return self.stats

    def kick_stamp(self, port: int) -> int | None:
        """The guest's latest send on ``port`` as the fast path stamped it, if new since the last look."""
        ns = self.domain.fast.last_send_ns(port)
        if not ns or ns == self._seen.get(port):
            return None
        self._seen[port] = ns
        return ns

    def _log_costs(self) -> None:
        """Every COST_LOG_NS while packets flow: the hypercalls and upcalls per packet (at -v)."""
        at, tx0, rx0 = self._window
        now = time.perf_counter_ns()
        if self.costs is None or now - at < COST_LOG_NS:
            return
        self.sync_stats()
        tx, rx = self.stats["tx_packets"], self.stats["rx_packets"]
        self._window = (now, tx, rx)
        log.info("%s: costs: %s", self.backend.label,
                 self.costs.sample(tx - tx0 + rx - rx0, {"tx": tx - tx0, "rx": rx - rx0}))
        self._log_latency()

    def _log_latency(self) -> None:
        """The event path per direction (at -v): tx and rx as the vbd's (latency.py), and the turn
        from an rx notify to the guest's next tx kick."""
        if not log.isEnabledFor(logging.INFO):
            return
        parts = [f"{name}: {lat.line()}" for name, lat in self.latency.items() if name != "turn" and lat.summary()]
        turn = self.latency["turn"].summary().get("response_to_kick")
        if turn:
            parts.append(f"rx notify to tx kick n={turn[0]} median={turn[1]:.0f}us p90={turn[2]:.0f}us")
        if parts:
            log.info("%s: event latency: %s", self.backend.label, "  ".join(parts))

    def _tx_service(self) -> None:
        for q in self.queues:
            self._tx_queue(q)

    def _tx_queue(self, r: NetifRings) -> None:
        while True:
            n = lib.xkn_tx_peek(r.tx_page, r.tx_cons, r.tx_reqs, RING)
            if n < 0:
                self._count("tx_bad_index", f"req_prod {lib.xkn_req_prod(r.tx_page)} is more than a ring "
                                         f"ahead of req_cons {r.tx_cons}; ignored until it is sane")
                lib.xkn_tx_arm_after(r.tx_page, r.tx_cons)   # any sane push from req_cons notifies
                return
            if n == 0:
                if not lib.xkn_tx_final_check(r.tx_page, r.tx_cons):
                    return
                continue
            used = self._tx_batch(r, n)
            if used and lib.xkn_tx_push(r.tx_page, r.tx_rsp_prod, r.tx_rsps, used):
                self._notify_tx(r.tx_port, -1)
            if used < n and not lib.xkn_tx_arm_after(r.tx_page, r.tx_cons + n - used):
                return      # the last packet is not complete: the frontend notifies when it is

    def _notify_tx(self, port: int, answer: int) -> None:
        """Notify a tx port: all of it (``answer`` -1: no C delivery), or the part C delivery
        left to Python."""
        t = time.perf_counter_ns()
        if answer >= 0:
            self.domain.cdeliver.finish(port, answer)
        else:
            notify(self.domain, port)
        self.latency["tx"].notified(t)

    def _tx_batch(self, r: NetifRings, n: int) -> int:
        """Send the complete packets among the ``n`` requests copied out; how many requests were used."""
        i = 0
        while i < n:
            used = self._tx_packet(r, i, n)
            if used == 0:
                break
            i += used
        r.tx_cons += i
        return i

    def _tx_packet(self, r: NetifRings, i: int, n: int) -> int:
        """One packet from request ``i``: sent, or dropped and counted; 0 if its slots are not all there."""
        reqs, rsps = r.tx_reqs, r.tx_rsps
        try:
            slots, extras, gso = self._tx_slots(r, i, n)
        except _Incomplete:
            return 0
        except Malformed as e:
            end = e.args[1]
            for k in range(i, end):
                rsps[k].id, rsps[k].status = reqs[k].id, ERROR
            self._count("tx_malformed", e.args[0])
            return end - i
        status = OKAY
        try:
            self._send(r, slots, gso)
        except Malformed as e:
            status = ERROR
            self._count("tx_malformed", e.args[0])
        end = max(slots[-1], extras[-1] if extras else i) + 1
        for k in range(i, end):
            rsps[k].id = reqs[k].id
            rsps[k].status = NULL if k in extras else status
        return end - i

    def _tx_slots(self, r: NetifRings, i: int, n: int) -> tuple[list[int], list[int], tuple[int, int]]:
        """Indexes of the packet's data slots and extras, and its GSO (type, size); checked."""
        reqs, f = r.tx_reqs, r.features
        slots, extras, gso, j, problem = [i], [], (0, 0), i + 1, ""
        more_extras = bool(reqs[i].flags & EXTRA)
        while more_extras:
            if j >= n:
                raise _Incomplete
            t = lib.xkn_tx_gso(ffi.addressof(reqs, j), self._gso)
            more_extras, t = t < 0, (-t - 1 if t < 0 else t)
            extras.append(j)
            j += 1
            if t == lib.XEN_NETIF_EXTRA_TYPE_GSO:
                if not getattr(f, GSO_TYPES.get(self._gso.type, "none"), False):
                    problem = f"GSO type {self._gso.type} not negotiated"
                gso = (self._gso.type, self._gso.size)
            elif not lib.XEN_NETIF_EXTRA_TYPE_NONE < t < lib.XEN_NETIF_EXTRA_TYPE_MAX:
                problem = f"extra type {t}"
        more = bool(reqs[i].flags & MORE)
        while more:       # the data slots follow the extras; each says whether another follows
            if j >= n:
                raise _Incomplete
            slots.append(j)
            more = bool(reqs[j].flags & MORE)
            j += 1
        if len(slots) > MAX_SLOTS:
            problem = f"{len(slots)} slots (at most {MAX_SLOTS})"
        if problem:
            raise Malformed(problem, j)
        return slots, extras, gso

    def _send(self, r: NetifRings, slots: list[int], gso: tuple[int, int]) -> None:
        """Check the sizes, gather the slots by grant copy, write header + frame to the tap."""
        reqs, buf, copy = r.tx_reqs, self._tx_mv, self._tx_copy
        total = lib.xkn_tx_segs(reqs, slots[0], slots[1] if len(slots) > 1 else 0, len(slots) - 1,
                                self._tx_ptr + HDR, copy.segs)      # the data slots follow each other
        if total < 0:
            first, rest = reqs[slots[0]].size, sum(reqs[k].size for k in slots[1:])
            if total == -1:
                raise Malformed(f"packet size {first}, slots after the first {rest}")
            q = reqs[slots[-total - 2]]
            raise Malformed(f"slot {q.offset}+{first - rest if total == -2 else q.size} crosses its page")
        pos = HDR + total
        copy.filled(len(slots))
        errors = copy.run(to_guest=False)        # gntcopy.py: Xen's grant checks, one C call
        if errors:
            i, e = next(iter(errors.items()))
            raise Malformed(f"grant {copy.segs[i].ref}: {e}")
        head = bytes(buf[HDR:min(pos, HDR + 128)])     # the packet's own bytes, not a former one's
        hdr = netpkt.tx_vnet_hdr(head, bool(reqs[slots[0]].flags & CSUM_BLANK), gso[0], gso[1])
        if hdr is None:
            raise Malformed("checksum/GSO offload asked for a packet without a TCP/UDP header")
        buf[:HDR] = hdr
        try:
            os.write(self.tap.fd, buf[:pos])
        except OSError as e:     # the host side is congested or down: dropped, as a NIC drops
            self._count("tx_dropped", f"tap write: {e.strerror}")
            return
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += total
        if gso[0]:
            self.stats["tx_gso"] += 1

    def _count(self, what: str, why: str) -> None:
        self.stats[what] += 1
        n = self.stats[what]
        if n == 1 or n % 100 == 0:
            log.warning("%s: %s: %s (%d so far); the vif stays up", self.backend.label, what.replace("_", " "),
                        why, n)


class _Incomplete(Exception):
    """The packet's remaining slots are not produced yet."""


class RxWorker:
    """The rx thread of one connection: tap frames into the guest's posted buffers.

    The thread serves in C (``xkn_rx_loop``: it sleeps on the rx port's eventfd and the tap,
    makes the passes, pushes and notifies through C delivery) and runs Python only for what C
    hands back: a frame whose grant copy it left, a ring index or tap error, a notify C delivery
    declined, a stop or a park."""

    def __init__(self, dev: VifDevice, rings: NetifRings):
        self.dev, self.r = dev, rings
        self.features = rings.features
        self._wake_fd = dev.rx_wake_fd(rings.index)   #: a stale count costs one pass; the first pass is owed anyway
        self._stop = False
        self._parked = threading.Event()   #: set by the thread once it is parked (or ended)
        self._resume = threading.Event()   #: set by :meth:`resume`
        self._copy = BatchCopy(dev.domain, MAX_SLOTS)     #: its segments are C's; its Python path, ours
        self._snapshot = self._copy.snapshot
        self._buf = ffi.new("char[]", FRAME_MAX)
        self._reqs = ffi.new("netif_rx_request_t[]", MAX_SLOTS)
        #: the pass's state; ``len`` keeps a frame read and not delivered yet (no rx buffers)
        self._rx = ffi.new("struct xkn_rx *", {
            "page": rings.rx_page, "reqs": self._reqs, "rsps": rings.rx_rsps, "segs": self._copy.segs,
            "buf": self._buf, "buf_size": FRAME_MAX, "fd": rings.fd, "sg": rings.features.sg,
            "cons": rings.rx_cons & 0xFFFFFFFF})
        self._loop = ffi.new("struct xkn_rx_loop *", {
            "c": self._rx, "g": self._snapshot.ptr, "rsp_prod": rings.rx_rsp_prod, "wake_fd": self._wake_fd,
            "port": rings.rx_port})
        cdeliver = getattr(dev.domain, "cdeliver", None)
        if cdeliver is not None:        # notifies in C (2-level channels: xen/evtchn/cdeliver.py)
            self._loop.notify_fn, self._loop.notify_ctx = cdeliver.for_c()
        #: C's counters already in the vif's stats (packets, bytes, GSO frames, drops, busy_ns, C notifies)
        self._seen = (0, 0, 0, 0, 0, 0)
        self._account_lock = threading.Lock()
        self._notified_seen = 0    #: the latest C notify's time already stamped (the tx worker's)
        self._thread = threading.Thread(target=self._run, name=f"{dev.backend.label}-rx{rings.index}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        """End the thread before the rings are unmapped."""
        self._stop = True
        self._loop.stop = 1
        self._resume.set()
        self.wake()
        self._thread.join()

    def pause(self) -> None:
        """Snapshots: return when the thread has pushed what it served and waits for :meth:`resume`
        (it touches no ring or guest page meanwhile)."""
        self._parked.clear()
        self._loop.stop = 1
        self.wake()
        while not self._parked.wait(1.0):
            if not self._thread.is_alive():
                return

    def resume(self) -> None:
        self._loop.stop = 0
        self._resume.set()

    def close(self) -> None:
        """Nothing to free: the wake-up eventfd is the device's (``rx_wake_fd``), reused by the next
        connection's thread and released with the device."""

    def _run(self) -> None:
        L, lat = self._loop, self.dev.latency["rx"]
        try:
            while True:
                self._snapshot.sync()
                code = lib.xkn_rx_loop(L)
                self.r.rx_cons = self._rx.cons
                self.account()
                if code == lib.XKN_LOOP_STOP:
                    if self._stop:
                        return
                    self._parked.set()
                    self._resume.wait()
                    self._resume.clear()
                elif code == lib.XKN_LOOP_NOTIFY:
                    self._notify(L.notify_r)
                elif code == lib.XKN_LOOP_PASS:
                    self._pass_left(L.code)
                else:
                    raise OSError(L.err, f"the rx loop's poll: {os.strerror(L.err)}")
                ns = self.dev.kick_stamp(self.r.rx_port) if self.r.rx_port != self.r.tx_port else None
                if ns is not None:
                    lat.kicked(at=ns)
                    lat.serving()
        except Exception:
            log.exception("%s: rx thread failed; rx stopped", self.dev.backend.label)
        finally:
            self._parked.set()

    def _pass_left(self, code: int) -> None:
        """What a pass left to Python: a frame's copy, or a ring index or tap error (the
        responses before it are pushed; their notify may be owed)."""
        if code == lib.XKN_RX_COPY_LEFT:
            return self._finish_copy()
        if self._loop.notify_r != -2:
            self._notify(self._loop.notify_r)
        if code == lib.XKN_RX_BAD_INDEX:
            self.dev._count("rx_bad_index", "rx req_prod more than a ring ahead; waiting for a sane one and a kick")
        elif code == lib.XKN_RX_ERRNO:
            raise OSError(self._rx.err, f"reading tap queue {self.r.index}: {os.strerror(self._rx.err)}")

    def _notify(self, answer: int) -> None:
        """A notify of the rx port C did not finish: all of it (no C delivery: -1), or the part
        C delivery leaves to Python."""
        t = time.perf_counter_ns()
        if answer >= 0:
            self.dev.domain.cdeliver.finish(self.r.rx_port, answer)
        else:
            notify(self.dev.domain, self.r.rx_port)
        self.dev.latency["rx"].notified(t)
        self.dev.latency["turn"].notified(t)

    def c_notified(self) -> int | None:
        """The latest notify C delivery finished, if new since the last look (``turn``'s stamp)."""
        ns = self._loop.notified_ns
        if not ns or ns == self._notified_seen:
            return None
        self._notified_seen = ns
        return ns

    def _finish_copy(self) -> None:
        """The segments of the last frame C left: GrantTable's copy, or an error in that slot."""
        c, rsps = self._rx, self.r.rx_rsps
        for i, e in self._copy._python_path(c.nsegs, True).items():
            rsps[c.at + (i + 1 if c.gso and i else i)].status = ERROR     # the GSO extra is slot 1
            self.dev._count("rx_dropped", f"rx buffer grant {self._copy.segs[i].ref}: {e}")

    def account(self) -> None:
        """C's counters into the vif's stats (and the drop log line): the thread's, at each
        return, and any thread's that reads the stats while the loop runs (cost lines).  C's
        counters only grow; what was taken is remembered, under a lock."""
        c, L, stats = self._rx, self._loop, self.dev.stats
        with self._account_lock:
            now = (c.packets, c.bytes, c.gso_frames, c.dropped, L.busy_ns, L.c_notifies)
            packets, nbytes, gso, dropped, busy, cn = (a - b for a, b in zip(now, self._seen))
            self._seen = now
            stats["rx_packets"] += packets
            stats["rx_bytes"] += nbytes
            stats["rx_gso"] += gso
            stats["rx_busy_ns"] += busy
            stats["rx_c_notifies"] += cn
        for _ in range(dropped):
            self.dev._count("rx_dropped", f"a {c.drop_size}-byte frame (gso {c.drop_gso_type}) "
                                          "the frontend cannot take")
