"""The block backend (vbd): a raw file or block device served over a blkif ring.

Keys follow Linux's xen-blkback and xen-blkfront (io/blkif.h): the backend
publishes ``sectors`` (512-byte units), ``sector-size``,
``physical-sector-size``, ``info`` (VDISK_* flags), ``mode``, ``device-type``,
``feature-flush-cache``, ``feature-barrier``, ``feature-discard``,
``feature-persistent``, ``feature-max-indirect-segments``,
``max-ring-page-order`` and ``multi-queue-max-queues``; the frontend answers
with ``ring-ref`` (or ``ring-page-order`` + ``ring-refN``), ``event-channel``
and ``protocol``, per queue under ``queue-N/`` when it uses several
(blkring.py maps and binds them).

I/O runs on the device's worker thread (xenbus.py), batched per kick, a pass
in one C call (``xkb_pass``, without the GIL): every request between
``req_cons`` and ``req_prod`` is copied out of the ring at once (``xkb_take``);
reads and writes whose pages are persistent grants already mapped, or whose
grant entries C claims for the request (no ``feature-persistent``: grants.py),
are checked and served there (``xkb_serve``) and answered; the rest here, with
``os.preadv``/``os.pwritev`` straight into/out of the granted pages
(memoryviews of the GrantMapping: no copy, no per-byte Python).  The
responses go back in one push with ``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``'s
rule, then
``RING_FINAL_CHECK_FOR_REQUESTS`` before sleeping.

Everything in a request is hostile: "a request with a bad grant, a sector past
the end, an unknown op or a malformed segment" answers BLKIF_RSP_ERROR or
BLKIF_RSP_EOPNOTSUPP for that request and the ring keeps going; a producer
index more than a ring ahead of ours stops the ring (logged once) until the
frontend reconnects.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from xenkvm.diskspec import DiskSpec
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.xen.evtchn.cdeliver import PYTHON, notify
from xenkvm.xen.gnttab import GrantError

from ._blkif_cffi import ffi, lib
from .latency import CostWindow, EventLatency
from .blkring import MAX_QUEUES, MAX_RING_PAGE_ORDER, PAGE, SECTOR, BlkifRing, open_disk, open_rings
from .xenbus import WORKER_NICE_BOOST, XenbusDevice

log = logging.getLogger(__name__)

OKAY, ERROR, EOPNOTSUPP = lib.BLKIF_RSP_OKAY, lib.BLKIF_RSP_ERROR, lib.BLKIF_RSP_EOPNOTSUPP
OP_READ, OP_WRITE, OP_BARRIER, OP_FLUSH = (lib.BLKIF_OP_READ, lib.BLKIF_OP_WRITE,
                                           lib.BLKIF_OP_WRITE_BARRIER, lib.BLKIF_OP_FLUSH_DISKCACHE)
OP_DISCARD, OP_INDIRECT = lib.BLKIF_OP_DISCARD, lib.BLKIF_OP_INDIRECT
MAX_INDIRECT_SEGS = lib.XKB_MAX_INDIRECT   #: feature-max-indirect-segments (Linux blkback's 256)
SEGS_PER_INDIRECT_PAGE = PAGE // ffi.sizeof("struct blkif_request_segment")
MAX_SEGS = lib.BLKIF_MAX_SEGMENTS_PER_REQUEST
PENDING = -0x8000   #: _io's status for a request handed to a pipelined disk, answered in _complete
LATENCY_LOG_NS = 5_000_000_000   #: while busy, log the event-path latencies this often (at -v)


class BlockDevice(XenbusDevice):
    """A vbd: ``connect`` maps the ring, ``service`` serves it."""

    type = "vbd"
    worker_nice_boost = WORKER_NICE_BOOST     # preempts the kicking vCPU even after a long copy

    def __init__(self, spec: DiskSpec):
        super().__init__(spec.devid, spec.vdev)
        self.spec = spec
        self.disk = open_disk(spec)
        self._pending: list = []    #: responses of the requests a pipelined disk still has in flight
        self._rsp = None            #: the response of the request being served
        self.rings: list[BlkifRing] = []
        self.ring: BlkifRing | None = None      #: the ring being served (its grants serve the Python path)
        #: kicks: wake-ups that served the rings; loop_kicks: those of them in the C serve loop
        self.stats = {"requests": 0, "errors": 0, "kicks": 0, "loop_kicks": 0, "notifies": 0, "busy_ns": 0}
        self.latency = EventLatency()
        self._seen: dict[int, int] = {}     #: per ring port: the last kick stamp counted
        self.costs: CostWindow | None = None    #: the domain's hypercalls/upcalls per request (log lines)
        self._window = dict(self.stats)        #: stats at the last cost line
        self._latency_logged = 0     #: perf_counter_ns of the last latency log line (every LATENCY_LOG_NS)
        self._loop: CLoop | None = None     #: the C serve loop over the current rings (built on first use)
        #: without persistent grants, copy through one buffer instead of mapping each page
        #: (the alternative benchmarks/bench_blkback.py measures; mapping is the default, it is faster)
        self.grant_copy = False
        #: feature-persistent offered (the disk's ``persistent``; a restored ring that kept grants
        #: goes on keeping them whatever the spec says now)
        self.offer_persistent = spec.persistent
        self._buf = memoryview(bytearray(MAX_INDIRECT_SEGS * PAGE))
        self._ops = {OP_READ: self._read, OP_WRITE: self._write, OP_FLUSH: self._flush,
                     OP_BARRIER: self._barrier, OP_INDIRECT: self._indirect}
        if self.spec.discard and not self.spec.readonly:
            self._ops[OP_DISCARD] = self._discard

    # -- xenstore ----------------------------------------------------------------------
    def frontend_keys(self) -> dict[str, str]:
        return {"virtual-device": str(self.devid), "device-type": "cdrom" if self.spec.cdrom else "disk"}

    def backend_keys(self) -> dict[str, str]:
        d, s = self.disk, self.spec
        info = (lib.VDISK_READONLY if s.readonly else 0) | (lib.VDISK_CDROM if s.cdrom else 0)
        return {"dev": s.vdev, "type": "phy" if s.format == "raw" else "qdisk", "params": str(s.target),
                "mode": "r" if s.readonly else "w",
                "device-type": "cdrom" if s.cdrom else "disk", "removable": "0", "bootable": "1",
                "sectors": str(d.sectors), "sector-size": str(d.sector_size),
                "physical-sector-size": str(d.physical_sector_size), "info": str(info),
                "feature-flush-cache": "1", "feature-barrier": "1",
                "feature-persistent": "1" if self.offer_persistent else "0",
                "feature-max-indirect-segments": str(MAX_INDIRECT_SEGS),
                "max-ring-page-order": str(MAX_RING_PAGE_ORDER), "multi-queue-max-queues": str(MAX_QUEUES),
                **self._discard_keys()}

    def _discard_keys(self) -> dict[str, str]:
        """feature-discard with the granularity holes are punched in (blkif.h ``discard-*``)."""
        if OP_DISCARD not in self._ops:
            return {}
        return {"feature-discard": "1", "discard-granularity": str(self.disk.physical_sector_size),
                "discard-alignment": "0", "discard-secure": "0"}

    def connect(self, frontend: dict[str, str]) -> None:
        self.rings = open_rings(self.domain, frontend, self.backend.kick_fd, self.offer_persistent)
        self._seen = {r.port: self.domain.fast.last_send_ns(r.port) for r in self.rings}
        self.costs, self._window = CostWindow(self.domain), dict(self.stats)
        r = self.rings[0]
        log.info("%s: connected, %d queue(s) of %d-page rings (%d entries), port %d%s", self.backend.label,
                 len(self.rings), len(r.mappings), r.nr_ents, r.port,
                 ", persistent grants" if r.segments.persistent else "")

    def _stamp_kicks(self) -> None:
        """The latest kick of each queue, as the fast path stamped it, for the latencies."""
        fast = self.domain.fast
        for ring in self.rings:
            ns = fast.last_send_ns(ring.port)
            if ns != self._seen.get(ring.port):
                self._seen[ring.port] = ns
                self.latency.kicked(at=ns)

    def _log_latency(self) -> None:
        """The event-path latencies and how many requests a pass found (batching), at -v
        (not worked out otherwise: their quantiles cost a busy worker more than its notifies)."""
        if not log.isEnabledFor(logging.INFO):
            return
        st = self.stats
        log.info("%s: event latency: %s  requests/pass %.2f  kicks served in C %d of %d", self.backend.label,
                 self.latency.line(), st["requests"] / max(st["kicks"], 1), st["loop_kicks"], st["kicks"])
        if self.costs is not None:
            w, self._window = self._window, dict(st)
            log.info("%s: costs: %s", self.backend.label, self.costs.sample(
                st["requests"] - w["requests"], {k: st[k] - w[k] for k in ("kicks", "notifies")}))

    def disconnect(self) -> None:
        if self.latency.summary():
            self._log_latency()
        self._loop = None
        rings, self.rings, self.ring = self.rings, [], None
        for ring in rings:
            ring.close(self.domain)

    def close(self) -> None:
        self.disconnect()
        self.disk.close()

    # -- snapshots (backends/snapshot.py) --------------------------------------------------
    def event_ports(self) -> set[int]:
        return {r.port for r in self.rings}

    def save_state(self) -> dict:
        """Per queue the private ring indexes and the persistent grants kept mapped; the
        worker is parked between two passes, so every request taken is answered in the ring.

        An image served over NBD is flushed first: the daemon keeps format metadata (qcow2 L2
        and refcount tables) cached, and the snapshot hashes the image file next; unflushed, the
        image would change after the snapshot (when the daemon closes) and no restore would
        accept it.  The client is the worker's, but the worker is parked between two passes,
        with nothing in flight (``_complete`` ends each batch), so this thread may use it."""
        if self.disk.pipelined:
            try:
                self.disk.flush()
            except OSError as e:
                raise SnapshotError(f"{self.backend.label}: flushing the image before the snapshot: "
                                    f"{e.strerror}") from None
        return {"rings": [{"req_cons": r.req_cons[0], "rsp_prod": r.rsp_prod[0], "broken": r.broken,
                           "kept": [[g, m.writable] for g, m in r.segments.kept.items()]} for r in self.rings]}

    def restore_state(self, state: dict, frontend: dict[str, str] | None) -> None:
        """Map and bind the saved queues again (the grants' busy bits are in the restored RAM),
        put the indexes back and keep the same persistent grants mapped."""
        saved = state["rings"]
        if frontend is None:
            return
        self.offer_persistent = self.offer_persistent or any(st["kept"] for st in saved)
        self.connect(frontend)
        if len(saved) != len(self.rings):
            raise ValueError(f"{len(saved)} queues saved, the frontend keys give {len(self.rings)}")
        for ring, st in zip(self.rings, saved):
            ring.req_cons[0], ring.rsp_prod[0] = int(st["req_cons"]) & 0xFFFFFFFF, int(st["rsp_prod"]) & 0xFFFFFFFF
            ring.broken = bool(st["broken"])
            for gref, writable in st["kept"]:
                ring.segments.keep_again(int(gref), bool(writable))

    # -- the ring ------------------------------------------------------------------------------
    def service(self) -> None:
        """Serve every queue, one batch per pass, until each is empty and re-armed.

        Kicks of all queues are coalesced on the device's worker; an idle queue
        costs one look at its ``req_prod``.
        """
        self.stats["kicks"] += 1
        self._stamp_kicks()
        self.latency.serving()
        start = time.perf_counter_ns()
        served = self.stats["requests"]
        try:
            for ring in self.rings:
                if not ring.broken:
                    self.ring = ring
                    self._drain(ring)
        finally:
            self.backend.policy.after_pass(self.stats["requests"] - served)
            end = time.perf_counter_ns()
            self.stats["busy_ns"] += end - start
            if end - self._latency_logged > LATENCY_LOG_NS:
                self._latency_logged = end
                self._log_latency()

    def _drain(self, ring: BlkifRing) -> None:
        """Serve ``ring`` until it is empty and re-armed: in C (``xkb_pass``, one call a batch or
        more) but for the requests the fast path leaves to Python, and an image over NBD."""
        if self.disk.pipelined:
            return self._drain_pipelined(ring)
        d, g, counts = self.disk, ring.segments, ring.counts
        g.sync()
        claims = ffi.NULL if self.grant_copy else g.grants     # the grant-copy variant: every page copied
        while True:
            code = lib.xkb_pass(ring.pages, ring.nr_ents, ring.req_cons, ring.rsp_prod, d.fd, d.sectors,
                                self.spec.readonly, g.rw_table, g.ro_table, g.table_size, claims, ring.reqs,
                                ring.rsps, ring.slow, counts)
            self.stats["requests"] += counts[0]
            if code == lib.XKB_PASS_DONE:
                return
            if code == lib.XKB_PASS_BROKEN:
                return self._broken(ring)
            if code == lib.XKB_PASS_SLOW and not self._serve_slow(ring, counts):
                continue
            self._notify(ring)

    # -- the C serve loop (xkb_loop) ----------------------------------------------------------
    def serve_loop(self, ctl_fd: int) -> bool:
        """The worker sleeps and serves in C until it has an event (``ctl_fd`` readable); Python
        runs only for notifies, the requests C leaves (``_serve``) and a broken ring.  An image
        over NBD keeps the Python path (its requests stay in flight across passes)."""
        if not self.rings or self.disk.pipelined:
            return False
        if self._loop is None or self._loop.rings is not self.rings:
            self._loop = CLoop(self, ctl_fd)
        self._loop.run()
        return True

    def sync_stats(self) -> dict[str, int]:
        """``stats`` with the C serve loop's counters folded in: the loop folds them only when it
        returns to Python, which with notifies in C (2-level channels) is seldom."""
        loop = self._loop
        if loop is not None:
            loop.counters.fold()
        return self.stats

    def _serve_slow(self, ring: BlkifRing, counts) -> bool:
        """Serve the requests of a batch the C path left (``ring.slow``) and push the whole batch;
        True if the push asks for a notify."""
        self.ring = ring
        for k in range(counts[2]):
            i = ring.slow[k]
            self._serve(ring.reqs[i], ring.rsps[i])
        return bool(lib.xkb_push(ring.pages, ring.nr_ents, ring.rsp_prod, ring.rsps, counts[1]))

    def _drain_pipelined(self, ring: BlkifRing) -> None:
        """An image over NBD: every request through Python, reads and writes kept in flight."""
        while True:
            n = lib.xkb_take(ring.pages, ring.nr_ents, ring.req_cons, ring.reqs, ring.nr_ents)
            if n < 0:
                return self._broken(ring)
            if n == 0:
                if not lib.xkb_final_check(ring.pages, ring.req_cons[0]):
                    return
                continue
            ring.segments.hold = True
            for i in range(n):
                self._serve(ring.reqs[i], ring.rsps[i])
            self._complete(final=True)
            self.stats["requests"] += n
            if lib.xkb_push(ring.pages, ring.nr_ents, ring.rsp_prod, ring.rsps, n):
                self._notify(ring)

    def _broken(self, ring: BlkifRing) -> None:
        ring.broken = True
        log.warning("%s: req_prod is more than %d requests ahead of req_cons %d; ring stopped "
                    "until the frontend reconnects", self.backend.label, ring.nr_ents, ring.req_cons[0])

    def _notify(self, ring: BlkifRing) -> None:
        self._notify_port(ring.port)

    def _notify_port(self, port: int) -> None:
        t = time.perf_counter_ns()
        self.stats["notifies"] += 1
        notify(self.domain, port)
        self.latency.notified(t)

    def _serve(self, req, rsp) -> None:
        rsp.id = req.id
        rsp.operation = req.operation    # an indirect request's inner op, as Linux's blkback answers
        if req.operation == OP_INDIRECT:
            rsp.operation = ffi.cast("struct blkif_request_indirect *", ffi.addressof(req)).indirect_op
        op = self._ops.get(req.operation)
        self._rsp = rsp
        status = EOPNOTSUPP if op is None else op(req)
        if status == PENDING:
            self._pending.append(rsp)
            return
        rsp.status = status
        if status != OKAY:
            self.stats["errors"] += 1

    def _read(self, req) -> int:
        return self._rw(req, False)

    def _write(self, req) -> int:
        return ERROR if self.spec.readonly else self._rw(req, True)

    def _complete(self, final: bool = False) -> None:
        """Wait for the pipelined disk's requests in flight and answer them; then unmap their pages
        (``final``: the batch is over, per-request pages are unmapped as each request ends again)."""
        statuses = self.disk.results() if self._pending else []
        for rsp, err in zip(self._pending, statuses):
            rsp.status = OKAY if err == 0 else ERROR
            if err:
                self.stats["errors"] += 1
        self._pending.clear()
        segments = self.ring.segments
        segments.hold = False
        segments.done()
        segments.hold = not final

    def _flush(self, req) -> int:
        """"Commit any uncommitted contents of the backing device's volatile write cache"."""
        if self._pending:
            self._complete()      # NBD may reorder what is in flight: the flush covers what completed
        try:
            self.disk.flush()
        except OSError as e:
            log.warning("%s: flush: %s", self.backend.label, e.strerror)
            return ERROR
        return OKAY

    def _barrier(self, req) -> int:
        """WRITE_BARRIER: earlier writes are on the medium before this one, and this one after."""
        if self.spec.readonly:
            return ERROR
        if req.nr_segments == 0:
            return self._flush(req)
        rsp = self._rsp
        if self._flush(req) != OKAY:
            return ERROR
        status = self._rw(req, True)
        if status == PENDING:
            self._pending.append(rsp)
            self._complete()
            status = rsp.status
        return self._flush(req) if status == OKAY else ERROR

    def _discard(self, req) -> int:
        """DISCARD of ``nr_sectors`` from ``sector_number``; "discard-secure" is 0, so the flag is ignored."""
        d = ffi.cast("struct blkif_request_discard *", ffi.addressof(req))
        first, count = d.sector_number, d.nr_sectors
        if first + count > self.disk.sectors:
            return ERROR
        if count == 0:
            return OKAY
        if self._pending:
            self._complete()
        try:
            self.disk.discard(first * SECTOR, count * SECTOR)
        except OSError as e:
            log.warning("%s: discard at %d: %s", self.backend.label, first, e.strerror)
            return ERROR
        return OKAY

    def _rw(self, req, write: bool) -> int:
        nseg = req.nr_segments
        if not 1 <= nseg <= MAX_SEGS:
            return ERROR
        segs = req.seg
        return self._io([(segs[j].gref, segs[j].first_sect, segs[j].last_sect) for j in range(nseg)],
                        req.sector_number, write)

    def _indirect(self, req) -> int:
        """BLKIF_OP_INDIRECT: the segments are in up to 8 granted pages, 512 to a page."""
        r = ffi.cast("struct blkif_request_indirect *", ffi.addressof(req))
        op, nseg = r.indirect_op, r.nr_segments
        if op not in (OP_READ, OP_WRITE) or not 1 <= nseg <= MAX_INDIRECT_SEGS:
            return ERROR
        if op == OP_WRITE and self.spec.readonly:
            return ERROR
        segs, mapper = [], self.ring.segments
        try:
            for page in range((nseg + SEGS_PER_INDIRECT_PAGE - 1) // SEGS_PER_INDIRECT_PAGE):
                count = min(nseg - page * SEGS_PER_INDIRECT_PAGE, SEGS_PER_INDIRECT_PAGE)
                # through the mapper: with persistent grants the page stays mapped for the C fast path
                raw = bytes(mapper.view(r.indirect_grefs[page], False)[:count * 8])
                mapper.done()
                arr = ffi.from_buffer("struct blkif_request_segment[]", raw)
                segs += [(arr[i].gref, arr[i].first_sect, arr[i].last_sect) for i in range(count)]
        except GrantError as e:
            log.debug("%s: indirect page: %s", self.backend.label, e)
            return ERROR
        return self._io(segs, r.sector_number, op == OP_WRITE)

    def _io(self, segs: list[tuple[int, int, int]], sector: int, write: bool) -> int:
        """Check the segments and the range, then one preadv/pwritev over the granted pages."""
        total = 0
        for _gref, first, last in segs:
            if first > last or last >= PAGE // SECTOR:
                return ERROR
            total += last - first + 1
        if sector + total > self.disk.sectors:
            return ERROR
        if self.grant_copy and not self.ring.segments.persistent and not self.disk.pipelined:
            return self._io_copy(segs, sector, total * SECTOR, write)
        mapper = self.ring.segments
        iov = []
        try:
            for gref, first, last in segs:
                iov.append(mapper.view(gref, not write)[first * SECTOR:(last + 1) * SECTOR])
            if self.disk.pipelined:
                self.disk.submit(write, iov, sector * SECTOR)    # the disk releases the views when done
                iov = []
                return PENDING
            fd, offset = self.disk.fd, sector * SECTOR
            done = os.pwritev(fd, iov, offset) if write else os.preadv(fd, iov, offset)
            return OKAY if done == total * SECTOR else ERROR
        except GrantError as e:
            log.debug("%s: %s", self.backend.label, e)
            return ERROR
        except OSError as e:
            log.warning("%s: %s at sector %d: %s", self.backend.label, "write" if write else "read", sector,
                        e.strerror)
            return ERROR
        finally:
            for v in iov:
                v.release()
            mapper.done()


    def _io_copy(self, segs: list[tuple[int, int, int]], sector: int, length: int, write: bool) -> int:
        """The grant-copy alternative (QEMU's xen-block way): one preallocated buffer, a copy per segment."""
        dom, buf, fd = self.domain, self._buf, self.disk.fd
        try:
            pos = 0
            if write:
                for gref, first, last in segs:
                    n = (last - first + 1) * SECTOR
                    buf[pos:pos + n] = dom.gnttab.copy_from(dom.domid, gref, first * SECTOR, n)
                    pos += n
                return OKAY if os.pwrite(fd, buf[:length], sector * SECTOR) == length else ERROR
            if os.preadv(fd, [buf[:length]], sector * SECTOR) != length:
                return ERROR
            for gref, first, last in segs:
                n = (last - first + 1) * SECTOR
                dom.gnttab.copy_to(dom.domid, gref, first * SECTOR, buf[pos:pos + n])
                pos += n
            return OKAY
        except GrantError as e:
            log.debug("%s: %s", self.backend.label, e)
            return ERROR
        except OSError as e:
            log.warning("%s: I/O at sector %d: %s", self.backend.label, sector, e.strerror)
            return ERROR


class LoopCounters:
    """A C serve loop's counters (``struct xkb_loop``: requests, wake-ups, busy ns, C notifies)
    folded into a device's ``stats``: by the worker at each return of the loop, and by any
    thread that reads the stats while the loop runs (``BlockDevice.sync_stats``).  C's counters
    only grow; what was taken is remembered, under a lock."""

    def __init__(self, loop, stats: dict[str, int]):
        self.c, self.stats = loop, stats
        self._seen = (0, 0, 0, 0)
        self._lock = threading.Lock()

    def fold(self) -> None:
        L, st = self.c, self.stats
        with self._lock:
            now = (L.requests, L.wakeups, L.busy_ns, L.c_notifies)
            requests, wakeups, busy, notifies = (a - b for a, b in zip(now, self._seen))
            self._seen = now
            st["requests"] += requests
            st["busy_ns"] += busy
            st["notifies"] += notifies
            st["kicks"] += wakeups
            st["loop_kicks"] += wakeups


class CLoop:
    """One ``struct xkb_loop`` over a device's rings (_blkif_build.py ``xkb_loop``) and the Python
    around its returns: notifies, the slow requests, a broken ring, statistics and the policy."""

    def __init__(self, dev: BlockDevice, ctl_fd: int):
        self.dev = dev
        self.rings = dev.rings
        n = len(self.rings)
        if n > lib.XKB_LOOP_MAX_QUEUES:
            raise ValueError(f"{n} queues: the C loop serves {lib.XKB_LOOP_MAX_QUEUES} at most")
        self.queues = ffi.new("struct xkb_queue[]", n)
        for q, ring in zip(self.queues, self.rings):
            g = ring.segments
            q.pages, q.nr_ents, q.req_cons, q.rsp_prod = ring.pages, ring.nr_ents, ring.req_cons, ring.rsp_prod
            q.rw_table, q.ro_table, q.table_size = g.rw_table, g.ro_table, g.table_size
            q.gt = ffi.NULL if dev.grant_copy else g.grants
            q.reqs, q.rsps, q.slow, q.counts = ring.reqs, ring.rsps, ring.slow, ring.counts
            q.port, q.broken = ring.port, ring.broken
        L = self.c = ffi.new("struct xkb_loop *")
        L.kick_fd, L.ctl_fd, L.fd = dev.backend.kick_fd, ctl_fd, dev.disk.fd
        L.readonly, L.nsectors = int(dev.spec.readonly), dev.disk.sectors
        L.nq, L.q = n, self.queues
        pol = dev.backend.policy
        L.batch_at, L.other_below, L.probe_every = pol.BATCH_AT, pol.OTHER_BELOW, pol.PROBE_EVERY
        cdeliver = getattr(dev.domain, "cdeliver", None)
        if cdeliver is not None:        # notifies in C (2-level channels: xen/evtchn/cdeliver.py)
            L.notify_fn, L.notify_ctx = cdeliver.for_c()
        self.counters = LoopCounters(L, dev.stats)
        self._stamped = 0           #: the wake-up count whose kicks the latencies have
        #: notify_to_service is sampled only where it is logged (-v): its stamps cost Python each return
        self.timed = log.isEnabledFor(logging.INFO)

    def run(self) -> None:
        """Serve until the worker has an event; every queue is empty and re-armed then."""
        L, dev, pol = self.c, self.dev, self.dev.backend.policy
        L.batch, L.average, L.switches = pol.batch, pol.average, pol.switches
        for q, ring in zip(self.queues, self.rings):
            q.pending = 1           # a pass over every queue first, as the worker's "kick" makes
            q.broken = ring.broken  # (a Python pass may have found it broken)
        try:
            while True:
                self._sync_grants()
                code = lib.xkb_loop(L)
                start = time.perf_counter_ns()
                self._account()
                for i in range(L.nnotify):
                    self._notify(L.notify[i], L.notify_r[i])
                if code == lib.XKB_LOOP_EVENT:
                    return
                if code == lib.XKB_LOOP_SLOW:
                    ring = dev.rings[L.at]
                    if dev._serve_slow(ring, ring.counts):
                        dev._notify(ring)
                elif code == lib.XKB_LOOP_BROKEN:
                    dev._broken(dev.rings[L.at])
                elif code == lib.XKB_LOOP_ERROR:
                    raise OSError(L.err, f"the serve loop's poll: {os.strerror(L.err)}")
                dev.stats["busy_ns"] += time.perf_counter_ns() - start    # Python's share of serving
        finally:
            pol.batch, pol.average, pol.switches = bool(L.batch), L.average, L.switches

    def _notify(self, port: int, answer: int) -> None:
        """What the loop left of a notify: all of it (no C delivery, or C declined), or the part
        C delivery leaves to Python (waking pollers, a refused MSI)."""
        if answer < 0 or answer & PYTHON:
            self.dev._notify_port(port)
        else:
            self.dev.domain.cdeliver.finish(port, answer)

    def _sync_grants(self) -> None:
        for ring in self.rings:
            ring.segments.sync()

    def _account(self) -> None:
        """The device's statistics and latency stamps, from the loop's counters."""
        L, dev = self.c, self.dev
        self.counters.fold()
        if L.wakeups != self._stamped:
            self._stamped = L.wakeups
            if self.timed:
                dev._stamp_kicks()
                dev.latency.serving(at=L.woke_ns)
        now = time.perf_counter_ns()
        if now - dev._latency_logged > LATENCY_LOG_NS:
            dev._latency_logged = now
            dev._log_latency()
