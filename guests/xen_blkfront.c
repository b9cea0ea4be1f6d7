/*
 * xen_blkfront - a freestanding blkfront against xenkvm's block backend
 * (xenkvm/backends/block.py), through xenstore, grants and event channels.
 *
 * Default: finds its vbds under device/vbd, checks the backend's keys
 * (sectors, sector-size, info, mode, features), does the XenbusState
 * handshake (ring-ref, event-channel, protocol, Initialised -> Connected),
 * writes a pattern with multi-segment and partial-page requests batched in
 * one kick, reads it back, flushes, checks the last sector and one past it;
 * a read-only disk refuses writes; a discard reads back as zeros (and is not
 * offered on the read-only disk); then resets the frontend (Closing,
 * Closed, Initialising), reconnects with a two-page ring and reads the data
 * back with persistent grants (the page stays mapped).  Indirect requests
 * (16 segments) are written and read back.  Then two queues
 * (multi-queue-num-queues): a write on queue 1 is read back on queue 0.  The host checks the image file
 * afterwards.
 *
 * xk.blk_hostile: disk 0 is attacked (unknown op, zero and twelve segments,
 * first_sect > last_sect, last_sect 8, an ungranted ref, a read-only grant
 * for a read, sectors past the end, a flood of kicks, a garbage frontend
 * state, req_prod far ahead, then garbage ring-ref/event-channel keys at
 * reconnect); each request answers ERROR/EOPNOTSUPP and disk 1 keeps
 * returning correct data; disk 0 reconnects properly at the end.
 *
 * xk.blk_hotplug: one disk at boot; the host hot-plugs xvdb (pattern seed 2),
 * the guest connects and reads it, then the host unplugs it: Closing with
 * online = 0, the guest closes, both nodes disappear, xvda keeps working.
 *
 * xk.blk_snapshot: disk 0 on a two-page ring with persistent grants: a write, then a write
 * and a read pushed and notified but not waited for, and a snapshot asked for at once (port
 * XK_SNAPSHOT_PORT: `xenkvm run --snapshot-on-port`); "after snapshot" (in the original run and
 * in each restore) the two responses are collected, new writes (one, then a batch of eight)
 * go in and every range reads back (tests/backends/test_snapshot_backends.py).
 *
 * xk.blk_managed: disk 0 connected, then forever: a sector range written and read back, and
 * "BLK-TICK n ok" (or BAD) every ~20 ms (tests/toolstack/test_managed_snapshot.py saves and
 * restores it as a managed domain).
 *
 * xk.blk_durable: write 64 sectors at 4096 (seed 3), flush, print
 * BLK-FLUSHED, wait: the host kills the VMM and finds the data in the image.
 *
 * xk.blk_bench (benchmarks/bench_blkback.py): xk.blk_bench_reqs sequential
 * 4 KiB and 64 KiB (indirect) writes and reads, ring-full batches, with
 * persistent grants unless xk.blk_bench_nopersist; xk.blk_bench_batch=N submits N requests
 * per kick instead of a full ring (1: queue depth 1, one round trip per request).
 *
 * Pattern (the host test computes the same): byte i of 512-byte sector s is
 * (uint8_t)(s * 31 + i * 7 + seed), seed 1 on disk 0 and 2 on disk 1.
 */
#include "xen_blkfront.h"

/* ---- the well-behaved scenario ---------------------------------------------------- */
static void test_keys(struct vbd *d, bool ro)
{
    long ss = read_num(d->be, "sector-size"), info = read_num(d->be, "info");
    check(d->sectors >= 2048 && ss == 512, "blk.geometry", "%s sectors %lu sector-size %ld", d->be,
          (unsigned long)d->sectors, ss);
    check(info == (ro ? VDISK_READONLY : 0), "blk.info", "%s info %ld", d->be, info);
    check(read_num(d->be, "feature-flush-cache") == 1, "blk.feature_flush", "%s", d->be);
    check(read_num(d->be, "max-ring-page-order") >= 1, "blk.max_ring_page_order", "%s", d->be);
    check(xs_readf(d->fe, "device-type", &r) == 0 && !strcmp(r.body, "disk"), "blk.device_type", "%s", r.body);
    check(read_num(d->be, "state") == XenbusStateInitWait, "blk.initwait", "%s", d->be);
}

