"""cffi API-mode build of Xen's block ring ABI (``io/blkif.h`` + ``io/ring.h`` from libxen-dev).

The ring layout (``blkif_sring``, ``blkif_request``/``blkif_response``,
segments, indirect pages) is the compiler's.  Three small C helpers do the
index work the ring protocol defines, so no Python touches ring bytes one at a
time and the memory barriers the protocol asks for are real ones:

* ``xkb_take``: copy the requests between ``req_cons`` and ``req_prod`` into a
  private array (the guest cannot change a request after it was checked:
  no double fetch); refuses a producer more than a ring ahead;
* ``xkb_push``: write responses, publish ``rsp_prod`` and apply
  ``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``'s rule;
* ``xkb_final_check``: ``RING_FINAL_CHECK_FOR_REQUESTS`` (set ``req_event``,
  full barrier, look again) so the frontend keeps notifying;
* ``xkb_punch_hole``: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` for discards;
* ``xkb_serve``: reads and writes whose pages are persistent grants or, without
  persistent grants, v1 grant entries claimed for the request (``struct
  xk_grants``, xk_grants.h: the table's frames and guest RAM), checked and done with
  preadv/pwritev in C, without the GIL (everything else is left to block.py,
  which applies the same checks).

A ring may span up to 16 granted pages that are not contiguous in host
memory (``ring-page-order``): entries are addressed through a page table and
may straddle two pages.
"""
from __future__ import annotations

from pathlib import Path

from cffi import FFI

GRANTS_H = Path(__file__).resolve().parent / "xk_grants.h"   #: the grant claims, shared with _netif_build.py


def grants_cdef() -> str:
    """The cffi declarations of xk_grants.h (its ``cdef:`` comment)."""
    block = GRANTS_H.read_text().split(" * cdef:\n", 1)[1].split(" * end cdef", 1)[0]
    return "\n".join(line[3:] for line in block.splitlines()) + "\n"


