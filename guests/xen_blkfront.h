/*
 * xen_blkfront.h - the frontend half of guests/xen_blkfront.c: grants, the
 * xenstore handshake (one or two queues, one- or two-page rings), request
 * building and response collection on a blkif ring (io/blkif.h, io/ring.h).
 * Included once, by xen_blkfront.c; its scenarios are there.
 */
#ifndef XEN_BLKFRONT_H
#define XEN_BLKFRONT_H

#include "xen_front.h"

#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define NDATA       12
#define NDISK       2

static uint8_t ring_pages[NDISK][2][XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t data[NDATA][XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t rdata[NDATA][XEN_PAGE] XEN_PAGE_ALIGNED;
static struct blkif_request_segment indirect_segs[XEN_PAGE / sizeof(struct blkif_request_segment)] XEN_PAGE_ALIGNED;

struct vbd {
    char fe[64], be[96];
    unsigned id;
    uint64_t sectors;
    evtchn_port_t port;
    blkif_front_ring_t ring;
    unsigned ring_pages;
    grant_ref_t ring_ref[2];
    blkif_front_ring_t qring[2];    /* multi-queue: the queues; `ring`/`port` are the one in use */
    evtchn_port_t qport[2];
    unsigned cur;
};
static struct vbd disks[NDISK];
static unsigned ndisks;

/* Grant refs: 16 + 2 per ring, data pages from 32 (read-write), 64 (read-only). */
#define REF_RING(d, i)  (16 + (d) * 2 + (i))
#define REF_DATA(i)     (32 + (i))
#define REF_RDATA(i)    (48 + (i))
#define REF_RO          64
#define REF_INDIRECT    70
#define REF_NONE        500

static uint8_t pat(uint64_t sector, unsigned i, unsigned seed)
{
    return (uint8_t)(sector * 31 + i * 7 + seed);
}

static void fill(uint8_t *p, uint64_t sector, unsigned nsect, unsigned seed)
{
    for (unsigned s = 0; s < nsect; s++)
        for (unsigned i = 0; i < 512; i++)
            p[s * 512 + i] = pat(sector + s, i, seed);
}

static bool same(const uint8_t *p, uint64_t sector, unsigned nsect, unsigned seed)
{
    for (unsigned s = 0; s < nsect; s++)
        for (unsigned i = 0; i < 512; i++)
            if (p[s * 512 + i] != pat(sector + s, i, seed))
                return false;
    return true;
}

/* Poll the backend's state (bounded in pvclock time). */
static bool wait_state(struct vbd *d, long want)
{
    uint64_t end = xen_system_time() + 20 * SEC;
    long st = -1;
    while (xen_system_time() < end) {
        st = read_num(d->be, "state");
        if (st == want)
            return true;
        xen_delay_ns(MS);
    }
    printf("%s: backend state %ld, expected %ld\n", d->be, st, want);
    return false;
}

static void set_state(struct vbd *d, unsigned st)
{
    xs_writef(d->fe, "state", "%lu", st);
}

/* ---- handshake ------------------------------------------------------------- */
static bool find_disks(void)
{
    if (xs_directory(0, "device/vbd", &r))
        return false;
    char names[NDISK][16];
    for (uint32_t off = 0; off < r.len && ndisks < NDISK; ndisks++) {
        snprintf(names[ndisks], 16, "%s", r.body + off);
        off += (uint32_t)strlen(r.body + off) + 1;
    }
    for (unsigned i = 0; i < ndisks; i++) {
        struct vbd *d = &disks[i];
        snprintf(d->fe, sizeof(d->fe), "device/vbd/%s", names[i]);
        d->id = (unsigned)read_num(d->fe, "virtual-device");
        xs_readf(d->fe, "backend", &r);
        snprintf(d->be, sizeof(d->be), "%s", r.body);
        d->sectors = (uint64_t)read_num(d->be, "sectors");
    }
    /* xvda (51712) first */
    if (ndisks == 2 && disks[0].id > disks[1].id) {
        struct vbd t = disks[0];
        disks[0] = disks[1];
        disks[1] = t;
    }
    return ndisks > 0;
}

static bool connect_persistent;

static bool connect(unsigned idx, unsigned pages, bool garbage)
{
    struct vbd *d = &disks[idx];
    memset(ring_pages[idx], 0, sizeof(ring_pages[idx]));
    blkif_sring_t *s = (blkif_sring_t *)ring_pages[idx][0];
    SHARED_RING_INIT(s);
    FRONT_RING_INIT(&d->ring, s, XEN_PAGE * pages);
    d->ring_pages = pages;
    for (unsigned i = 0; i < pages; i++) {
        d->ring_ref[i] = REF_RING(idx, i);
        grant(d->ring_ref[i], ring_pages[idx][i], false);
    }
    if (!d->port && xen_evtchn_alloc_unbound(0, &d->port))
        return false;
    char path[128];
    snprintf(path, sizeof(path), "%s/ring-page-order", d->fe);
    xs_rm(0, path);
    if (garbage) {
        xs_writef(d->fe, "ring-ref", "%lx-not-a-number", 7);
        xs_writef(d->fe, "event-channel", "%lu", 4000);
    } else if (pages == 1) {
        xs_writef(d->fe, "ring-ref", "%lu", d->ring_ref[0]);
    } else {
        xs_writef(d->fe, "ring-page-order", "%lu", 1);
        xs_writef(d->fe, "ring-ref0", "%lu", d->ring_ref[0]);
        xs_writef(d->fe, "ring-ref1", "%lu", d->ring_ref[1]);
    }
    if (!garbage)
        xs_writef(d->fe, "event-channel", "%lu", d->port);
    xs_writef(d->fe, "feature-persistent", "%lu", connect_persistent);
    snprintf(path, sizeof(path), "%s/protocol", d->fe);
    xs_write(0, path, XEN_IO_PROTO_ABI_X86_64);
    set_state(d, XenbusStateInitialised);
    if (garbage)
        return wait_state(d, XenbusStateClosing);
    if (!wait_state(d, XenbusStateConnected))
        return false;
    set_state(d, XenbusStateConnected);
    return true;
}

static bool reset(unsigned idx)
{
    struct vbd *d = &disks[idx];
    set_state(d, XenbusStateClosing);
    bool ok = wait_state(d, XenbusStateClosing);
    set_state(d, XenbusStateClosed);
    ok = wait_state(d, XenbusStateClosed) && ok;
    set_state(d, XenbusStateInitialising);
    return wait_state(d, XenbusStateInitWait) && ok;
}

/* ---- requests ------------------------------------------------------------------ */
static blkif_request_t *next_req(struct vbd *d, uint8_t op, uint64_t sector)
{
    blkif_request_t *q = RING_GET_REQUEST(&d->ring, d->ring.req_prod_pvt);
    memset(q, 0, sizeof(*q));
    q->operation = op;
    q->id = d->ring.req_prod_pvt;
    q->sector_number = sector;
    q->handle = (blkif_vdev_t)d->id;
    d->ring.req_prod_pvt++;
    return q;
}

static void seg(blkif_request_t *q, grant_ref_t ref, uint8_t first, uint8_t last)
{
    q->seg[q->nr_segments].gref = ref;
    q->seg[q->nr_segments].first_sect = first;
    q->seg[q->nr_segments].last_sect = last;
    q->nr_segments++;
}

/* Publish, notify if the backend asked, and collect `n` responses' statuses in order. */
static bool submit(struct vbd *d, unsigned n, int16_t *status)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&d->ring, notify);
    if (notify)
        xen_evtchn_send(d->port);
    unsigned got = 0;
    uint64_t end = xen_system_time() + 10 * SEC;
    while (got < n && xen_system_time() < end) {
        while (RING_HAS_UNCONSUMED_RESPONSES(&d->ring) && got < n) {
            blkif_response_t *p = RING_GET_RESPONSE(&d->ring, d->ring.rsp_cons);
            status[got++] = p->status;
            d->ring.rsp_cons++;
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&d->ring, more);
        if (!more && got < n)
            xen_irq_window(2000);
    }
    return got == n;
}