/* Write NDATA pages at sector 8 in two batched requests (11 + 1 segments), read them back. */
static void test_rw(struct vbd *d, unsigned seed, const char *tag)
{
    char name[64];
    for (unsigned i = 0; i < NDATA; i++) {
        fill(data[i], 8 + i * 8, 8, seed);
        grant(REF_DATA(i), data[i], true);
        memset(rdata[i], 0, XEN_PAGE);
        grant(REF_RDATA(i), rdata[i], false);
    }
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 8);
    for (unsigned i = 0; i < 11; i++)
        seg(q, REF_DATA(i), 0, 7);
    q = next_req(d, BLKIF_OP_WRITE, 8 + 11 * 8);
    seg(q, REF_DATA(11), 0, 7);
    int16_t st[4] = {9, 9, 9, 9};
    bool ok = submit(d, 2, st);
    snprintf(name, sizeof(name), "blk.%s.write_batch", tag);
    check(ok && st[0] == BLKIF_RSP_OKAY && st[1] == BLKIF_RSP_OKAY, name, "ok %d status %d %d", ok, st[0], st[1]);
    q = next_req(d, BLKIF_OP_READ, 8);
    for (unsigned i = 0; i < 11; i++)
        seg(q, REF_RDATA(i), 0, 7);
    q = next_req(d, BLKIF_OP_READ, 8 + 11 * 8);
    seg(q, REF_RDATA(11), 0, 7);
    ok = submit(d, 2, st);
    bool match = true;
    for (unsigned i = 0; i < NDATA; i++)
        match = match && same(rdata[i], 8 + i * 8, 8, seed);
    snprintf(name, sizeof(name), "blk.%s.read_back", tag);
    check(ok && st[0] == BLKIF_RSP_OKAY && st[1] == BLKIF_RSP_OKAY && match, name,
          "ok %d status %d %d match %d", ok, st[0], st[1], match);
}

static void test_partial_flush_edges(struct vbd *d)
{
    /* sectors 2..5 of a page go to disk sectors 200..203 */
    fill(data[0], 198, 8, 1);
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 200);
    seg(q, REF_DATA(0), 2, 5);
    check(one(d, q) == BLKIF_RSP_OKAY, "blk.partial_write", "status");
    memset(rdata[0], 0, XEN_PAGE);
    q = next_req(d, BLKIF_OP_READ, 200);
    seg(q, REF_RDATA(0), 3, 6);
    int16_t st = one(d, q);
    check(st == BLKIF_RSP_OKAY && same(rdata[0] + 3 * 512, 200, 4, 1), "blk.partial_read", "status %d", st);
    q = next_req(d, BLKIF_OP_FLUSH_DISKCACHE, 0);
    st = one(d, q);
    check(st == BLKIF_RSP_OKAY, "blk.flush", "status %d", st);
    fill(data[1], d->sectors - 1, 1, 1);
    q = next_req(d, BLKIF_OP_WRITE, d->sectors - 1);
    seg(q, REF_DATA(1), 0, 0);
    st = one(d, q);
    check(st == BLKIF_RSP_OKAY, "blk.last_sector", "status %d", st);
    q = next_req(d, BLKIF_OP_WRITE, d->sectors - 1);
    seg(q, REF_DATA(1), 0, 1);
    st = one(d, q);
    check(st == BLKIF_RSP_ERROR, "blk.past_the_end", "status %d", st);
    q = next_req(d, BLKIF_OP_WRITE_BARRIER, 210);
    fill(data[2], 210, 1, 1);
    seg(q, REF_DATA(2), 0, 0);
    st = one(d, q);
    check(st == BLKIF_RSP_OKAY, "blk.barrier", "status %d", st);
}

/* Write 16 sectors at 1024, discard the first 8: they read back as zeros, the rest is kept. */
static void test_discard(struct vbd *d, struct vbd *ro)
{
    check(read_num(d->be, "feature-discard") == 1 && read_num(d->be, "discard-granularity") >= 512,
          "blk.feature_discard", "%ld", read_num(d->be, "feature-discard"));
    check(read_num(ro->be, "feature-discard") == -1, "blk.ro.no_feature_discard", "advertised");
    fill(data[3], 1024, 8, 1);
    fill(data[4], 1032, 8, 1);
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 1024);
    seg(q, REF_DATA(3), 0, 7);
    seg(q, REF_DATA(4), 0, 7);
    int16_t st = one(d, q), st2 = discard(d, 1024, 8);
    memset(rdata[3], 0xee, XEN_PAGE);
    memset(rdata[4], 0xee, XEN_PAGE);
    q = next_req(d, BLKIF_OP_READ, 1024);
    seg(q, REF_RDATA(3), 0, 7);
    seg(q, REF_RDATA(4), 0, 7);
    int16_t st3 = one(d, q);
    bool zero = true;
    for (unsigned i = 0; i < XEN_PAGE; i++)
        zero = zero && rdata[3][i] == 0;
    check(st == BLKIF_RSP_OKAY && st2 == BLKIF_RSP_OKAY && st3 == BLKIF_RSP_OKAY && zero && same(rdata[4], 1032, 8, 1),
          "blk.discard", "status %d %d %d zero %d", st, st2, st3, zero);
    check(discard(d, d->sectors - 4, 8) == BLKIF_RSP_ERROR, "blk.discard_past_end", "accepted");
    check(discard(ro, 0, 8) == BLKIF_RSP_EOPNOTSUPP, "blk.ro.discard_refused", "accepted");
}

