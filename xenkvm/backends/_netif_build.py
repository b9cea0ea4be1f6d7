"""cffi API-mode build of Xen's network ring ABI (``io/netif.h`` + ``io/ring.h`` from libxen-dev).

The layouts (``netif_tx_sring``/``netif_rx_sring``, requests, responses,
``netif_extra_info``) are the compiler's.  Small C helpers do the index work
of the ring protocol with real barriers, so no Python touches ring bytes:

* ``xkn_tx_peek`` / ``xkn_rx_peek``: copy the requests between ``req_cons``
  and ``req_prod`` into a private array without consuming them (a packet
  whose slots are not all produced yet waits; what Python checks is the copy:
  no double fetch); -1 if the producer is more than a ring ahead;
* ``xkn_tx_push`` / ``xkn_rx_push``: write responses, publish ``rsp_prod`` and
  apply ``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``'s rule;
* ``xkn_tx_final_check`` / ``xkn_rx_final_check``: ``RING_FINAL_CHECK_FOR_REQUESTS``
  (set ``req_event``, full barrier, look again), so the frontend notifies on
  its next request (for rx that is ``feature-rx-notify``); ``xkn_tx_arm_after``
  asks for a notification after a given producer index (an incomplete packet).

Rings are one page each (netif has no multi-page rings): 256 entries.

``xkg_copy`` is the batched grant copy of gntcopy.py: for each (ref,
offset, length, host pointer) segment it does what ``GrantTable.copy_from``/``copy_to``
do for a v1 entry nobody holds (the claim of xk_grants.h, shared with the
block backend: check the entry, set GTF_reading/GTF_writing by compare-and-swap,
find the granted frame in guest RAM; then copy and clear the bits), all in one
call without the domain lock; a segment it cannot serve that way is left to the
Python path, which gives the exact error.
"""
from __future__ import annotations

from pathlib import Path

from cffi import FFI

GRANTS_H = Path(__file__).resolve().parent / "xk_grants.h"   #: the grant claims, shared with _blkif_build.py


def grants_cdef() -> str:
    """The cffi declarations of xk_grants.h (its ``cdef:`` comment)."""
    block = GRANTS_H.read_text().split(" * cdef:\n", 1)[1].split(" * end cdef", 1)[0]
    return "\n".join(line[3:] for line in block.splitlines()) + "\n"