CDEF = """
#define BLKIF_OP_READ ...
#define BLKIF_OP_WRITE ...
#define BLKIF_OP_WRITE_BARRIER ...
#define BLKIF_OP_FLUSH_DISKCACHE ...
#define BLKIF_OP_DISCARD ...
#define BLKIF_OP_INDIRECT ...
#define BLKIF_MAX_SEGMENTS_PER_REQUEST ...
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST ...
#define BLKIF_RSP_EOPNOTSUPP ...
#define BLKIF_RSP_ERROR ...
#define BLKIF_RSP_OKAY ...
#define BLKIF_DISCARD_SECURE ...
#define VDISK_CDROM ...
#define VDISK_REMOVABLE ...
#define VDISK_READONLY ...
#define XKB_MAX_RING_PAGES ...
typedef uint32_t grant_ref_t;
typedef uint64_t blkif_sector_t;
typedef uint16_t blkif_vdev_t;
struct blkif_request_segment { grant_ref_t gref; uint8_t first_sect; uint8_t last_sect; ...; };
struct blkif_request {
    uint8_t operation; uint8_t nr_segments; blkif_vdev_t handle; uint64_t id;
    blkif_sector_t sector_number; struct blkif_request_segment seg[11]; ...; };
struct blkif_request_discard {
    uint8_t operation; uint8_t flag; blkif_vdev_t handle; uint64_t id;
    blkif_sector_t sector_number; uint64_t nr_sectors; ...; };
struct blkif_request_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint64_t id;
    blkif_sector_t sector_number; blkif_vdev_t handle;
    grant_ref_t indirect_grefs[8]; ...; };
struct blkif_response { uint64_t id; uint8_t operation; int16_t status; ...; };
typedef struct blkif_request blkif_request_t;
typedef struct blkif_response blkif_response_t;
unsigned xkb_ring_size(unsigned pages);
int xkb_take(char **pages, unsigned nr_ents, uint32_t *req_cons, blkif_request_t *out, int max);
int xkb_push(char **pages, unsigned nr_ents, uint32_t *rsp_prod_pvt, const blkif_response_t *rsps, int n);
int xkb_final_check(char **pages, uint32_t req_cons);
int xkb_punch_hole(int fd, uint64_t offset, uint64_t length);
#define XKB_SLOW ...
#define XKB_TABLE_SIZE ...
#define XKB_MAX_INDIRECT ...
int xkb_serve(int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table, uint32_t table_size,
              struct xk_grants *gt, const blkif_request_t *reqs, blkif_response_t *rsps, int n, int *slow);
#define XKB_PASS_DONE ...
#define XKB_PASS_NOTIFY ...
#define XKB_PASS_SLOW ...
#define XKB_PASS_BROKEN ...
int xkb_pass(char **pages, unsigned nr_ents, uint32_t *req_cons, uint32_t *rsp_prod,
             int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table, uint32_t table_size,
             struct xk_grants *gt, blkif_request_t *reqs, blkif_response_t *rsps, int *slow, int *counts);
#define XKB_LOOP_MAX_QUEUES ...
#define XKB_RING_OFF ...
#define XKB_ENT ...
#define XKB_SRING_REQ_PROD ...
#define XKB_SRING_REQ_EVENT ...
#define XKB_SRING_RSP_PROD ...
#define XKB_SRING_RSP_EVENT ...
#define XKB_LOOP_EVENT ...
#define XKB_LOOP_NOTIFY ...
#define XKB_LOOP_SLOW ...
#define XKB_LOOP_BROKEN ...
#define XKB_LOOP_ERROR ...
struct xkb_queue {
    char **pages; uint32_t nr_ents; uint32_t *req_cons; uint32_t *rsp_prod;
    char **rw_table; char **ro_table; uint32_t table_size; struct xk_grants *gt;
    blkif_request_t *reqs; blkif_response_t *rsps; int *slow; int *counts;
    uint32_t port; uint8_t pending; uint8_t broken; ...;
};
struct xkb_loop {
    int kick_fd; int ctl_fd; int fd; int readonly; uint64_t nsectors;
    uint32_t nq; struct xkb_queue *q;
    uint32_t at; uint32_t nnotify; uint32_t notify[...]; int32_t notify_r[...];
    void *notify_fn; void *notify_ctx; uint64_t c_notifies;
    int err;
    uint64_t requests; uint64_t wakeups; uint64_t busy_ns; uint64_t wake_requests; uint64_t woke_ns;
    double batch_at; double other_below; double average; int32_t batch; uint32_t switches;
    uint32_t probe_every; uint32_t since_probe; uint32_t probes; ...;
};
int xkb_loop(struct xkb_loop *L);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>
#define mb()  __sync_synchronize()
#define rmb() __asm__ __volatile__("" ::: "memory")   /* x86: loads are not reordered with loads */
#define wmb() __asm__ __volatile__("" ::: "memory")   /* x86: stores are not reordered with stores */
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

#define XKB_MAX_RING_PAGES 16
#define XKB_PAGE 4096u
#define XKB_ENT (sizeof(union blkif_sring_entry))
#define XKB_RING_OFF (offsetof(struct blkif_sring, ring))
#define XKB_SRING_REQ_PROD (offsetof(struct blkif_sring, req_prod))     /* for tests that play the frontend */
#define XKB_SRING_REQ_EVENT (offsetof(struct blkif_sring, req_event))
#define XKB_SRING_RSP_PROD (offsetof(struct blkif_sring, rsp_prod))
#define XKB_SRING_RSP_EVENT (offsetof(struct blkif_sring, rsp_event))

_Static_assert(sizeof(struct blkif_request) == 112, "blkif_request (x86-64)");

unsigned xkb_ring_size(unsigned pages)
{
    return __CONST_RING_SIZE(blkif, XKB_PAGE * pages);
}

/* Copy `len` bytes at ring byte offset `off` (page table `pages`) to/from `buf`. */
static void xkb_io(char **pages, size_t off, void *buf, size_t len, int to_ring)
{
    char *b = buf;
    while (len) {
        size_t in = off % XKB_PAGE, n = XKB_PAGE - in;
        if (n > len)
            n = len;
        char *p = pages[off / XKB_PAGE] + in;
        if (to_ring)
            memcpy(p, b, n);
        else
            memcpy(b, p, n);
        off += n; b += n; len -= n;
    }
}

static size_t xkb_slot(unsigned nr_ents, uint32_t idx)
{
    return XKB_RING_OFF + (size_t)(idx & (nr_ents - 1)) * XKB_ENT;
}

int xkb_take(char **pages, unsigned nr_ents, uint32_t *req_cons, blkif_request_t *out, int max)
{
    volatile struct blkif_sring *s = (volatile struct blkif_sring *)pages[0];
    uint32_t prod = s->req_prod;
    rmb();  /* see the requests the producer index covers */
    uint32_t cons = *req_cons;
    if ((uint32_t)(prod - cons) > nr_ents)
        return -1;
    int n = 0;
    for (; cons != prod && n < max; cons++, n++)
        xkb_io(pages, xkb_slot(nr_ents, cons), &out[n], sizeof(blkif_request_t), 0);
    *req_cons = cons;
    return n;
}

int xkb_push(char **pages, unsigned nr_ents, uint32_t *rsp_prod_pvt, const blkif_response_t *rsps, int n)
{
    volatile struct blkif_sring *s = (volatile struct blkif_sring *)pages[0];
    uint32_t prod = *rsp_prod_pvt;
    for (int i = 0; i < n; i++, prod++)
        xkb_io(pages, xkb_slot(nr_ents, prod), (void *)&rsps[i], sizeof(blkif_response_t), 1);
    uint32_t old = s->rsp_prod;
    wmb();  /* front sees responses before the producer index */
    s->rsp_prod = prod;
    mb();   /* front sees the new index before we read rsp_event */
    *rsp_prod_pvt = prod;
    return (uint32_t)(prod - s->rsp_event) < (uint32_t)(prod - old);
}

int xkb_final_check(char **pages, uint32_t req_cons)
{
    volatile struct blkif_sring *s = (volatile struct blkif_sring *)pages[0];
    if (s->req_prod != req_cons)
        return 1;
    s->req_event = req_cons + 1;
    mb();
    return s->req_prod != req_cons;
}

#define XKB_SLOW 0x7fff          /* status: not served here, the caller serves it */
#define XKB_MAX_INDIRECT 256     /* feature-max-indirect-segments (Linux blkback's MAX_INDIRECT_SEGMENTS) */
#define XKB_TABLE_SIZE 65536     /* the largest gref -> page table (refs beyond: the slow path) */

#include "xk_grants.h"

/*
 * The fast path for READ/WRITE (direct or indirect) whose pages are all
 * persistently mapped (in `table`) or claimed here (`gt`, without persistent
 * grants: held for the preadv/pwritev only): each request is checked as
 * block.py checks it (1..11 segments, or 1..XKB_MAX_INDIRECT for indirect
 * ones; first_sect <= last_sect <= 7; inside the disk; no write to a
 * read-only disk: else BLKIF_RSP_ERROR), then one preadv/pwritev over the
 * pages.  Any other request, or one with a page (or indirect page) neither
 * in `table` nor claimable, gets XKB_SLOW and its index in `slow`.  Returns
 * how many are slow.  Called without the GIL.
 */
static int xkb_rw(int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table, uint32_t table_size,
                  const struct xk_grants *gt, uint8_t op, uint64_t sector,
                  const struct blkif_request_segment *segs, unsigned nseg)
{
    char **table = op == BLKIF_OP_READ ? rw_table : ro_table;   /* a disk read writes the page */
    struct iovec iov[XKB_MAX_INDIRECT];
    struct xk_gnt_claim claims[XKB_MAX_INDIRECT];
    unsigned nclaims = 0;
    uint64_t total = 0;
    if (readonly && op == BLKIF_OP_WRITE)
        return BLKIF_RSP_ERROR;
    for (unsigned j = 0; j < nseg; j++) {
        const struct blkif_request_segment *sg = &segs[j];
        if (sg->first_sect > sg->last_sect || sg->last_sect >= XKB_PAGE / 512)
            return BLKIF_RSP_ERROR;
        total += (sg->last_sect - sg->first_sect + 1u) * 512u;
    }
    if (sector > nsectors || total / 512 > nsectors - sector)
        return BLKIF_RSP_ERROR;
    for (unsigned j = 0; j < nseg; j++) {
        const struct blkif_request_segment *sg = &segs[j];
        char *page = sg->gref < table_size ? table[sg->gref] : NULL;
        if (!page && gt && (page = xk_gnt_claim(gt, sg->gref, op == BLKIF_OP_READ, &claims[nclaims])))
            nclaims++;
        if (!page) {
            xk_gnt_release(claims, nclaims);
            return XKB_SLOW;
        }
        iov[j].iov_base = page + sg->first_sect * 512u;
        iov[j].iov_len = (sg->last_sect - sg->first_sect + 1u) * 512u;
    }
    off_t off = (off_t)(sector * 512);
    ssize_t done = op == BLKIF_OP_WRITE ? pwritev(fd, iov, (int)nseg, off) : preadv(fd, iov, (int)nseg, off);
    xk_gnt_release(claims, nclaims);
    return done == (ssize_t)total ? BLKIF_RSP_OKAY : BLKIF_RSP_ERROR;
}

static int xkb_indirect(int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table,
                        uint32_t table_size, const struct xk_grants *gt, const blkif_request_t *q)
{
    const struct blkif_request_indirect *r = (const struct blkif_request_indirect *)q;
    static __thread struct blkif_request_segment segs[XKB_MAX_INDIRECT];
    unsigned nseg = r->nr_segments, per_page = XKB_PAGE / sizeof(struct blkif_request_segment);
    if ((r->indirect_op != BLKIF_OP_READ && r->indirect_op != BLKIF_OP_WRITE) || nseg < 1 || nseg > XKB_MAX_INDIRECT)
        return BLKIF_RSP_ERROR;
    for (unsigned p = 0; p * per_page < nseg; p++) {
        grant_ref_t g = r->indirect_grefs[p];
        struct xk_gnt_claim claim;
        char *page = g < table_size ? ro_table[g] : NULL;
        int claimed = !page && gt && (page = xk_gnt_claim(gt, g, 0, &claim)) != NULL;
        if (!page)
            return XKB_SLOW;
        unsigned count = nseg - p * per_page < per_page ? nseg - p * per_page : per_page;
        memcpy(&segs[p * per_page], page, count * sizeof(segs[0]));   /* a private copy: no double fetch */
        if (claimed)
            xk_gnt_release(&claim, 1);
    }
    return xkb_rw(fd, nsectors, readonly, rw_table, ro_table, table_size, gt, r->indirect_op, r->sector_number,
                  segs, nseg);
}

int xkb_serve(int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table, uint32_t table_size,
              struct xk_grants *gt, const blkif_request_t *reqs, blkif_response_t *rsps, int n, int *slow)
{
    int nslow = 0;
    for (int i = 0; i < n; i++) {
        const blkif_request_t *q = &reqs[i];
        blkif_response_t *p = &rsps[i];
        int status = XKB_SLOW;
        p->id = q->id;
        /* An indirect request is answered with its inner operation (Linux's blkback does; its
         * blkfront refuses anything else: "response has wrong operation"). */
        p->operation = q->operation == BLKIF_OP_INDIRECT
                       ? ((const struct blkif_request_indirect *)q)->indirect_op : q->operation;
        if (q->operation == BLKIF_OP_READ || q->operation == BLKIF_OP_WRITE)
            status = q->nr_segments < 1 || q->nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST ? BLKIF_RSP_ERROR
                     : xkb_rw(fd, nsectors, readonly, rw_table, ro_table, table_size, gt, q->operation,
                              q->sector_number, q->seg, q->nr_segments);
        else if (q->operation == BLKIF_OP_INDIRECT)
            status = xkb_indirect(fd, nsectors, readonly, rw_table, ro_table, table_size, gt, q);
        p->status = (int16_t)status;
        if (status == XKB_SLOW)
            slow[nslow++] = i;
    }
    return nslow;
}

/*
 * A worker's pass over one ring in one call (one GIL release, not four a batch): take, serve
 * (xkb_serve), push, again, until the ring is empty and re-armed (XKB_PASS_DONE), a push asks
 * for an event (XKB_PASS_NOTIFY: the caller notifies and calls again), or a batch holds
 * requests the fast path does not serve (XKB_PASS_SLOW: counts[1] taken, counts[2] of them
 * listed in `slow`, nothing of that batch pushed: the caller serves them and pushes it), or
 * req_prod is more than a ring ahead (XKB_PASS_BROKEN).  counts[0]: requests taken by this call.
 */
#define XKB_PASS_DONE 0
#define XKB_PASS_NOTIFY 1
#define XKB_PASS_SLOW 2
#define XKB_PASS_BROKEN 3
int xkb_pass(char **pages, unsigned nr_ents, uint32_t *req_cons, uint32_t *rsp_prod,
             int fd, uint64_t nsectors, int readonly, char **rw_table, char **ro_table, uint32_t table_size,
             struct xk_grants *gt, blkif_request_t *reqs, blkif_response_t *rsps, int *slow, int *counts)
{
    counts[0] = counts[1] = counts[2] = 0;
    for (;;) {
        int n = xkb_take(pages, nr_ents, req_cons, reqs, (int)nr_ents);
        if (n < 0)
            return XKB_PASS_BROKEN;
        if (n == 0) {
            if (!xkb_final_check(pages, *req_cons))
                return XKB_PASS_DONE;
            continue;
        }
        counts[0] += n;
        int nslow = xkb_serve(fd, nsectors, readonly, rw_table, ro_table, table_size, gt, reqs, rsps, n, slow);
        if (nslow) {
            counts[1] = n;
            counts[2] = nslow;
            return XKB_PASS_SLOW;
        }
        if (xkb_push(pages, nr_ents, rsp_prod, rsps, n))
            return XKB_PASS_NOTIFY;
    }
}

/*
 * The vbd worker's serve loop: its wake-ups without Python.  The worker thread calls xkb_loop
 * (cffi releases the GIL) and C sleeps on the kick eventfd the rings' ports are bound to, drains it,
 * makes one xkb_pass over every queue marked `pending`, and sleeps again; Python gets the thread
 * back only for what it must do itself, and calls again:
 *   XKB_LOOP_NOTIFY  ports in notify[0..nnotify) owed a notify by Python: notify_fn (C delivery)
 *                    declined them or left part of the work (notify_r), or there is none; a
 *                    queue's notify waits until it is empty and re-armed, or a ring's worth of
 *                    requests was served (then it stays pending: the next call passes it again),
 *                    so requests streaming in share one upcall;
 *   XKB_LOOP_SLOW    queue `at` holds a batch the fast path left (xkb_pass's XKB_PASS_SLOW);
 *   XKB_LOOP_BROKEN  queue `at`'s req_prod ran more than a ring ahead: it is not served again;
 *   XKB_LOOP_EVENT   ctl_fd (the worker's xenbus events: frontend state, unplug, park) is readable;
 *                    every queue was served to empty and re-armed first, so a parked worker has
 *                    answered everything it took;
 *   XKB_LOOP_ERROR   poll failed (errno in `err`).
 * On every return the ports in notify[] are owed a notify, whatever the code.  The worker's
 * scheduling policy is xenbus.PassPolicy's rule, kept here per wake-up (SCHED_BATCH while its
 * passes average `batch_at` requests or more, SCHED_OTHER again below `other_below`).
 */
#define XKB_LOOP_MAX_QUEUES 16
#define XKB_LOOP_EVENT 0
#define XKB_LOOP_NOTIFY 1
#define XKB_LOOP_SLOW 2
#define XKB_LOOP_BROKEN 3
#define XKB_LOOP_ERROR 4

struct xkb_queue {
    char **pages; uint32_t nr_ents; uint32_t *req_cons; uint32_t *rsp_prod;
    char **rw_table; char **ro_table; uint32_t table_size; struct xk_grants *gt;
    blkif_request_t *reqs; blkif_response_t *rsps; int *slow; int *counts;
    uint32_t port; uint8_t pending; uint8_t broken;
};

struct xkb_loop {
    int kick_fd;              /* the eventfd guest kicks write (KVM's ioeventfd or the C send path) */
    int ctl_fd;               /* the worker's events eventfd: readable = return to Python */
    int fd;                   /* the disk */
    int readonly;
    uint64_t nsectors;
    uint32_t nq;
    struct xkb_queue *q;
    uint32_t at;                             /* out: the queue of a SLOW or BROKEN return */
    uint32_t nnotify;                        /* out: ports owed a notify by Python */
    uint32_t notify[XKB_LOOP_MAX_QUEUES];
    int32_t notify_r[XKB_LOOP_MAX_QUEUES];   /* out: what notify_fn answered for each (-1: not called) */
    void *notify_fn;                         /* int fn(void *ctx, uint32_t port): the notify in C, or NULL */
    void *notify_ctx;                        /*   (xen/_fast_build.py xkd_notify: 0 done, else Python's part) */
    uint64_t c_notifies;                     /* notifies notify_fn finished (statistics) */
    int err;                                 /* out: poll's errno (XKB_LOOP_ERROR) */
    uint64_t requests, wakeups, busy_ns;     /* statistics: requests served, kick wake-ups, ns serving */
    uint64_t wake_requests;                  /* requests of the current wake-up (the policy's input) */
    uint64_t woke_ns;                        /* CLOCK_MONOTONIC of the latest kick wake-up */
    double batch_at, other_below, average;   /* the policy (PassPolicy's constants and EWMA) */
    int32_t batch;
    uint32_t switches;
    uint32_t probe_every;                    /* SCHED_OTHER wake-ups between two tries of SCHED_BATCH (0: none) */
    uint32_t since_probe, probes;
};

static uint64_t xkb_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

#include "xk_policy.h"
XK_POLICY_FNS(xkb, struct xkb_loop)     /* xkb_set_batch, xkb_policy */

/* Notify `port`: in C through notify_fn when there is one and it finishes it (0), else listed
   for Python with notify_fn's answer (or -1).  1 if Python is owed something. */
static int xkb_owe_notify(struct xkb_loop *L, uint32_t port)
{
    int r = -1;
    if (L->notify_fn != NULL) {
        r = ((int (*)(void *, uint32_t))L->notify_fn)(L->notify_ctx, port);
        if (r == 0) {
            L->c_notifies++;
            return 0;
        }
    }
    for (uint32_t i = 0; i < L->nnotify; i++)
        if (L->notify[i] == port)
            return 1;
    if (L->nnotify < XKB_LOOP_MAX_QUEUES) {
        L->notify_r[L->nnotify] = r;
        L->notify[L->nnotify++] = port;
    }
    return 1;
}

/* One pass over each pending queue: -1 when all are empty and re-armed, else an XKB_LOOP_ code. */
static int xkb_loop_pass(struct xkb_loop *L)
{
    uint64_t t0 = xkb_now_ns();
    int code = -1;
    for (uint32_t i = 0; i < L->nq && i < XKB_LOOP_MAX_QUEUES; i++) {
        struct xkb_queue *q = &L->q[i];
        if (!q->pending || q->broken)
            continue;
        int r, notify_owed = 0;
        uint32_t served = 0;
        for (;;) {      /* the notify waits until the queue is empty or a ring's worth was served */
            r = xkb_pass(q->pages, q->nr_ents, q->req_cons, q->rsp_prod, L->fd, L->nsectors, L->readonly,
                         q->rw_table, q->ro_table, q->table_size, q->gt, q->reqs, q->rsps, q->slow, q->counts);
            L->requests += (uint64_t)q->counts[0];
            L->wake_requests += (uint64_t)q->counts[0];
            served += (uint32_t)q->counts[0];
            if (r != XKB_PASS_NOTIFY)
                break;
            notify_owed = 1;
            if (served >= q->nr_ents)
                break;
        }
        if (notify_owed && xkb_owe_notify(L, q->port))      /* once the queue is empty: see above */
            code = XKB_LOOP_NOTIFY;
        if (r == XKB_PASS_DONE) {
            q->pending = 0;
        } else if (r != XKB_PASS_NOTIFY) {
            L->at = i;
            if (r == XKB_PASS_BROKEN) {
                q->broken = 1;
                q->pending = 0;
            }
            code = r == XKB_PASS_SLOW ? XKB_LOOP_SLOW : XKB_LOOP_BROKEN;
            break;
        }
    }
    L->busy_ns += xkb_now_ns() - t0;
    return code;
}

/* A queue stopped at a ring's worth with its notify done in C: it still has to be passed. */
static int xkb_any_pending(const struct xkb_loop *L)
{
    for (uint32_t i = 0; i < L->nq && i < XKB_LOOP_MAX_QUEUES; i++)
        if (L->q[i].pending && !L->q[i].broken)
            return 1;
    return 0;
}

int xkb_loop(struct xkb_loop *L)
{
    L->nnotify = 0;
    for (;;) {
        int code = xkb_loop_pass(L);
        if (code >= 0)
            return code;
        if (xkb_any_pending(L))
            continue;
        xkb_policy(L);
        struct pollfd p[2] = {{L->ctl_fd, POLLIN, 0}, {L->kick_fd, POLLIN, 0}};
        while (poll(p, 2, -1) < 0) {
            if (errno != EINTR) {
                L->err = errno;
                return XKB_LOOP_ERROR;
            }
        }
        if (p[0].revents)
            return XKB_LOOP_EVENT;
        if (p[1].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            L->err = EBADF;
            return XKB_LOOP_ERROR;
        }
        uint64_t count;
        if (read(L->kick_fd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
            L->err = errno;
            return XKB_LOOP_ERROR;
        }
        L->wakeups++;
        L->woke_ns = xkb_now_ns();
        for (uint32_t i = 0; i < L->nq && i < XKB_LOOP_MAX_QUEUES; i++)
            L->q[i].pending = 1;
    }
}

/* Discard: deallocate the range, the file keeps its size (reads return zeros). 0 or -errno. */
int xkb_punch_hole(int fd, uint64_t offset, uint64_t length)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) ? -errno : 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(grants_cdef() + CDEF)
ffibuilder.set_source("xenkvm.backends._blkif_cffi", SOURCE, include_dirs=[str(GRANTS_H.parent)],
                      extra_compile_args=["-Wall", "-O2"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