/* 16 segments (32 KiB) in one request, written and read back; malformed indirect requests refused. */
static void test_indirect(struct vbd *d)
{
    check(read_num(d->be, "feature-max-indirect-segments") >= 16, "blk.feature_indirect", "%ld",
          read_num(d->be, "feature-max-indirect-segments"));
    for (unsigned i = 0; i < 8; i++) {
        fill(data[i], 2048 + i * 8, 8, 1);
        memset(rdata[i], 0, XEN_PAGE);
    }
    int16_t w = indirect(d, BLKIF_OP_WRITE, 2048, 16, REF_DATA(0), REF_INDIRECT);
    int16_t rd = indirect(d, BLKIF_OP_READ, 2048, 16, REF_RDATA(0), REF_INDIRECT);
    bool match = true;
    for (unsigned i = 0; i < 8; i++)
        match = match && same(rdata[i], 2048 + i * 8, 8, 1);
    check(w == BLKIF_RSP_OKAY && rd == BLKIF_RSP_OKAY && match, "blk.indirect_rw", "status %d %d match %d", w, rd, match);
    check(indirect(d, BLKIF_OP_READ, 0, 0, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR, "blk.indirect_zero_segs", "accepted");
    check(indirect(d, BLKIF_OP_READ, 0, 300, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR, "blk.indirect_too_many", "accepted");
    check(indirect(d, BLKIF_OP_READ, 0, 16, REF_RDATA(0), REF_NONE) == BLKIF_RSP_ERROR, "blk.indirect_bad_page", "accepted");
    check(indirect(d, BLKIF_OP_FLUSH_DISKCACHE, 0, 16, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR,
          "blk.indirect_bad_op", "accepted");
    check(indirect(d, BLKIF_OP_READ, d->sectors - 8, 16, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR,
          "blk.indirect_past_end", "accepted");
}

static void test_readonly(struct vbd *d)
{
    fill(data[0], 0, 8, 2);
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 0);
    seg(q, REF_DATA(0), 0, 7);
    int16_t st = one(d, q);
    check(st == BLKIF_RSP_ERROR, "blk.ro.write_refused", "status %d", st);
    memset(rdata[0], 0xee, XEN_PAGE);
    q = next_req(d, BLKIF_OP_READ, 0);
    seg(q, REF_RDATA(0), 0, 7);
    st = one(d, q);
    check(st == BLKIF_RSP_OKAY && same(rdata[0], 0, 8, 2), "blk.ro.read", "status %d", st);
}

static void test_multiqueue(struct vbd *d)
{
    check(read_num(d->be, "multi-queue-max-queues") >= 2, "blk.feature_multiqueue", "%ld",
          read_num(d->be, "multi-queue-max-queues"));
    if (!check(reset(0) && connect_mq(0), "blk.multiqueue_connected", "%s", d->be))
        return;
    uint32_t events = xen_ports[d->qport[1]].count;
    use_queue(d, 1);
    fill(data[5], 3000, 8, 1);
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 3000);
    seg(q, REF_DATA(5), 0, 7);
    int16_t w = one(d, q);
    use_queue(d, 0);
    memset(rdata[5], 0, XEN_PAGE);
    q = next_req(d, BLKIF_OP_READ, 3000);
    seg(q, REF_RDATA(5), 0, 7);
    int16_t rd = one(d, q);
    check(w == BLKIF_RSP_OKAY && rd == BLKIF_RSP_OKAY && same(rdata[5], 3000, 8, 1), "blk.multiqueue_rw",
          "status %d %d", w, rd);
    check(xen_wait_port(d->qport[1], events + 1, SEC), "blk.multiqueue_second_port_notified", "no event on %u",
          d->qport[1]);
}

static void test_reconnect(struct vbd *d)
{
    check(!(gnt[REF_RDATA(0)].flags & (GTF_reading | GTF_writing)), "blk.grants_released", "flags %#x",
          gnt[REF_RDATA(0)].flags);
    check(reset(0), "blk.reset_handshake", "Closing/Closed/Initialising");
    connect_persistent = true;
    check(connect(0, 2, false), "blk.reconnect_two_page_ring", "%s", d->be);
    memset(rdata[0], 0, XEN_PAGE);
    blkif_request_t *q = next_req(d, BLKIF_OP_READ, 8);
    seg(q, REF_RDATA(0), 0, 7);
    int16_t st = one(d, q);
    check(st == BLKIF_RSP_OKAY && same(rdata[0], 8, 8, 1), "blk.read_after_reconnect", "status %d", st);
    /* feature-persistent, when the backend offers it: it keeps the page mapped (busy) after the
     * request; when it does not, the page was released with the response */
    if (read_num(d->be, "feature-persistent") == 1)
        check(gnt[REF_RDATA(0)].flags & GTF_writing, "blk.persistent_grant_kept", "flags %#x",
              gnt[REF_RDATA(0)].flags);
    else
        check(!(gnt[REF_RDATA(0)].flags & (GTF_reading | GTF_writing)), "blk.request_grant_released",
              "flags %#x", gnt[REF_RDATA(0)].flags);
    /* a full two-page ring's worth (64 requests) in one kick */
    for (unsigned i = 0; i < 64; i++) {
        q = next_req(d, BLKIF_OP_READ, 8 + (i % 8));
        seg(q, REF_RDATA(1 + i % 8), 0, 0);
    }
    int16_t sts[64];
    bool ok = submit(d, 64, sts);
    bool all = ok;
    for (unsigned i = 0; i < 64 && all; i++)
        all = sts[i] == BLKIF_RSP_OKAY;
    check(all && same(rdata[1], 8, 1, 1), "blk.full_multipage_ring", "ok %d", ok);
}

/* ---- the hostile scenario ------------------------------------------------------------ */
static int16_t bad(struct vbd *d, uint8_t op, uint8_t nseg, grant_ref_t ref, uint8_t first, uint8_t last,
                   uint64_t sector)
{
    blkif_request_t *q = next_req(d, op, sector);
    for (unsigned i = 0; i < nseg && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
        seg(q, ref, first, last);
    q->nr_segments = nseg;
    return one(d, q);
}

static const char *hname(const char *tag, const char *what)
{
    static char name[96];
    snprintf(name, sizeof(name), "hostile.%s%s", tag, what);
    return name;
}

/* Malformed requests, each answered on its own; `tag` names the pass (persistent grants or not). */
static void malformed(struct vbd *d, const char *tag)
{
    grant(REF_RO, rdata[1], true);
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 0, 7, 0) == BLKIF_RSP_OKAY, hname(tag, "good_first"), "failed");
    check(bad(d, 99, 1, REF_RDATA(0), 0, 7, 0) == BLKIF_RSP_EOPNOTSUPP, hname(tag, "unknown_op"), "failed");
    check(bad(d, BLKIF_OP_READ, 0, REF_RDATA(0), 0, 7, 0) == BLKIF_RSP_ERROR, hname(tag, "zero_segments"), "failed");
    check(bad(d, BLKIF_OP_READ, 12, REF_RDATA(0), 0, 0, 0) == BLKIF_RSP_ERROR, hname(tag, "twelve_segments"), "failed");
    check(bad(d, BLKIF_OP_READ, 255, REF_RDATA(0), 0, 0, 0) == BLKIF_RSP_ERROR, hname(tag, "255_segments"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 5, 3, 0) == BLKIF_RSP_ERROR, hname(tag, "first_after_last"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 0, 8, 0) == BLKIF_RSP_ERROR, hname(tag, "last_sect_8"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_NONE, 0, 7, 0) == BLKIF_RSP_ERROR, hname(tag, "ungranted_ref"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, 0xFFFFFFF0u, 0, 7, 0) == BLKIF_RSP_ERROR, hname(tag, "huge_ref"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_RO, 0, 7, 0) == BLKIF_RSP_ERROR, hname(tag, "read_into_ro_grant"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 0, 7, d->sectors) == BLKIF_RSP_ERROR, hname(tag, "past_end"), "failed");
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 0, 7, d->sectors - 7) == BLKIF_RSP_ERROR, hname(tag, "straddles_end"),
          "failed");
    check(bad(d, BLKIF_OP_WRITE, 1, REF_DATA(0), 0, 7, ~0ULL - 3) == BLKIF_RSP_ERROR, hname(tag, "sector_wraps"), "failed");
    grant(REF_DATA(0), data[0], false);
    check(bad(d, BLKIF_OP_WRITE, 1, REF_DATA(0), 0, 0, d->sectors) == BLKIF_RSP_ERROR, hname(tag, "write_past_end"),
          "failed");
    check(indirect(d, BLKIF_OP_READ, 0, 0, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR, hname(tag, "indirect_zero"),
          "failed");
    check(indirect(d, BLKIF_OP_READ, 0, 257, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR, hname(tag, "indirect_257"),
          "failed");
    check(indirect(d, BLKIF_OP_WRITE_BARRIER, 0, 2, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR,
          hname(tag, "indirect_bad_op"), "failed");
    corrupt_seg = 1;                    /* a bad segment inside the indirect page */
    check(indirect(d, BLKIF_OP_READ, 0, 2, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_ERROR, hname(tag, "indirect_bad_seg"),
          "failed");
    check(indirect(d, BLKIF_OP_READ, 8, 2, REF_RDATA(0), REF_INDIRECT) == BLKIF_RSP_OKAY, hname(tag, "indirect_good"),
          "failed");
    check(bad(d, BLKIF_OP_READ, 2, REF_RDATA(0), 0, 7, 0) == BLKIF_RSP_OKAY, hname(tag, "still_serving"), "failed");
}

static void hostile(struct vbd *d, struct vbd *good)
{
    malformed(d, "");
    for (unsigned i = 0; i < 2000; i++)
        xen_evtchn_send(d->port);
    pass("hostile.kick_flood_sent");
    set_state(d, 77);
    xs_writef(d->fe, "state", "%lx-banana", 0xb);
    xen_delay_ns(20 * MS);
    check(read_num(d->be, "state") == XenbusStateConnected, "hostile.garbage_state_ignored", "%ld",
          read_num(d->be, "state"));
    check(bad(d, BLKIF_OP_READ, 1, REF_RDATA(0), 0, 7, 8) == BLKIF_RSP_OKAY, "hostile.serving_after_garbage", "failed");
    /* req_prod a thousand requests ahead */
    d->ring.sring->req_prod = d->ring.rsp_cons + 1000;
    xen_mb();
    xen_evtchn_send(d->port);
    xen_delay_ns(50 * MS);
    check(d->ring.sring->rsp_prod == d->ring.rsp_cons, "hostile.far_ahead_not_served", "rsp_prod %u cons %u",
          d->ring.sring->rsp_prod, d->ring.rsp_cons);
    test_rw(good, 2, "good_disk_after_attack");
    /* a frontend that comes back with garbage keys, then with good ones */
    check(reset(0), "hostile.reset", "failed");
    check(connect(0, 1, true), "hostile.garbage_keys_refused", "backend Closing");
    check(xs_readf(d->be, "error", &r) == 0, "hostile.error_node", "no error node");
    set_state(d, XenbusStateClosed);
    check(wait_state(d, XenbusStateClosed), "hostile.closed_after_refusal", "failed");
    set_state(d, XenbusStateInitialising);
    check(wait_state(d, XenbusStateInitWait), "hostile.initwait_again", "failed");
    connect_persistent = true;
    check(connect(0, 1, false), "hostile.reconnect", "failed");
    test_rw(d, 1, "attacked_disk_after_reconnect");
    malformed(d, "persistent.");        /* the same through the C fast path: pages are kept now */
    check(gnt[REF_RDATA(0)].flags & GTF_writing, "hostile.persistent.kept", "flags %#x", gnt[REF_RDATA(0)].flags);
}

/* ---- hot-plug: the host attaches xvdb while we run, then unplugs it ------------------ */
static bool wait_value(const char *path, const char *want, uint64_t max_ns)
{
    uint64_t end = xen_system_time() + max_ns;
    while (xen_system_time() < end) {
        long rc = xs_read(0, path, &r);
        if (want ? (rc == 0 && !strcmp(r.body, want)) : rc != 0)
            return true;
        xen_delay_ns(2 * MS);
    }
    return false;
}

static void hotplug(void)
{
    xs_write(0, "data/blk-hotplug", "ready");
    uint64_t end = xen_system_time() + 60 * SEC;
    ndisks = 0;
    while (xen_system_time() < end && (!find_disks() || ndisks < 2)) {
        ndisks = 0;
        xen_delay_ns(2 * MS);
    }
    if (!check(ndisks == 2, "hotplug.appeared", "%u vbds", ndisks))
        return;
    test_keys(&disks[1], false);
    connect_persistent = true;
    check(connect(1, 1, false), "hotplug.connected", "%s", disks[1].be);
    memset(rdata[0], 0, XEN_PAGE);
    grant(REF_RDATA(0), rdata[0], false);
    blkif_request_t *q = next_req(&disks[1], BLKIF_OP_READ, 0);
    seg(q, REF_RDATA(0), 0, 7);
    int16_t st = one(&disks[1], q);
    check(st == BLKIF_RSP_OKAY && same(rdata[0], 0, 8, 2), "hotplug.read", "status %d", st);
    xs_write(0, "data/blk-hotplug", "connected");
    check(wait_state(&disks[1], XenbusStateClosing), "hotplug.unplug_requested", "no Closing");
    check(read_num(disks[1].be, "online") == 0, "hotplug.offline", "online %ld", read_num(disks[1].be, "online"));
    set_state(&disks[1], XenbusStateClosed);
    char path[128];
    snprintf(path, sizeof(path), "%s/state", disks[1].fe);
    check(wait_value(path, NULL, 20 * SEC), "hotplug.frontend_node_removed", "%s still there", disks[1].fe);
    snprintf(path, sizeof(path), "%s/state", disks[1].be);
    check(xs_read(0, path, &r) != 0, "hotplug.backend_node_removed", "%s still there", disks[1].be);
    uint16_t busy = (gnt[REF_RING(1, 0)].flags | gnt[REF_RDATA(0)].flags) & (GTF_reading | GTF_writing);
    check(!busy, "hotplug.grants_unmapped", "ring/persistent page flags %#x", busy);
    struct evtchn_status es = { .dom = DOMID_SELF, .port = disks[1].port };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_status, &es);
    check(rc == 0 && es.status == EVTCHNSTAT_unbound, "hotplug.evtchn_closed", "rc %ld status %u", rc, es.status);
    test_rw(&disks[0], 1, "xvda_after_unplug");
}

/* ---- benchmark: keep the ring full of sequential requests ------------------------------- */
#define REF_BENCH(i)    (80 + (i))

static unsigned cmdline_number(const char *key, unsigned dflt)
{
    char buf[16];
    unsigned n = 0;
    if (xk_cmdline_value(key, buf, sizeof(buf)))
        for (const char *c = buf; *c >= '0' && *c <= '9'; c++)
            n = n * 10 + (unsigned)(*c - '0');
    return n ? n : dflt;
}

static unsigned bench_reqs(void)
{
    return cmdline_number("xk.blk_bench_reqs", 4096);
}

/* `count` requests of `pages` pages (1: one segment; 16: indirect), ring-full batches, one kick each. */
static bool bench_run(struct vbd *d, uint8_t op, unsigned pages, unsigned count)
{
    unsigned nsect = pages * 8, batch = cmdline_number("xk.blk_bench_batch", RING_SIZE(&d->ring));
    if (batch > RING_SIZE(&d->ring))
        batch = RING_SIZE(&d->ring);
    uint64_t span = d->sectors - nsect, sector = 0;
    static int16_t st[64];
    printf("BENCH-START %s %u %u\n", op == BLKIF_OP_WRITE ? "write" : "read", pages * 4, count);
    for (unsigned done = 0; done < count;) {
        unsigned n = count - done < batch ? count - done : batch;
        for (unsigned i = 0; i < n; i++, sector = (sector + nsect) % span) {
            blkif_request_t *q = next_req(d, pages == 1 ? op : BLKIF_OP_INDIRECT, sector);
            if (pages == 1) {
                seg(q, REF_BENCH(0), 0, 7);
            } else {
                struct blkif_request_indirect *iq = (struct blkif_request_indirect *)q;
                iq->indirect_op = op;
                iq->nr_segments = (uint16_t)pages;
                iq->sector_number = sector;
                iq->indirect_grefs[0] = REF_INDIRECT;
            }
        }
        if (!submit(d, n, st))
            return false;
        for (unsigned i = 0; i < n; i++)
            if (st[i] != BLKIF_RSP_OKAY)
                return false;
        done += n;
    }
    printf("BENCH-END\n");
    return true;
}

static void bench(void)
{
    for (unsigned i = 0; i < 16; i++)
        grant(REF_BENCH(i), i < NDATA ? data[i] : rdata[i - NDATA], false);
    for (unsigned i = 0; i < 16; i++) {
        indirect_segs[i].gref = REF_BENCH(i);
        indirect_segs[i].first_sect = 0;
        indirect_segs[i].last_sect = 7;
    }
    grant(REF_INDIRECT, indirect_segs, true);
    connect_persistent = !xk_cmdline_has("xk.blk_bench_nopersist");
    if (!check(connect(0, 2, false), "bench.connected", "handshake failed"))
        return;
    unsigned n = bench_reqs();
    check(bench_run(&disks[0], BLKIF_OP_WRITE, 1, n), "bench.write_4k", "failed");
    check(bench_run(&disks[0], BLKIF_OP_READ, 1, n), "bench.read_4k", "failed");
    check(bench_run(&disks[0], BLKIF_OP_WRITE, 16, n), "bench.write_64k", "failed");
    check(bench_run(&disks[0], BLKIF_OP_READ, 16, n), "bench.read_64k", "failed");
}

/* ---- durability: write, flush, tell the host, then wait to be killed -------------------- */
static void durable(struct vbd *d)
{
    if (!check(connect(0, 1, false), "durable.connected", "handshake failed"))
        return;
    for (unsigned i = 0; i < 8; i++) {
        fill(data[i], 4096 + i * 8, 8, 3);
        grant(REF_DATA(i), data[i], true);
    }
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 4096);
    for (unsigned i = 0; i < 8; i++)
        seg(q, REF_DATA(i), 0, 7);
    int16_t w = one(d, q);
    q = next_req(d, BLKIF_OP_FLUSH_DISKCACHE, 0);
    int16_t f = one(d, q);
    if (check(w == BLKIF_RSP_OKAY && f == BLKIF_RSP_OKAY, "durable.written_and_flushed", "status %d %d", w, f))
        puts("BLK-FLUSHED");
    xen_delay_ns(120 * SEC);   /* the host kills us meanwhile */
}

/* ---- snapshot: requests in flight across a snapshot, then more I/O on the restored disk -- */
static void snapshot_run(struct vbd *d)
{
    connect_persistent = true;
    if (!check(connect(0, 2, false), "snap.connected", "two-page ring, persistent grants"))
        return;
    for (unsigned i = 0; i < 2; i++) {
        fill(data[i], 1024 + i * 8, 8, 5);
        grant(REF_DATA(i), data[i], true);
    }
    blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, 1024);
    seg(q, REF_DATA(0), 0, 7);
    seg(q, REF_DATA(1), 0, 7);
    int16_t st = one(d, q);
    check(st == BLKIF_RSP_OKAY, "snap.write_before", "status %d", st);
    /* in flight: a write (seed 6 at 2048) and a read of 1024, pushed and notified, not waited for */
    fill(data[2], 2048, 8, 6);
    grant(REF_DATA(2), data[2], true);
    q = next_req(d, BLKIF_OP_WRITE, 2048);
    seg(q, REF_DATA(2), 0, 7);
    memset(rdata[0], 0, XEN_PAGE);
    grant(REF_RDATA(0), rdata[0], false);
    q = next_req(d, BLKIF_OP_READ, 1024);
    seg(q, REF_RDATA(0), 0, 7);
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&d->ring, notify);
    if (notify)
        xen_evtchn_send(d->port);
    puts("before snapshot");
    outb(XK_SNAPSHOT_PORT, 1);
    puts("after snapshot");
    int16_t two[2] = {99, 99};
    bool got = submit(d, 2, two);      /* nothing new to push: collects the in-flight responses */
    check(got && two[0] == BLKIF_RSP_OKAY && two[1] == BLKIF_RSP_OKAY, "snap.inflight_answered",
          "got %d, status %d %d", got, two[0], two[1]);
    check(same(rdata[0], 1024, 8, 5), "snap.inflight_read_data", "wrong data");
    /* after the snapshot: a new write (seed 7 at 3072), then every range read back */
    fill(data[3], 3072, 8, 7);
    grant(REF_DATA(3), data[3], true);
    q = next_req(d, BLKIF_OP_WRITE, 3072);
    seg(q, REF_DATA(3), 0, 7);
    st = one(d, q);
    check(st == BLKIF_RSP_OKAY, "snap.write_after", "status %d", st);
    static const struct { uint64_t sector; unsigned seed; } back[] = {{1032, 5}, {2048, 6}, {3072, 7}};
    for (unsigned i = 0; i < 3; i++) {
        memset(rdata[1], 0, XEN_PAGE);
        grant(REF_RDATA(1), rdata[1], false);
        q = next_req(d, BLKIF_OP_READ, back[i].sector);
        seg(q, REF_RDATA(1), 0, 7);
        st = one(d, q);
        check(st == BLKIF_RSP_OKAY && same(rdata[1], back[i].sector, 8, back[i].seed), "snap.read_after",
              "sector %u: status %d", (unsigned)back[i].sector, st);
    }
    /* a batch of eight one-sector writes in one push (seed 8 at 4000..4007), read back as a page */
    fill(data[4], 4000, 8, 8);
    grant(REF_DATA(4), data[4], true);
    for (unsigned i = 0; i < 8; i++) {
        q = next_req(d, BLKIF_OP_WRITE, 4000 + i);
        seg(q, REF_DATA(4), (uint8_t)i, (uint8_t)i);
    }
    int16_t eight[8];
    got = submit(d, 8, eight);
    bool ok = got;
    for (unsigned i = 0; i < 8 && got; i++)
        ok = ok && eight[i] == BLKIF_RSP_OKAY;
    memset(rdata[2], 0, XEN_PAGE);
    grant(REF_RDATA(2), rdata[2], false);
    q = next_req(d, BLKIF_OP_READ, 4000);
    seg(q, REF_RDATA(2), 0, 7);
    st = one(d, q);
    check(ok && st == BLKIF_RSP_OKAY && same(rdata[2], 4000, 8, 8), "snap.batch_after", "status %d", st);
}