static int16_t one(struct vbd *d, blkif_request_t *q)
{
    (void)q;
    int16_t st = 99;
    return submit(d, 1, &st) ? st : 99;
}

/* ---- more request kinds and queues ---------------------------------------------------- */
static int16_t discard(struct vbd *d, uint64_t sector, uint64_t count)
{
    blkif_request_t *q = next_req(d, BLKIF_OP_DISCARD, sector);
    struct blkif_request_discard *dq = (struct blkif_request_discard *)q;
    dq->nr_sectors = count;
    return one(d, q);
}

static int corrupt_seg = -1;    /* hostile: this segment of the next indirect list gets last_sect 9 */

/* An indirect request of `nseg` segments: half pages (sectors 0-3, 4-7) of pages[0..nseg/2). */
static int16_t indirect(struct vbd *d, uint8_t op, uint64_t sector, unsigned nseg, unsigned ref_base,
                        grant_ref_t indirect_ref)
{
    for (unsigned i = 0; i < nseg && i < 512; i++) {
        indirect_segs[i].gref = ref_base + i / 2;
        indirect_segs[i].first_sect = (i & 1) ? 4 : 0;
        indirect_segs[i].last_sect = (i & 1) ? 7 : 3;
    }
    if (corrupt_seg >= 0)
        indirect_segs[corrupt_seg].last_sect = 9;
    corrupt_seg = -1;
    grant(REF_INDIRECT, indirect_segs, true);
    blkif_request_t *q = next_req(d, BLKIF_OP_INDIRECT, 0);
    struct blkif_request_indirect *iq = (struct blkif_request_indirect *)q;
    iq->indirect_op = op;
    iq->nr_segments = (uint16_t)nseg;
    iq->sector_number = sector;
    iq->handle = (blkif_vdev_t)d->id;
    iq->indirect_grefs[0] = indirect_ref;
    int16_t st = one(d, q);
    /* The response names the inner operation, as Linux's blkback answers (pending_req->operation
     * is indirect_op) and as Linux's blkfront checks ("response has wrong operation"). */
    uint8_t rop = RING_GET_RESPONSE(&d->ring, d->ring.rsp_cons - 1)->operation;
    if (st != 99)
        check(rop == op, "blk.indirect_rsp_op", "response operation %u for indirect_op %u", rop, op);
    return st;
}

