"""The vbd worker's C serve loop (``xkb_loop``, xenkvm/backends/_blkif_build.py) on rings this test
plays the frontend of: what it serves, when it gives the thread back to Python and why.

The rings are plain host memory laid out by the compiler's offsets (``XKB_RING_OFF``,
``XKB_SRING_*``); the request pages are persistent grants (the C tables), the disk a temp
file.  No waits on time: a kick or an event is written before the call that must see it.
"""
from __future__ import annotations

import os
import threading

import pytest

from xenkvm.backends._blkif_cffi import ffi, lib

PAGE = 4096
SECTORS = 64


class Front:
    """One single-page ring and its request pages, as a frontend would fill them."""

    def __init__(self, port: int, npages: int = 4):
        self.port = port
        self.ring = ffi.new("char[]", PAGE)
        self.pages = ffi.new("char *[]", [self.ring])
        self.nr_ents = lib.xkb_ring_size(1)
        self.req_cons, self.rsp_prod = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self.reqs = ffi.new("blkif_request_t[]", self.nr_ents)
        self.rsps = ffi.new("blkif_response_t[]", self.nr_ents)
        self.slow, self.counts = ffi.new("int[]", self.nr_ents), ffi.new("int[3]")
        self.table = ffi.new("char *[]", 64)           # grefs 0..63: persistent pages
        self.bufs = [ffi.new("char[]", PAGE) for _ in range(npages)]
        for i, b in enumerate(self.bufs):
            self.table[10 + i] = b
        self.prod = 0
        self.word(lib.XKB_SRING_REQ_EVENT, 1)
        self.word(lib.XKB_SRING_RSP_EVENT, 1)

    def word(self, off: int, value: int | None = None) -> int:
        w = ffi.cast("uint32_t *", self.ring + off)
        if value is not None:
            w[0] = value
        return w[0]

    def read(self, sector: int, page: int, req_id: int) -> None:
        """Queue a one-page read of ``sector`` into request page ``page`` and publish it."""
        req = ffi.new("blkif_request_t *")
        req.operation, req.nr_segments, req.id, req.sector_number = lib.BLKIF_OP_READ, 1, req_id, sector
        req.seg[0].gref, req.seg[0].first_sect, req.seg[0].last_sect = 10 + page, 0, 7
        at = lib.XKB_RING_OFF + (self.prod % self.nr_ents) * lib.XKB_ENT
        ffi.memmove(self.ring + at, req, ffi.sizeof("blkif_request_t"))
        self.prod += 1
        self.word(lib.XKB_SRING_REQ_PROD, self.prod)

    def consumed(self) -> None:
        """The frontend took every response and wants an event for the next one."""
        self.word(lib.XKB_SRING_RSP_EVENT, self.word(lib.XKB_SRING_RSP_PROD) + 1)

    def response(self, i: int):
        at = lib.XKB_RING_OFF + (i % self.nr_ents) * lib.XKB_ENT
        return ffi.cast("blkif_response_t *", self.ring + at)

    def queue_into(self, q) -> None:
        q.pages, q.nr_ents, q.req_cons, q.rsp_prod = self.pages, self.nr_ents, self.req_cons, self.rsp_prod
        q.rw_table = q.ro_table = self.table
        q.table_size, q.gt = 64, ffi.NULL
        q.reqs, q.rsps, q.slow, q.counts, q.port = self.reqs, self.rsps, self.slow, self.counts, self.port


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s]) * 512 for s in range(SECTORS)))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


class Loop:
    """A ``struct xkb_loop`` over ``fronts``, with its own kick and control eventfds."""

    def __init__(self, disk: int, fronts: list[Front]):
        self.fronts = fronts
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.q = ffi.new("struct xkb_queue[]", len(fronts))
        for q, f in zip(self.q, fronts):
            f.queue_into(q)
        L = self.c = ffi.new("struct xkb_loop *")
        L.kick_fd, L.ctl_fd, L.fd, L.readonly, L.nsectors = self.kick, self.ctl, disk, 0, SECTORS
        L.nq, L.q = len(fronts), self.q
        L.batch_at, L.other_below, L.average = 1.25, 1.05, 1.0

    def run(self) -> int:
        return lib.xkb_loop(self.c)

    def notified(self) -> list[int]:
        return [self.c.notify[i] for i in range(self.c.nnotify)]

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.ctl)


@pytest.fixture
def make_loop(disk):
    made = []

    def make(fronts):
        loop = Loop(disk, fronts)
        made.append(loop)
        return loop
    yield make
    for loop in made:
        loop.close()
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))   # the loop's policy is its thread's