/* ---- managed: write and read back a sector range every ~20 ms, forever ------------------- */
static void managed_loop(struct vbd *d)
{
    connect_persistent = true;
    if (!check(connect(0, 1, false), "managed.connected", "handshake failed"))
        return;
    puts("BLK-UP");
    for (unsigned n = 0;; n++) {
        uint64_t sector = 16 + (n % 64) * 8;
        unsigned seed = n & 0xff;
        fill(data[0], sector, 8, seed);
        grant(REF_DATA(0), data[0], true);
        blkif_request_t *q = next_req(d, BLKIF_OP_WRITE, sector);
        seg(q, REF_DATA(0), 0, 7);
        int16_t w = one(d, q);
        memset(rdata[0], 0, XEN_PAGE);
        grant(REF_RDATA(0), rdata[0], false);
        q = next_req(d, BLKIF_OP_READ, sector);
        seg(q, REF_RDATA(0), 0, 7);
        int16_t rd = one(d, q);
        bool ok = w == BLKIF_RSP_OKAY && rd == BLKIF_RSP_OKAY && same(rdata[0], sector, 8, seed);
        printf("BLK-TICK %u %s\n", n, ok ? "ok" : "BAD");
        xen_delay_ns(20 * MS);
    }
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_blkfront guest");
    if (!xen_init())
        return 1;
    check(xen_map_shared_info() == 0, "shinfo.map", "failed");
    check(xen_setup_upcall(0, true) == 0, "blk.upcall", "failed");
    if (!check(xs_init() == 0, "xs.ring", "failed"))
        return 1;
    if (!check(xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN) == 0, "blk.grant_frame", "failed"))
        return 1;
    bool hostile_mode = xk_cmdline_has("xk.blk_hostile");
    if (xk_cmdline_has("xk.blk_durable")) {
        if (check(find_disks() && ndisks >= 1, "blk.found_vbd", "%u", ndisks))
            durable(&disks[0]);
        return 0;
    }
    if (xk_cmdline_has("xk.blk_managed")) {
        if (check(find_disks() && ndisks >= 1, "blk.found_vbd", "%u", ndisks))
            managed_loop(&disks[0]);
        return 0;
    }
    if (xk_cmdline_has("xk.blk_snapshot")) {
        if (check(find_disks() && ndisks >= 1, "blk.found_vbd", "%u", ndisks))
            snapshot_run(&disks[0]);
        return 0;
    }
    if (xk_cmdline_has("xk.blk_bench")) {
        if (check(find_disks() && ndisks >= 1, "blk.found_vbd", "%u", ndisks))
            bench();
        return 0;
    }
    if (xk_cmdline_has("xk.blk_hotplug")) {
        if (!check(find_disks() && ndisks == 1, "blk.found_one_vbd", "%u", ndisks))
            return 1;
        if (check(connect(0, 1, false), "blk.connected", "handshake failed"))
            hotplug();
        return 0;
    }
    if (!check(find_disks() && ndisks == 2, "blk.found_two_vbds", "%u", ndisks))
        return 1;
    test_keys(&disks[0], false);
    test_keys(&disks[1], !hostile_mode);
    if (!check(connect(0, 1, false) && connect(1, 1, false), "blk.connected", "handshake failed"))
        return 1;
    if (hostile_mode) {
        test_rw(&disks[0], 1, "attacked_disk");
        hostile(&disks[0], &disks[1]);
    } else {
        test_rw(&disks[0], 1, "xvda");
        test_partial_flush_edges(&disks[0]);
        test_readonly(&disks[1]);
        test_discard(&disks[0], &disks[1]);
        test_indirect(&disks[0]);
        test_reconnect(&disks[0]);
        test_multiqueue(&disks[0]);
    }
    check(xen_ports[disks[0].port].count > 0, "blk.notified", "no event on port %u", disks[0].port);
    return 0;
}