static void use_queue(struct vbd *d, unsigned q)
{
    d->qring[d->cur] = d->ring;
    d->qport[d->cur] = d->port;
    d->ring = d->qring[q];
    d->port = d->qport[q];
    d->cur = q;
}

/* Two queues (multi-queue-num-queues = 2): queue-N/ring-ref and queue-N/event-channel each. */
static bool connect_mq(unsigned idx)
{
    struct vbd *d = &disks[idx];
    char key[64];
    memset(ring_pages[idx], 0, sizeof(ring_pages[idx]));
    d->qport[0] = d->port;
    if (xen_evtchn_alloc_unbound(0, &d->qport[1]))
        return false;
    for (unsigned q = 0; q < 2; q++) {
        blkif_sring_t *s = (blkif_sring_t *)ring_pages[idx][q];
        SHARED_RING_INIT(s);
        FRONT_RING_INIT(&d->qring[q], s, XEN_PAGE);
        grant(REF_RING(idx, q), ring_pages[idx][q], false);
        snprintf(key, sizeof(key), "queue-%u/ring-ref", q);
        xs_writef(d->fe, key, "%lu", REF_RING(idx, q));
        snprintf(key, sizeof(key), "queue-%u/event-channel", q);
        xs_writef(d->fe, key, "%lu", d->qport[q]);
    }
    xs_writef(d->fe, "multi-queue-num-queues", "%lu", 2);
    d->ring = d->qring[0];
    d->port = d->qport[0];
    d->cur = 0;
    set_state(d, XenbusStateInitialised);
    if (!wait_state(d, XenbusStateConnected))
        return false;
    set_state(d, XenbusStateConnected);
    return true;
}

#endif /* XEN_BLKFRONT_H */