def test_pending_queues_are_served_and_the_notify_handed_back(make_loop):
    f = Front(port=7)
    loop = make_loop([f])
    for i in range(3):
        f.read(sector=8 * i, page=i, req_id=100 + i)
    loop.q[0].pending = 1
    assert loop.run() == lib.XKB_LOOP_NOTIFY
    assert loop.notified() == [7] and loop.c.requests == 3
    assert f.word(lib.XKB_SRING_RSP_PROD) == 3
    for i in range(3):
        r = f.response(i)
        assert (r.id, r.status, r.operation) == (100 + i, lib.BLKIF_RSP_OKAY, lib.BLKIF_OP_READ)
        assert ffi.buffer(f.bufs[i], PAGE)[:] == b"".join(bytes([8 * i + s]) * 512 for s in range(8))
    # the queue was emptied and re-armed before the notify went back: nothing owed, it sleeps
    assert loop.q[0].pending == 0 and f.word(lib.XKB_SRING_REQ_EVENT) == 4
    os.eventfd_write(loop.ctl, 1)
    assert loop.run() == lib.XKB_LOOP_EVENT and loop.notified() == [] and loop.c.requests == 3


def test_a_kick_wakes_it_and_an_event_outranks_a_kick(make_loop):
    f = Front(port=9)
    loop = make_loop([f])
    f.read(sector=1, page=0, req_id=5)
    os.eventfd_write(loop.kick, 1)
    assert loop.run() == lib.XKB_LOOP_NOTIFY and loop.c.wakeups == 1 and loop.c.requests == 1
    f.read(sector=2, page=1, req_id=6)
    os.eventfd_write(loop.kick, 1)
    os.eventfd_write(loop.ctl, 1)           # both readable: Python's event first, the kick stays
    assert loop.run() == lib.XKB_LOOP_EVENT and loop.c.requests == 1
    assert os.eventfd_read(loop.kick) == 1


def test_each_queue_owed_a_notify_is_named_once(make_loop):
    a, b, c = Front(port=3), Front(port=4), Front(port=5)
    loop = make_loop([a, b, c])
    a.read(0, 0, 1)
    a.read(8, 1, 2)
    c.read(16, 0, 3)
    os.eventfd_write(loop.kick, 1)
    assert loop.run() == lib.XKB_LOOP_NOTIFY
    assert loop.notified() == [3, 5] and loop.c.requests == 3      # b had nothing: no notify


def test_a_producer_more_than_a_ring_ahead_breaks_only_its_queue(make_loop):
    bad, good = Front(port=3), Front(port=4)
    loop = make_loop([bad, good])
    bad.word(lib.XKB_SRING_REQ_PROD, bad.nr_ents + 5)
    good.read(0, 0, 1)
    loop.q[0].pending = loop.q[1].pending = 1
    assert loop.run() == lib.XKB_LOOP_BROKEN and loop.c.at == 0 and loop.q[0].broken == 1
    assert loop.run() == lib.XKB_LOOP_NOTIFY and loop.notified() == [4]
    bad.word(lib.XKB_SRING_REQ_PROD, 1)     # a broken queue is not served again, pending or not
    loop.q[0].pending = loop.q[1].pending = 1
    os.eventfd_write(loop.ctl, 1)
    assert loop.run() == lib.XKB_LOOP_EVENT and bad.req_cons[0] == 0 and loop.c.requests == 1


def test_a_request_it_cannot_serve_goes_to_python_unpushed(make_loop):
    f = Front(port=3)
    loop = make_loop([f])
    f.read(0, 0, 1)
    f.table[10] = ffi.NULL          # its page is no persistent grant and C claims nothing here
    os.eventfd_write(loop.kick, 1)
    assert loop.run() == lib.XKB_LOOP_SLOW and loop.c.at == 0
    assert list(f.counts) == [1, 1, 1] and f.word(lib.XKB_SRING_RSP_PROD) == 0


def test_a_bad_kick_fd_is_an_error_not_a_spin(make_loop):
    loop = make_loop([Front(port=3)])
    r, w = os.pipe()
    os.close(r)
    loop.c.kick_fd = w              # POLLERR: the read end is gone
    try:
        assert loop.run() == lib.XKB_LOOP_ERROR and loop.c.err != 0
    finally:
        os.close(w)


