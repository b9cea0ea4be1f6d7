"""The vif's tx serve loop: the guest's packets onto the tap in C, on the device's worker.

``xkn_tx_loop`` (_netif_build.py) is to the vif what ``xkb_loop`` is to the
vbd: the xenbus worker sleeps in C on its kick eventfd (every queue's tx port
is bound to it, so a guest's kick wakes it from the vCPU's C loop or KVM's
ioeventfd) and its events eventfd; each kick serves every queue until its ring
is empty, a packet at a time by the rules of ``VifDevice._tx_packet`` (extras,
slots, sizes, grant copy, the ``virtio_net_hdr``, one tap write), pushing and
notifying through C delivery once per batch.  Python runs only for what C
leaves, each time for one packet or one ring: a packet any check refuses or
whose grant copy C cannot claim (``_tx_packet`` serves it, dropping and
counting it with the exact reason, then C goes on with the batch), a producer
index more than a ring ahead (counted; the queue waits for the next kick), a
notify C delivery declines (FIFO channels), a worker event (connect, unplug,
snapshot park), and every ``COST_LOG_NS`` while busy for the cost lines.  The worker's
scheduling class follows the vbd's rule (xk_policy.h, xenbus.PassPolicy): SCHED_BATCH while its
wake-ups find more than one request on average, so that on a CPU it shares with the guest's vCPU
a kick does not preempt the vCPU (an interrupt-window exit for the notify, one packet per kick).
Before, every packet (the guest's TCP ACKs too) woke a Python thread and cost
a Python pass: the ACK's trip back to the sender is part of every host->guest
round trip.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from ._netif_cffi import ffi, lib

if TYPE_CHECKING:
    from .net import VifDevice

PAGE_DATA = 65536          #: the largest packet (its first slot's size is a uint16)


class TxLoop:
    """One ``struct xkn_tx_loop`` over a connection's queues and the Python around its returns."""

    def __init__(self, dev: VifDevice, ctl_fd: int, report_every_ns: int):
        self.dev = dev
        self.queues = dev.queues
        self.report_every_ns = report_every_ns
        self._segs = ffi.new("struct xkg_seg[]", lib.XEN_NETIF_NR_SLOTS_MIN)
        self._buf = ffi.new("char[]", lib.XKN_VNET_HDR + PAGE_DATA)
        self.tx = ffi.new("struct xkn_tx[]", len(self.queues))
        for c, r in zip(self.tx, self.queues):
            f = r.features
            c.page, c.reqs, c.rsps, c.rsp_prod = r.tx_page, r.tx_reqs, r.tx_rsps, r.tx_rsp_prod
            c.segs, c.buf, c.fd, c.port = self._segs, self._buf, r.fd, r.tx_port
            c.gso_ok = (int(f.gso_tcpv4) << lib.XEN_NETIF_GSO_TYPE_TCPV4) | (
                int(f.gso_tcpv6) << lib.XEN_NETIF_GSO_TYPE_TCPV6)
        self.snapshot = dev._tx_copy.snapshot     #: the grant claims' view, synced before each call
        L = self.c = ffi.new("struct xkn_tx_loop *")
        L.q, L.nq, L.g = self.tx, len(self.queues), self.snapshot.ptr
        L.kick_fd, L.ctl_fd = dev.backend.kick_fd, ctl_fd
        L.hold_ns = dev.spec.tx_coalesce_us * 1000
        pol = dev.backend.policy        # the worker's scheduling policy, kept per wake-up in C
        L.batch_at, L.other_below, L.probe_every = pol.BATCH_AT, pol.OTHER_BELOW, pol.PROBE_EVERY
        cdeliver = getattr(dev.domain, "cdeliver", None)
        if cdeliver is not None:        # notifies in C (2-level channels: xen/evtchn/cdeliver.py)
            L.notify_fn, L.notify_ctx = cdeliver.for_c()
        #: C's counters already in the vif's stats: per queue (packets, bytes, GSO, dropped), then
        #: the loop's (busy_ns, C notifies)
        self._seen = [(0, 0, 0, 0)] * len(self.queues)
        self._seen_loop = (0, 0)
        self._account_lock = threading.Lock()
        self._stamped = (0, 0)          #: (woke_ns, notified_ns) already given to the latencies

    def run(self) -> None:
        """Serve until the worker has an event; every queue's batch is consumed then (its
        ``tx_cons`` is NetifRings' again, which the Python path also serves from)."""
        L, dev = self.c, self.dev
        for c, r in zip(self.tx, self.queues):
            c.cons, c.n, c.at, c.pending, c.wait_kick = r.tx_cons & 0xFFFFFFFF, 0, 0, 1, 0
        L.report_ns = time.perf_counter_ns() + self.report_every_ns
        pol = dev.backend.policy
        L.batch, L.average, L.switches = pol.batch, pol.average, pol.switches
        try:
            while True:
                self.snapshot.sync()
                code = lib.xkn_tx_loop(L)
                self.account()
                if code == lib.XKN_LOOP_EVENT:
                    return
                if code == lib.XKN_LOOP_PASS:
                    self._pass_left(L.at, L.code)
                elif code == lib.XKN_LOOP_NOTIFY:
                    dev._notify_tx(self.queues[L.at].tx_port, L.notify_r)
                elif code == lib.XKN_LOOP_REPORT:
                    self.stamp()
                    dev._log_costs()
                    L.report_ns = time.perf_counter_ns() + self.report_every_ns
                else:
                    raise OSError(L.err, f"the tx loop's poll: {os.strerror(L.err)}")
        finally:
            for c, r in zip(self.tx, self.queues):
                r.tx_cons = c.cons
            pol.batch, pol.average, pol.switches = bool(L.batch), L.average, L.switches
            self.stamp()

    def _pass_left(self, i: int, code: int) -> None:
        """Queue ``i``'s packet at ``at`` (Python's rules and messages), or its refused ring."""
        c, r = self.tx[i], self.queues[i]
        if code == lib.XKN_TX_BAD_INDEX:
            self.dev._count("tx_bad_index", f"req_prod {lib.xkn_req_prod(r.tx_page)} is more than a ring "
                                            f"ahead of req_cons {c.cons}; ignored until it is sane")
            return
        used = self.dev._tx_packet(r, c.at, c.n)
        if used <= 0:       # C found every slot produced before handing it over
            raise RuntimeError(f"tx queue {i}: packet at {c.cons + c.at} incomplete after C found it complete")
        c.at += used

    def stamp(self) -> None:
        """The event-path latencies, sampled at returns (a packet costs no Python): the latest
        tx kick and C's latest wake-up and notify."""
        L, dev = self.c, self.dev
        woke, notified = L.woke_ns, L.notified_ns
        if (woke, notified) == self._stamped:
            return
        self._stamped = (woke, notified)
        lat = dev.latency["tx"]
        for r in self.queues:
            ns = dev.kick_stamp(r.tx_port)
            if ns is not None and ns <= woke:
                lat.kicked(at=ns)
                dev.latency["turn"].kicked(at=ns)
        if woke:
            lat.serving(at=woke)
        if notified:
            lat.pushed(notified)

    def account(self) -> None:
        """C's counters into the vif's stats (and the drop log line), from the worker at each
        return or any thread reading the stats while the loop runs; C's counters only grow."""
        L, stats, drops = self.c, self.dev.stats, []
        with self._account_lock:
            for k, c in enumerate(self.tx):
                now = (c.packets, c.bytes, c.gso_frames, c.dropped)
                packets, nbytes, gso, dropped = (a - b for a, b in zip(now, self._seen[k]))
                self._seen[k] = now
                stats["tx_packets"] += packets
                stats["tx_bytes"] += nbytes
                stats["tx_gso"] += gso
                drops += [c.drop_errno] * dropped
            now_loop = (L.busy_ns, L.c_notifies)
            busy, cn = (a - b for a, b in zip(now_loop, self._seen_loop))
            self._seen_loop = now_loop
            stats["tx_busy_ns"] += busy
            stats["tx_c_notifies"] += cn
        for err in drops:
            self.dev._count("tx_dropped", f"tap write: {os.strerror(err)}")