CDEF = """
#define NETTXF_csum_blank ...
#define NETTXF_data_validated ...
#define NETTXF_more_data ...
#define NETTXF_extra_info ...
#define NETRXF_data_validated ...
#define NETRXF_csum_blank ...
#define NETRXF_more_data ...
#define NETRXF_extra_info ...
#define XEN_NETIF_EXTRA_TYPE_NONE ...
#define XEN_NETIF_EXTRA_TYPE_GSO ...
#define XEN_NETIF_EXTRA_TYPE_MAX ...
#define XEN_NETIF_EXTRA_FLAG_MORE ...
#define XEN_NETIF_GSO_TYPE_NONE ...
#define XEN_NETIF_GSO_TYPE_TCPV4 ...
#define XEN_NETIF_GSO_TYPE_TCPV6 ...
#define XEN_NETIF_NR_SLOTS_MIN ...
#define XEN_NETIF_MAX_TX_SIZE ...
#define NETIF_RSP_DROPPED ...
#define NETIF_RSP_ERROR ...
#define NETIF_RSP_OKAY ...
#define NETIF_RSP_NULL ...
#define XKN_RING_SIZE ...
typedef uint32_t grant_ref_t;
struct netif_tx_request { grant_ref_t gref; uint16_t offset; uint16_t flags; uint16_t id; uint16_t size; ...; };
struct netif_tx_response { uint16_t id; int16_t status; ...; };
struct netif_rx_request { uint16_t id; grant_ref_t gref; ...; };
struct netif_rx_response { uint16_t id; uint16_t offset; uint16_t flags; int16_t status; ...; };
struct xkn_gso { uint16_t size; uint8_t type; uint8_t pad; uint16_t features; };
struct netif_extra_info { uint8_t type; uint8_t flags; ...; };
typedef struct netif_tx_request netif_tx_request_t;
typedef struct netif_tx_response netif_tx_response_t;
typedef struct netif_rx_request netif_rx_request_t;
typedef struct netif_rx_response netif_rx_response_t;
typedef struct netif_extra_info netif_extra_info_t;
int xkn_tx_peek(char *page, uint32_t req_cons, netif_tx_request_t *out, int max);
uint32_t xkn_req_prod(char *page);
int xkn_tx_push(char *page, uint32_t *rsp_prod_pvt, const netif_tx_response_t *rsps, int n);
int xkn_tx_final_check(char *page, uint32_t req_cons);
int xkn_rx_peek(char *page, uint32_t req_cons, netif_rx_request_t *out, int max);
int xkn_rx_push(char *page, uint32_t *rsp_prod_pvt, const netif_rx_response_t *rsps, int n);
int xkn_rx_final_check(char *page, uint32_t req_cons);
int xkn_tx_arm_after(char *page, uint32_t seen_prod);
void xkn_extra_gso(netif_rx_response_t *slot, uint16_t size, uint8_t type);
int xkn_tx_gso(const netif_tx_request_t *slot, struct xkn_gso *out);
#define XKG_DONE ...
#define XKG_PYTHON ...
struct xkg_seg { uint32_t ref; uint16_t offset; uint16_t length; char *buf; int32_t status; };
int xkg_copy(const struct xk_grants *g, struct xkg_seg *segs, uint32_t nsegs, int to_guest);
#define XKN_VNET_HDR ...
#define XKN_RX_TAP_EMPTY ...
#define XKN_RX_RING_FULL ...
#define XKN_RX_NO_BUFFERS ...
#define XKN_RX_BAD_INDEX ...
#define XKN_RX_COPY_LEFT ...
#define XKN_RX_ERRNO ...
struct xkn_rx {
    char *page; netif_rx_request_t *reqs; netif_rx_response_t *rsps; struct xkg_seg *segs;
    char *buf; uint32_t buf_size; int32_t fd; uint32_t len; uint32_t cons;
    uint8_t sg; uint32_t nrsp; uint32_t at; uint32_t nsegs; uint8_t gso; int32_t err;
    uint64_t packets; uint64_t bytes; uint64_t gso_frames; uint64_t dropped;
    uint32_t drop_size; uint8_t drop_gso_type; ...; };
int xkn_rx_pass(struct xkn_rx *c, const struct xk_grants *g);
#define XKN_LOOP_STOP ...
#define XKN_LOOP_PASS ...
#define XKN_LOOP_NOTIFY ...
#define XKN_LOOP_ERROR ...
struct xkn_rx_loop {
    struct xkn_rx *c; const struct xk_grants *g; uint32_t *rsp_prod; int32_t wake_fd; uint32_t port;
    int32_t stop; int32_t code; int32_t notify_r; void *notify_fn; void *notify_ctx; int32_t err;
    int32_t wait_kick;
    uint64_t c_notifies; uint64_t wakeups; uint64_t busy_ns; uint64_t notified_ns; ...; };
int xkn_rx_loop(struct xkn_rx_loop *L);
struct netif_rx_sring { uint32_t req_prod; uint32_t req_event; uint32_t rsp_prod; uint32_t rsp_event; ...; };
union netif_rx_sring_entry { netif_rx_request_t req; netif_rx_response_t rsp; };
union netif_rx_sring_entry *xkn_rx_entry(char *page, uint32_t idx);
int xkn_tx_segs(const netif_tx_request_t *reqs, int first, int rest, int nrest, char *base, struct xkg_seg *segs);
int xkn_rx_segs(const netif_rx_request_t *reqs, int need, uint32_t size, uint16_t first_flags, uint8_t gso,
                uint16_t gso_size, char *data, netif_rx_response_t *rsps, struct xkg_seg *segs);
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define mb()  __sync_synchronize()
#define rmb() __asm__ __volatile__("" ::: "memory")   /* x86: loads are not reordered with loads */
#define wmb() __asm__ __volatile__("" ::: "memory")   /* x86: stores are not reordered with stores */
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/netif.h>

#define XKN_RING_SIZE 256
_Static_assert(__CONST_RING_SIZE(netif_tx, 4096) == XKN_RING_SIZE, "netif tx ring of one page");
_Static_assert(__CONST_RING_SIZE(netif_rx, 4096) == XKN_RING_SIZE, "netif rx ring of one page");
_Static_assert(sizeof(struct netif_extra_info) <= sizeof(struct netif_tx_request), "extra fits a tx slot");
_Static_assert(sizeof(struct netif_extra_info) == sizeof(struct netif_rx_response), "extra fits an rx slot");

struct xkn_gso { uint16_t size; uint8_t type; uint8_t pad; uint16_t features; };

#define XKN_RING_OPS(name)                                                                      \
int xkn_##name##_peek(char *page, uint32_t cons, netif_##name##_request_t *out, int max)        \
{                                                                                               \
    volatile struct netif_##name##_sring *s = (volatile struct netif_##name##_sring *)page;    \
    uint32_t prod = s->req_prod;                                                                \
    rmb();                                                                                      \
    if ((uint32_t)(prod - cons) > XKN_RING_SIZE)                                                \
        return -1;                                                                              \
    int n = 0;                                                                                  \
    for (; cons != prod && n < max; cons++, n++)                                                \
        memcpy(&out[n], (const void *)&s->ring[cons & (XKN_RING_SIZE - 1)].req, sizeof(out[n])); \
    return n;                                                                                   \
}                                                                                               \
int xkn_##name##_push(char *page, uint32_t *rsp_prod_pvt, const netif_##name##_response_t *rsps, int n) \
{                                                                                               \
    volatile struct netif_##name##_sring *s = (volatile struct netif_##name##_sring *)page;    \
    uint32_t prod = *rsp_prod_pvt;                                                              \
    for (int i = 0; i < n; i++, prod++)                                                         \
        memcpy((void *)&s->ring[prod & (XKN_RING_SIZE - 1)].rsp, &rsps[i], sizeof(rsps[i]));    \
    uint32_t old = s->rsp_prod;                                                                 \
    wmb();                                                                                      \
    s->rsp_prod = prod;                                                                         \
    mb();                                                                                       \
    *rsp_prod_pvt = prod;                                                                       \
    return (uint32_t)(prod - s->rsp_event) < (uint32_t)(prod - old);                            \
}                                                                                               \
int xkn_##name##_final_check(char *page, uint32_t cons)                                         \
{                                                                                               \
    volatile struct netif_##name##_sring *s = (volatile struct netif_##name##_sring *)page;    \
    if (s->req_prod != cons)                                                                    \
        return 1;                                                                               \
    s->req_event = cons + 1;                                                                    \
    mb();                                                                                       \
    return s->req_prod != cons;                                                                 \
}

uint32_t xkn_req_prod(char *page)
{
    return ((volatile struct netif_tx_sring *)page)->req_prod;   /* same header layout for rx */
}

XKN_RING_OPS(tx)
XKN_RING_OPS(rx)

/* Ask for a notification on the first request after `seen_prod` (a packet not complete yet, or a
 * producer index we refused): 1 if req_prod moved meanwhile. */
int xkn_tx_arm_after(char *page, uint32_t seen_prod)
{
    volatile struct netif_tx_sring *s = (volatile struct netif_tx_sring *)page;
    s->req_event = seen_prod + 1;
    mb();
    return s->req_prod != seen_prod;
}

/* An rx response slot that carries a GSO extra instead (netif.h: the extra overlays the response). */
void xkn_extra_gso(netif_rx_response_t *slot, uint16_t size, uint8_t type)
{
    struct netif_extra_info *e = (struct netif_extra_info *)slot;
    memset(e, 0, sizeof(*e));
    e->type = XEN_NETIF_EXTRA_TYPE_GSO;
    e->u.gso.size = size;
    e->u.gso.type = type;
}

/* A tx slot read as an extra: its type (out: the GSO fields), or -1 if its MORE flag is set. */
int xkn_tx_gso(const netif_tx_request_t *slot, struct xkn_gso *out)
{
    const struct netif_extra_info *e = (const struct netif_extra_info *)slot;
    memcpy(out, &e->u.gso, sizeof(*out));
    return (e->flags & XEN_NETIF_EXTRA_FLAG_MORE) ? -(int)e->type - 1 : e->type;
}

/* --- batched grant copy (gntcopy.py) ------------------------------------------------------- */
#include "xk_grants.h"
#define XKG_DONE 0
#define XKG_PYTHON 1            /* not served here: the Python path copies it or raises its error */
struct xkg_seg { uint32_t ref; uint16_t offset; uint16_t length; char *buf; int32_t status; };

/* Each segment: claim its entry (xk_grants.h: Xen's _set_status_v1 rules, not an entry someone
 * holds), check the bounds (offset + length within the page), copy, release.  A segment not served
 * so is left XKG_PYTHON; returns how many. */
int xkg_copy(const struct xk_grants *g, struct xkg_seg *segs, uint32_t nsegs, int to_guest)
{
    int left = 0;
    for (uint32_t i = 0; i < nsegs; i++) {
        struct xkg_seg *s = &segs[i];
        struct xk_gnt_claim c;
        char *page;
        s->status = XKG_PYTHON;
        if ((uint32_t)s->offset + s->length > XK_GNT_PAGE || !(page = xk_gnt_claim(g, s->ref, to_guest, &c))) {
            left++;
            continue;
        }
        if (to_guest)
            memcpy(page + s->offset, s->buf, s->length);
        else
            memcpy(s->buf, page + s->offset, s->length);
        xk_gnt_release(&c, 1);
        s->status = XKG_DONE;
    }
    return left;
}

/* The data slots of one tx packet as copy segments into `base`: slot `first`, then `nrest` slots
 * from `rest` (the extras sit between).  io/netif.h: fragment 1's size is the total packet size and
 * "the actual size of fragment 1 can only be determined by subtracting the sizes of fragments 2..N
 * from the total packet size"; a slot may not run past its page.  Returns the packet size; -1 if
 * the total is under an Ethernet header or fragments 2..N exceed it; -(2 + k) if slot k crosses
 * its page. */
int xkn_tx_segs(const netif_tx_request_t *reqs, int first, int rest, int nrest, char *base, struct xkg_seg *segs)
{
    uint32_t total = reqs[first].size, others = 0, pos = 0;
    for (int k = 0; k < nrest; k++)
        others += reqs[rest + k].size;
    if (total < 14 || others > total)
        return -1;
    for (int k = 0; k <= nrest; k++) {
        const netif_tx_request_t *q = &reqs[k == 0 ? first : rest + k - 1];
        uint32_t len = k == 0 ? total - others : q->size;
        if ((uint32_t)q->offset + len > 4096)
            return -(2 + k);
        segs[k].ref = q->gref;
        segs[k].offset = q->offset;
        segs[k].length = len;
        segs[k].buf = base + pos;
        pos += len;
    }
    return total;
}

/* One frame of `size` bytes at `data` into the `need` rx buffers peeked (reqs[0..need)), responses
 * from rsps[0]: a page per slot at offset 0, NETRXF_more_data on all but the last, `first_flags` on
 * the first; with a GSO type slot 1 is its extra (netif.h: the extra follows the first response).
 * Returns the number of copy segments written (the data slots, in order). */
int xkn_rx_segs(const netif_rx_request_t *reqs, int need, uint32_t size, uint16_t first_flags, uint8_t gso,
                uint16_t gso_size, char *data, netif_rx_response_t *rsps, struct xkg_seg *segs)
{
    uint32_t pos = 0;
    int n = 0;
    for (int s = 0; s < need; s++) {
        if (gso && s == 1) {
            xkn_extra_gso(&rsps[s], gso_size, gso);
            continue;
        }
        uint32_t len = size - pos < 4096 ? size - pos : 4096;
        rsps[s].id = reqs[s].id;
        rsps[s].offset = 0;
        rsps[s].status = len;
        rsps[s].flags = (s == 0 ? first_flags : 0) | (pos + len < size ? NETRXF_more_data : 0);
        segs[n].ref = reqs[s].gref;
        segs[n].offset = 0;
        segs[n].length = len;
        segs[n].buf = data + pos;
        n++;
        pos += len;
    }
    return n;
}

/* For tests, playing the frontend: entry `idx` of an rx ring page. */
union netif_rx_sring_entry *xkn_rx_entry(char *page, uint32_t idx)
{
    return &((struct netif_rx_sring *)page)->ring[idx & (XKN_RING_SIZE - 1)];
}

/* --- the rx path (net.py RxWorker): tap frames into the guest's posted buffers --------------- */
#include <errno.h>
#include <unistd.h>
#include <linux/virtio_net.h>
#define XKN_VNET_HDR ((int)sizeof(struct virtio_net_hdr))   /* TUNSETVNETHDRSZ left at its default */
#define XKN_RX_TAP_EMPTY 0      /* no frame to read: wait for the tap */
#define XKN_RX_RING_FULL 1      /* responses for a whole ring written: push, then go on */
#define XKN_RX_NO_BUFFERS 2     /* no posted buffers for the frame read; req_event armed: wait for a kick */
#define XKN_RX_BAD_INDEX 3      /* req_prod more than a ring ahead: wait for a sane one and a kick */
#define XKN_RX_COPY_LEFT 4      /* the last frame's copy left segments to Python (at, nsegs, gso) */
#define XKN_RX_ERRNO 5          /* reading the tap failed (err) */
_Static_assert(XKN_VNET_HDR == 10, "virtio_net_hdr without num_buffers");

struct xkn_rx {
    char *page;                    /* the rx shared ring */
    netif_rx_request_t *reqs;      /* peeked requests of one frame (XEN_NETIF_NR_SLOTS_MIN) */
    netif_rx_response_t *rsps;     /* responses of this pass (XKN_RING_SIZE), pushed by the caller */
    struct xkg_seg *segs;          /* copy segments of one frame (XEN_NETIF_NR_SLOTS_MIN) */
    char *buf;                     /* one frame: its virtio_net_hdr, then the data */
    uint32_t buf_size;
    int32_t fd;                    /* the tap queue, non-blocking */
    uint32_t len;                  /* a frame read and not delivered yet (no buffers): its length */
    uint32_t cons;                 /* rx req_cons */
    uint8_t sg;                    /* feature-sg: a frame may span slots */
    uint32_t nrsp;                 /* responses written so far this pass */
    uint32_t at, nsegs;            /* XKN_RX_COPY_LEFT: the frame's first response, its segments */
    uint8_t gso;                   /* XKN_RX_COPY_LEFT: whether slot 1 is its GSO extra */
    int32_t err;                   /* XKN_RX_ERRNO: errno */
    uint64_t packets, bytes, gso_frames, dropped;
    uint32_t drop_size;            /* the last frame dropped: its size and GSO type (for the log) */
    uint8_t drop_gso_type;
};

/* RxWorker's pass: read frames from the tap and copy each into the guest's posted rx buffers, a page
 * a slot (netif.h: NETRXF_more_data between them; without feature-sg a frame must fit one page; a
 * GSO frame's extra is slot 1), until the tap is empty, the buffers run out (req_event armed:
 * feature-rx-notify; the frame read waits in `len`) or a whole ring of responses is written.
 * Offloads come from the frame's virtio_net_hdr: NEEDS_CSUM -> NETRXF_csum_blank |
 * NETRXF_data_validated, DATA_VALID -> NETRXF_data_validated, TCPv4/v6 GSO -> a GSO extra; a frame
 * the frontend cannot take (too many slots, a GSO type netif has no name for) is dropped and
 * counted.  Each frame's segments are claimed and copied as xkg_copy does; one it leaves (an entry
 * someone holds, v2...) ends the pass with XKN_RX_COPY_LEFT so that Python copies it, or gives its
 * slot the error.  The caller pushes rsps[0..nrsp) and notifies. */
int xkn_rx_pass(struct xkn_rx *c, const struct xk_grants *g)
{
    while (c->nrsp + XEN_NETIF_NR_SLOTS_MIN + 1 <= XKN_RING_SIZE) {
        if (!c->len) {
            ssize_t n = read(c->fd, c->buf, c->buf_size);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return XKN_RX_TAP_EMPTY;
                if (errno == EINTR)
                    continue;
                c->err = errno;
                return XKN_RX_ERRNO;
            }
            if (n <= XKN_VNET_HDR)
                continue;
            c->len = (uint32_t)n;
        }
        const struct virtio_net_hdr *h = (const struct virtio_net_hdr *)c->buf;
        uint32_t size = c->len - XKN_VNET_HDR;
        uint8_t gso_type = h->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
        uint8_t gso = gso_type == VIRTIO_NET_HDR_GSO_TCPV4 ? XEN_NETIF_GSO_TYPE_TCPV4
                    : gso_type == VIRTIO_NET_HDR_GSO_TCPV6 ? XEN_NETIF_GSO_TYPE_TCPV6 : 0;
        uint32_t need = (size + 4095) / 4096 + (gso ? 1 : 0);
        if ((need > 1 && !c->sg) || need > XEN_NETIF_NR_SLOTS_MIN || (gso_type && !gso)) {
            c->len = 0;
            c->dropped++;
            c->drop_size = size;
            c->drop_gso_type = gso_type;
            continue;
        }
        int avail = xkn_rx_peek(c->page, c->cons, c->reqs, (int)need);
        if (avail < 0)
            return XKN_RX_BAD_INDEX;
        if ((uint32_t)avail < need) {
            if (!xkn_tx_arm_after(c->page, c->cons + (uint32_t)avail))   /* same header layout for rx */
                return XKN_RX_NO_BUFFERS;
            continue;
        }
        uint16_t first = (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) ? NETRXF_csum_blank | NETRXF_data_validated
                       : (h->flags & VIRTIO_NET_HDR_F_DATA_VALID) ? NETRXF_data_validated : 0;
        if (gso)
            first |= NETRXF_extra_info;
        int nsegs = xkn_rx_segs(c->reqs, (int)need, size, first, gso, h->gso_size, c->buf + XKN_VNET_HDR,
                                &c->rsps[c->nrsp], c->segs);
        int left = xkg_copy(g, c->segs, (uint32_t)nsegs, 1);
        c->at = c->nrsp;
        c->nsegs = (uint32_t)nsegs;
        c->gso = gso != 0;
        c->nrsp += need;
        c->cons += need;
        c->len = 0;
        c->packets++;
        c->bytes += size;
        c->gso_frames += gso != 0;
        if (left)
            return XKN_RX_COPY_LEFT;
    }
    return XKN_RX_RING_FULL;
}

/*
 * The rx thread's serve loop: its wake-ups without Python.  RxWorker calls xkn_rx_loop (cffi
 * releases the GIL); C sleeps on the queue's wake eventfd (its rx port is bound to it: the
 * frontend posted buffers) and, while the last pass ended on an empty tap, on the tap; each
 * wake-up makes passes (xkn_rx_pass) until the tap is empty or the buffers run out, pushes the
 * responses and notifies the rx port through notify_fn (C delivery) once per pass.  Python gets
 * the thread back only for what it must do itself, and calls again:
 *   XKN_LOOP_STOP    `stop` was set (the thread ends, or a snapshot parks it): every response
 *                    is pushed and notified (a notify owed to Python returns NOTIFY first); a
 *                    frame read with no buffer yet stays in `len`;
 *   XKN_LOOP_PASS    the pass ended with `code` XKN_RX_COPY_LEFT (nothing pushed yet: Python
 *                    finishes the frame's copy and calls again), XKN_RX_BAD_INDEX or XKN_RX_ERRNO
 *                    (the responses so far pushed; a notify they need is owed if notify_r != -2);
 *                    after BAD_INDEX the next call sleeps until a kick (`wait_kick`) before it
 *                    looks at the ring again, so a producer index far ahead costs one pass a kick;
 *   XKN_LOOP_NOTIFY  a notify is owed to Python: notify_fn declined or left part of it (notify_r,
 *                    -1 when there is no notify_fn);
 *   XKN_LOOP_ERROR   poll failed or an fd is gone (errno in `err`).
 * `stop` is written by another thread, then the wake eventfd: C reads it after every wake-up.
 */
#include <poll.h>
#include <time.h>
#define XKN_LOOP_STOP 0
#define XKN_LOOP_PASS 1
#define XKN_LOOP_NOTIFY 2
#define XKN_LOOP_ERROR 3

struct xkn_rx_loop {
    struct xkn_rx *c;              /* the pass's state (RxWorker's) */
    const struct xk_grants *g;     /* the grant claims' view of the table (synced by Python per call) */
    uint32_t *rsp_prod;            /* the queue's private rx rsp_prod */
    int32_t wake_fd;               /* the rx port's eventfd, also written to deliver `stop` */
    uint32_t port;                 /* the rx port notified */
    int32_t stop;                  /* set by Python: return XKN_LOOP_STOP at the next look */
    int32_t code;                  /* out: the last pass's XKN_RX_ code */
    int32_t notify_r;              /* out: -2 no notify owed; else what notify_fn answered (-1: none) */
    void *notify_fn;               /* int fn(void *ctx, uint32_t port): the notify in C, or NULL */
    void *notify_ctx;
    int32_t err;                   /* out: XKN_LOOP_ERROR's errno */
    int32_t wait_kick;             /* the ring was refused (BAD_INDEX): no pass before a kick */
    uint64_t c_notifies, wakeups;  /* statistics: notifies finished in C, wake-ups */
    uint64_t busy_ns;              /* this thread's CPU time in passes (CLOCK_THREAD_CPUTIME_ID) */
    uint64_t notified_ns;          /* CLOCK_MONOTONIC of the latest notify finished in C */
};

static uint64_t xkn_clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Push the pass's responses; 1 if a notify is owed to Python (notify_r says what C did). */
static int xkn_rx_flush(struct xkn_rx_loop *L)
{
    struct xkn_rx *c = L->c;
    L->notify_r = -2;
    if (!c->nrsp)
        return 0;
    int need = xkn_rx_push(c->page, L->rsp_prod, c->rsps, (int)c->nrsp);
    c->nrsp = 0;
    if (!need)
        return 0;
    if (L->notify_fn != NULL) {
        int r = ((int (*)(void *, uint32_t))L->notify_fn)(L->notify_ctx, L->port);
        if (r == 0) {
            L->c_notifies++;
            L->notified_ns = xkn_clock_ns(CLOCK_MONOTONIC);
            return 0;
        }
        L->notify_r = r;
    } else {
        L->notify_r = -1;
    }
    return 1;
}

/* Sleep until a kick (and, after an empty tap, a frame): 0, or XKN_LOOP_ERROR. */
static int xkn_rx_sleep(struct xkn_rx_loop *L, int code)
{
    struct pollfd p[2] = {{L->wake_fd, POLLIN, 0}, {L->c->fd, POLLIN, 0}};
    while (poll(p, code == XKN_RX_TAP_EMPTY ? 2 : 1, -1) < 0) {
        if (errno != EINTR) {
            L->err = errno;
            return XKN_LOOP_ERROR;
        }
    }
    if ((p[0].revents | p[1].revents) & POLLNVAL) {
        L->err = EBADF;
        return XKN_LOOP_ERROR;
    }
    if (p[0].revents) {
        uint64_t count;
        if (read(L->wake_fd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
            L->err = errno;
            return XKN_LOOP_ERROR;
        }
        L->wait_kick = 0;
    }
    L->wakeups++;
    return 0;
}

int xkn_rx_loop(struct xkn_rx_loop *L)
{
    struct xkn_rx *c = L->c;
    for (;;) {
        if (__atomic_load_n(&L->stop, __ATOMIC_ACQUIRE))    /* responses a COPY_LEFT return left go first */
            return c->nrsp && xkn_rx_flush(L) ? XKN_LOOP_NOTIFY : XKN_LOOP_STOP;
        if (L->wait_kick) {             /* the ring was refused: look again only after a kick */
            if (xkn_rx_sleep(L, XKN_RX_BAD_INDEX))
                return XKN_LOOP_ERROR;
            continue;
        }
        uint64_t t0 = xkn_clock_ns(CLOCK_THREAD_CPUTIME_ID);
        int code = L->code = xkn_rx_pass(c, L->g);
        if (code == XKN_RX_COPY_LEFT) {
            L->busy_ns += xkn_clock_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
            return XKN_LOOP_PASS;
        }
        int owed = xkn_rx_flush(L);
        L->busy_ns += xkn_clock_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
        if (code == XKN_RX_BAD_INDEX)
            L->wait_kick = 1;
        if (code == XKN_RX_BAD_INDEX || code == XKN_RX_ERRNO)
            return XKN_LOOP_PASS;
        if (owed)
            return XKN_LOOP_NOTIFY;
        if (code == XKN_RX_RING_FULL)
            continue;
        /* TAP_EMPTY: wait for a frame or a kick; NO_BUFFERS: for the frontend's kick alone */
        if (xkn_rx_sleep(L, code))
            return XKN_LOOP_ERROR;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(grants_cdef() + CDEF)
ffibuilder.set_source("xenkvm.backends._netif_cffi", SOURCE, include_dirs=[str(GRANTS_H.parent)],
                      extra_compile_args=["-Wall", "-O2"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