def test_the_policy_follows_the_requests_each_wakeup_finds(make_loop):
    """PassPolicy's rule in C: SCHED_BATCH once wake-ups average 1.25 requests or more,
    SCHED_OTHER again below 1.05 (applied to the calling thread: run in a thread of its own)."""
    f = Front(port=3, npages=8)
    loop = make_loop([f])
    seen = []

    def worker():
        for _ in range(4):                  # 8 requests a wake-up
            for i in range(8):
                f.read(i, i, i)
            os.eventfd_write(loop.kick, 1)
            assert loop.run() == lib.XKB_LOOP_NOTIFY
            f.consumed()
        os.eventfd_write(loop.ctl, 1)
        loop.run()                          # the last wake-up's policy update, then the event
        seen.append((loop.c.batch, os.sched_getscheduler(0)))
        os.eventfd_read(loop.ctl)
        for _ in range(24):                 # then one a wake-up
            f.read(0, 0, 0)
            os.eventfd_write(loop.kick, 1)
            assert loop.run() == lib.XKB_LOOP_NOTIFY
            f.consumed()
        os.eventfd_write(loop.ctl, 1)
        loop.run()
        seen.append((loop.c.batch, os.sched_getscheduler(0)))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the loop slept with work queued"
    assert seen == [(1, os.SCHED_BATCH), (0, os.SCHED_OTHER)]
    assert loop.c.switches == 2


def test_notifies_go_to_the_c_delivery_function_and_only_its_leftovers_to_python(make_loop):
    """With ``notify_fn`` (xkd_notify in the VMM: xen/evtchn/cdeliver.py) a notify C finishes
    never returns to Python; what it leaves (its answer) comes back with the port."""
    answers, calls = [0], []

    @ffi.callback("int(void *, uint32_t)")
    def notify(ctx, port):
        calls.append((int(ffi.cast("uintptr_t", ctx)), port))
        return answers[0]

    f = Front(port=6)
    loop = make_loop([f])
    loop.c.notify_fn, loop.c.notify_ctx = ffi.cast("void *", notify), ffi.cast("void *", 0x1234)
    f.read(0, 0, 1)
    loop.q[0].pending = 1
    os.eventfd_write(loop.ctl, 1)
    assert loop.run() == lib.XKB_LOOP_EVENT                 # served, notified in C, asleep, the event
    assert calls == [(0x1234, 6)] and loop.c.c_notifies == 1 and loop.c.nnotify == 0
    os.eventfd_read(loop.ctl)
    f.consumed()
    answers[0] = 6                                          # C left something to Python
    f.read(8, 1, 2)
    os.eventfd_write(loop.kick, 1)
    assert loop.run() == lib.XKB_LOOP_NOTIFY
    assert loop.notified() == [6] and loop.c.notify_r[0] == 6 and loop.c.c_notifies == 1


def test_the_policy_probes_batch_and_keeps_it_only_for_a_deep_queue(make_loop):
    """A worker that finds one request a wake-up tries SCHED_BATCH every ``probe_every`` wake-ups
    (under SCHED_OTHER it would find one whatever the queue depth): one request a wake-up brings
    it back within a few; several a wake-up keep it."""
    f = Front(port=3, npages=8)
    loop = make_loop([f])
    loop.c.probe_every = 4
    trace = []

    def wake(n):
        for i in range(n):
            f.read(i, i, i)
        os.eventfd_write(loop.kick, 1)
        assert loop.run() == lib.XKB_LOOP_NOTIFY
        f.consumed()
        trace.append(loop.c.batch)

    def worker():
        for _ in range(12):
            wake(1)
        for _ in range(6):
            wake(6)
        trace.append(os.sched_getscheduler(0))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    # the policy runs when a wake-up's passes are done, i.e. at the next call: the flag seen after
    # call k is the decision taken after wake-up k-1
    single, deep, sched = trace[:12], trace[12:18], trace[18]
    assert 1 in single and single[-1] == 0 and loop.c.probes >= 1     # tried, and left again
    assert deep[-1] == 1 and sched == os.SCHED_BATCH                   # kept with a deep queue


def test_the_loops_counters_reach_the_stats_once_whichever_thread_folds_them(make_loop):
    """block.LoopCounters: the worker folds C's counters at each return of the loop, a reader
    (BlockDevice.sync_stats: benchmarks, cost lines) while it runs; each count arrives once."""
    from xenkvm.backends.block import LoopCounters
    f = Front(port=5)
    loop = make_loop([f])
    stats = {"requests": 0, "busy_ns": 0, "notifies": 0, "kicks": 0, "loop_kicks": 0}
    counters = LoopCounters(loop.c, stats)
    for i in range(3):
        f.read(sector=8 * i, page=i, req_id=i)
    loop.q[0].pending = 1
    assert loop.run() == lib.XKB_LOOP_NOTIFY
    folders = [threading.Thread(target=counters.fold) for _ in range(8)]
    for t in folders:
        t.start()
    for t in folders:
        t.join()
    counters.fold()
    assert stats["requests"] == 3 and stats["busy_ns"] == loop.c.busy_ns > 0
    f.consumed()
    f.read(sector=0, page=0, req_id=9)
    os.eventfd_write(loop.kick, 1)
    assert loop.run() == lib.XKB_LOOP_NOTIFY
    counters.fold()
    assert stats["requests"] == 4 and stats["kicks"] == stats["loop_kicks"] == loop.c.wakeups == 1
