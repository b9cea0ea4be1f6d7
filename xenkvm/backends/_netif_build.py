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
#define XKN_TX_IDLE ...
#define XKN_TX_AGAIN ...
#define XKN_TX_PYTHON ...
#define XKN_TX_BAD_INDEX ...
#define XKN_LOOP_EVENT ...
#define XKN_LOOP_REPORT ...
struct xkn_tx {
    char *page; netif_tx_request_t *reqs; netif_tx_response_t *rsps; uint32_t *rsp_prod;
    struct xkg_seg *segs; char *buf; int32_t fd; uint32_t port; uint32_t cons; uint32_t n; uint32_t at;
    uint32_t nrsp; uint8_t gso_ok; uint8_t pending; uint8_t wait_kick; int32_t drop_errno;
    uint64_t packets; uint64_t bytes; uint64_t gso_frames; uint64_t dropped; uint32_t held;
    uint64_t held_since; ...; };
int xkn_tx_pass(struct xkn_tx *c, const struct xk_grants *g);
struct xkn_tx_loop {
    struct xkn_tx *q; uint32_t nq; const struct xk_grants *g; int32_t kick_fd; int32_t ctl_fd;
    uint32_t at; int32_t code; int32_t notify_r; void *notify_fn; void *notify_ctx; int32_t err;
    uint64_t report_ns; uint64_t hold_ns; uint64_t c_notifies; uint64_t wakeups; uint64_t busy_ns;
    uint64_t notified_ns; uint64_t woke_ns; uint64_t publishes; uint64_t wake_requests;
    double batch_at; double other_below; double average; int32_t batch;
    uint32_t switches; uint32_t probe_every; uint32_t since_probe; uint32_t probes; ...; };
int xkn_tx_loop(struct xkn_tx_loop *L);
struct netif_rx_sring { uint32_t req_prod; uint32_t req_event; uint32_t rsp_prod; uint32_t rsp_event; ...; };
union netif_rx_sring_entry { netif_rx_request_t req; netif_rx_response_t rsp; };
union netif_rx_sring_entry *xkn_rx_entry(char *page, uint32_t idx);
struct netif_tx_sring { uint32_t req_prod; uint32_t req_event; uint32_t rsp_prod; uint32_t rsp_event; ...; };
union netif_tx_sring_entry { netif_tx_request_t req; netif_tx_response_t rsp; };
union netif_tx_sring_entry *xkn_tx_entry(char *page, uint32_t idx);
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

/* For tests, playing the frontend: entry `idx` of an rx or tx ring page. */
union netif_rx_sring_entry *xkn_rx_entry(char *page, uint32_t idx)
{
    return &((struct netif_rx_sring *)page)->ring[idx & (XKN_RING_SIZE - 1)];
}

union netif_tx_sring_entry *xkn_tx_entry(char *page, uint32_t idx)
{
    return &((struct netif_tx_sring *)page)->ring[idx & (XKN_RING_SIZE - 1)];
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

/* Notify `port` through notify_fn (C delivery, xen/_fast_build.py xkd_notify): 0 when C finished
 * it (counted, its time kept), else what is owed to Python: notify_fn's answer, or -1 without one. */
static int32_t xkn_notify(void *fn, void *ctx, uint32_t port, uint64_t *c_notifies, uint64_t *notified_ns)
{
    if (fn == NULL)
        return -1;
    int r = ((int (*)(void *, uint32_t))fn)(ctx, port);
    if (r == 0) {
        (*c_notifies)++;
        *notified_ns = xkn_clock_ns(CLOCK_MONOTONIC);
    }
    return r;
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
    L->notify_r = xkn_notify(L->notify_fn, L->notify_ctx, L->port, &L->c_notifies, &L->notified_ns);
    return L->notify_r != 0;
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

/* --- the tx path (net.py TxLoop): the guest's packets onto the tap, on the device's worker ----- */
#define XKN_TX_IDLE 0        /* the ring is empty, or waits for a packet's last slots: req_event armed */
#define XKN_TX_AGAIN 1       /* a batch consumed (rsps[0..nrsp) to push); the ring may hold more */
#define XKN_TX_PYTHON 2      /* the packet at reqs[at] is Python's: a check C leaves, or a copy left */
#define XKN_TX_BAD_INDEX 3   /* req_prod more than a ring ahead: nothing consumed, req_event armed */
#define XKN_LOOP_EVENT 4     /* the tx loop: the worker has an event (ctl_fd readable) */
#define XKN_LOOP_REPORT 5    /* the tx loop: report_ns has passed (statistics, cost lines) */

struct xkn_tx {
    char *page;                    /* the tx shared ring */
    netif_tx_request_t *reqs;      /* the batch peeked from `cons` (XKN_RING_SIZE) */
    netif_tx_response_t *rsps;     /* its responses, index for index (NetifRings' arrays) */
    uint32_t *rsp_prod;            /* the queue's private tx rsp_prod */
    struct xkg_seg *segs;          /* one packet's copy segments (XEN_NETIF_NR_SLOTS_MIN) */
    char *buf;                     /* one packet: its virtio_net_hdr, then up to 65535 bytes */
    int32_t fd;                    /* the tap queue */
    uint32_t port;                 /* the tx port notified */
    uint32_t cons;                 /* tx req_cons: reqs[0]'s index */
    uint32_t n, at;                /* requests in the batch; the next packet's first */
    uint32_t nrsp;                 /* AGAIN / IDLE: responses to push */
    uint8_t gso_ok;                /* 1 << XEN_NETIF_GSO_TYPE_* for each type negotiated */
    uint8_t pending, wait_kick;    /* the loop's: serve this wake-up; refused ring, wait for a kick */
    int32_t drop_errno;            /* the last tap write that failed */
    uint64_t packets, bytes, gso_frames, dropped;
    uint32_t held;                 /* the loop's: responses written to the ring, rsp_prod not moved yet */
    uint64_t held_since;           /* CLOCK_MONOTONIC of the oldest */
};

static uint16_t xkn_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

struct xkn_l4 { uint32_t start, hlen; uint8_t proto, ipv6; };

static int xkn_l4_at(const uint8_t *h, uint32_t len, uint32_t start, uint8_t proto, uint8_t ipv6, struct xkn_l4 *o)
{
    o->start = start;
    o->proto = proto;
    o->ipv6 = ipv6;
    if (proto == 17 && len >= start + 8) {
        o->hlen = 8;
        return 1;
    }
    if (proto == 6 && len >= start + 20) {
        o->hlen = (uint32_t)(h[start + 12] >> 4) * 4;
        return o->hlen >= 20;
    }
    return 0;
}

/* netpkt.find_l4: the TCP/UDP header of an Ethernet frame from its first `len` (<= 128) bytes, past
 * VLAN tags, IPv4 (not a fragment) or IPv6 and its hop-by-hop, routing and destination options
 * (what Linux netback's skb_checksum_setup reads); 0 if it is not there. */
static int xkn_find_l4(const uint8_t *h, uint32_t len, struct xkn_l4 *o)
{
    if (len < 14)
        return 0;
    uint32_t off = 14;
    uint16_t et = xkn_be16(h + 12);
    while ((et == 0x8100 || et == 0x88A8) && len >= off + 4) {
        et = xkn_be16(h + off + 2);
        off += 4;
    }
    if (et == 0x0800 && len >= off + 20) {
        uint8_t vihl = h[off];
        if (vihl >> 4 != 4 || (vihl & 15) < 5 || (xkn_be16(h + off + 6) & 0x3FFF))
            return 0;
        return xkn_l4_at(h, len, off + (uint32_t)(vihl & 15) * 4, h[off + 9], 0, o);
    }
    if (et == 0x86DD && len >= off + 40) {
        uint8_t nxt = h[off + 6];
        off += 40;
        while ((nxt == 0 || nxt == 43 || nxt == 60) && len >= off + 8) {
            nxt = h[off];
            off += ((uint32_t)h[off + 1] + 1) * 8;
        }
        return xkn_l4_at(h, len, off, nxt, 1, o);
    }
    return 0;
}

/* netpkt.tx_vnet_hdr: the tap's header for a packet of `total` bytes at buf + XKN_VNET_HDR; 0 if it
 * asks for an offload whose headers cannot be found (Python then drops it with the reason). */
static int xkn_tx_hdr(char *buf, uint32_t total, int csum_blank, uint8_t gso_type, uint16_t gso_size)
{
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)buf;
    struct xkn_l4 l4;
    memset(vh, 0, sizeof(*vh));
    if (!csum_blank && !gso_type)
        return 1;
    if (!xkn_find_l4((const uint8_t *)buf + XKN_VNET_HDR, total < 128 ? total : 128, &l4))
        return 0;
    if (gso_type) {
        if (l4.proto != 6 || gso_size == 0)
            return 0;
        vh->gso_type = l4.ipv6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4;
        vh->hdr_len = (uint16_t)(l4.start + l4.hlen);
        vh->gso_size = gso_size;
    }
    vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh->csum_start = (uint16_t)l4.start;
    vh->csum_offset = l4.proto == 6 ? 16 : 6;
    return 1;
}

/* The packet at reqs[at] (net.py _tx_packet's rules): its extras (a GSO one of a negotiated type;
 * others known to netif.h are skipped), its data slots (NETTXF_more_data), at most
 * XEN_NETIF_NR_SLOTS_MIN; sizes and pages checked (xkn_tx_segs), gathered by grant copy, its
 * virtio_net_hdr built, written to the tap (a failed write drops it, counted: the host side is
 * congested or down), its responses written (extras NETIF_RSP_NULL).  Returns the requests used; 0
 * if its slots are not all produced; -1 if it is Python's (any check failed, any copy left: Python
 * redoes it and answers with the exact reason). */
static int xkn_tx_packet(struct xkn_tx *c, const struct xk_grants *g)
{
    const netif_tx_request_t *r = c->reqs;
    uint32_t i = c->at, j = i + 1, rest, python = 0;
    uint8_t gso_type = 0;
    uint16_t gso_size = 0;
    int more = r[i].flags & NETTXF_extra_info;
    while (more) {
        if (j >= c->n)
            return 0;
        const struct netif_extra_info *e = (const struct netif_extra_info *)&r[j++];
        more = e->flags & XEN_NETIF_EXTRA_FLAG_MORE;
        if (e->type == XEN_NETIF_EXTRA_TYPE_GSO) {
            gso_type = e->u.gso.type;
            gso_size = e->u.gso.size;
            python |= gso_type >= 8 || !(c->gso_ok >> gso_type & 1);
        } else {
            python |= e->type == XEN_NETIF_EXTRA_TYPE_NONE || e->type >= XEN_NETIF_EXTRA_TYPE_MAX;
        }
    }
    rest = j;                         /* the extras are reqs[i+1 .. rest) */
    for (more = r[i].flags & NETTXF_more_data; more; j++) {
        if (j >= c->n)
            return 0;
        more = r[j].flags & NETTXF_more_data;
    }
    uint32_t nrest = j - rest;
    if (python || nrest + 1 > XEN_NETIF_NR_SLOTS_MIN)
        return -1;
    int total = xkn_tx_segs(r, (int)i, (int)rest, (int)nrest, c->buf + XKN_VNET_HDR, c->segs);
    if (total < 0 || xkg_copy(g, c->segs, nrest + 1, 0)
        || !xkn_tx_hdr(c->buf, (uint32_t)total, r[i].flags & NETTXF_csum_blank, gso_type, gso_size))
        return -1;
    ssize_t w;
    while ((w = write(c->fd, c->buf, (size_t)total + XKN_VNET_HDR)) < 0 && errno == EINTR)
        ;
    if (w < 0) {
        c->dropped++;
        c->drop_errno = errno;
    } else {
        c->packets++;
        c->bytes += (uint32_t)total;
        c->gso_frames += gso_type != 0;
    }
    for (uint32_t k = i; k < j; k++) {
        c->rsps[k].id = r[k].id;
        c->rsps[k].status = k > i && k < rest ? NETIF_RSP_NULL : NETIF_RSP_OKAY;
    }
    return (int)(j - i);
}

/* One batch of a queue (net.py _tx_queue's rules): peek every request from `cons` (unless a batch
 * Python interrupted is in progress), serve the complete packets, consume them (rsps[0..nrsp) to
 * push); the last packet not complete: req_event armed after what was seen. */
int xkn_tx_pass(struct xkn_tx *c, const struct xk_grants *g)
{
    c->nrsp = 0;
    if (!c->n) {
        int n = xkn_tx_peek(c->page, c->cons, c->reqs, XKN_RING_SIZE);
        if (n < 0) {
            xkn_tx_arm_after(c->page, c->cons);      /* any sane push from cons notifies */
            return XKN_TX_BAD_INDEX;
        }
        if (!n)
            return xkn_tx_final_check(c->page, c->cons) ? XKN_TX_AGAIN : XKN_TX_IDLE;
        c->n = (uint32_t)n;
        c->at = 0;
    }
    while (c->at < c->n) {
        int used = xkn_tx_packet(c, g);
        if (used < 0)
            return XKN_TX_PYTHON;
        if (!used)
            break;
        c->at += (uint32_t)used;
    }
    uint32_t seen = c->cons + c->n;
    c->nrsp = c->at;
    c->cons += c->at;
    c->n = c->at = 0;
    if (c->cons != seen && !xkn_tx_arm_after(c->page, seen))
        return XKN_TX_IDLE;       /* the frontend notifies when the last packet is complete */
    return XKN_TX_AGAIN;
}

/*
 * The vif's tx serve loop, on the device's xenbus worker (as the vbd's xkb_loop): it sleeps on the
 * worker's kick eventfd (every queue's tx port is bound to it) and its events eventfd, and at each
 * kick serves every queue until its ring is empty, pushing and notifying (notify_fn) per batch.
 * Python gets the thread back, and calls again, for:
 *   XKN_LOOP_PASS    queue `at`'s pass ended with `code` XKN_TX_PYTHON (Python serves the packet at
 *                    reqs[at], adds the requests it used to `at`; the batch goes on in C) or
 *                    XKN_TX_BAD_INDEX (counted; the queue waits for a kick, `wait_kick`);
 *   XKN_LOOP_NOTIFY  queue `at`'s notify is owed to Python (notify_r: notify_fn's answer, -1: none);
 *   XKN_LOOP_REPORT  every queue idle past report_ns (Python folds statistics, sets the next);
 *   XKN_LOOP_EVENT   the worker has an event (ctl_fd); every queue's batch is consumed;
 *   XKN_LOOP_ERROR   poll failed or the kick fd is gone (`err`).
 */
struct xkn_tx_loop {
    struct xkn_tx *q;              /* the queues */
    uint32_t nq;
    const struct xk_grants *g;     /* the grant claims' view of the table (synced by Python per call) */
    int32_t kick_fd, ctl_fd;
    uint32_t at;                   /* out: the queue of a PASS or NOTIFY return */
    int32_t code;                  /* out: PASS's XKN_TX_ code */
    int32_t notify_r;              /* out: NOTIFY's answer */
    void *notify_fn;               /* int fn(void *ctx, uint32_t port): the notify in C, or NULL */
    void *notify_ctx;
    int32_t err;
    uint64_t report_ns;            /* CLOCK_MONOTONIC: return REPORT once idle past it (0: never) */
    uint64_t hold_ns;              /* tx completion coalescing: publish responses this late at most (0: at once) */
    uint64_t c_notifies, wakeups, busy_ns, notified_ns, woke_ns;
    uint64_t publishes;            /* statistics: rsp_prod moves */
    uint64_t wake_requests;                  /* the worker's scheduling policy (xk_policy.h): its input, */
    double batch_at, other_below, average;   /* PassPolicy's constants and EWMA, */
    int32_t batch;                           /* SCHED_BATCH now, */
    uint32_t switches, probe_every, since_probe, probes;
    uint64_t policy_seen;                    /* the wake-up the policy last counted */
};

#include "xk_policy.h"
XK_POLICY_FNS(xkn_tx, struct xkn_tx_loop)     /* xkn_tx_set_batch, xkn_tx_policy */

/* Write a batch's responses into the ring after the private rsp_prod, without publishing them
 * (the oldest's time kept only when coalescing: `stamp`). */
static void xkn_tx_write(struct xkn_tx *c, int stamp)
{
    volatile struct netif_tx_sring *s = (volatile struct netif_tx_sring *)c->page;
    for (uint32_t i = 0; i < c->nrsp; i++, (*c->rsp_prod)++)
        memcpy((void *)&s->ring[*c->rsp_prod & (XKN_RING_SIZE - 1)].rsp, &c->rsps[i], sizeof(c->rsps[i]));
    if (stamp && c->nrsp && !c->held)
        c->held_since = xkn_clock_ns(CLOCK_MONOTONIC);
    c->held += c->nrsp;
    c->nrsp = 0;
}

/* Publish the held responses (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY) and notify if the frontend
 * asked: 0, or what is owed to Python (xkn_notify). */
static int32_t xkn_tx_publish(struct xkn_tx_loop *L, struct xkn_tx *c)
{
    c->held = 0;
    L->publishes++;
    if (!xkn_tx_push(c->page, c->rsp_prod, c->rsps, 0))
        return 0;
    return xkn_notify(L->notify_fn, L->notify_ctx, c->port, &L->c_notifies, &L->notified_ns);
}

/* Whether queue c's held responses are due: coalescing is off, they are half a ring, or the
 * oldest has waited hold_ns. */
static int xkn_tx_due(const struct xkn_tx_loop *L, const struct xkn_tx *c)
{
    return c->held && (!L->hold_ns || c->held >= XKN_RING_SIZE / 2
                       || xkn_clock_ns(CLOCK_MONOTONIC) - c->held_since >= L->hold_ns);
}

/* One queue until it is idle: an XKN_LOOP_ code to return, or -1 when it is idle.  Its
 * responses are published when due (xkn_tx_due), or all of them with `all`. */
static int xkn_tx_serve(struct xkn_tx_loop *L, uint32_t i, int all)
{
    struct xkn_tx *c = &L->q[i];
    L->at = i;
    while (c->pending && !c->wait_kick) {
        uint64_t t0 = xkn_clock_ns(CLOCK_THREAD_CPUTIME_ID);
        int code = L->code = xkn_tx_pass(c, L->g);
        L->wake_requests += c->nrsp;
        xkn_tx_write(c, L->hold_ns != 0);
        L->busy_ns += xkn_clock_ns(CLOCK_THREAD_CPUTIME_ID) - t0;
        c->pending = code != XKN_TX_IDLE && code != XKN_TX_BAD_INDEX;
        c->wait_kick = code == XKN_TX_BAD_INDEX;
        if (code == XKN_TX_PYTHON || code == XKN_TX_BAD_INDEX)
            return XKN_LOOP_PASS;
        if (xkn_tx_due(L, c) && (L->notify_r = xkn_tx_publish(L, c)))
            return XKN_LOOP_NOTIFY;
    }
    if ((all ? c->held != 0 : xkn_tx_due(L, c)) && (L->notify_r = xkn_tx_publish(L, c)))
        return XKN_LOOP_NOTIFY;
    return -1;
}

/* The poll timeout: until the first held response is due; 0 if none is held (no timeout). */
static int xkn_tx_timeout(const struct xkn_tx_loop *L, struct timespec *ts)
{
    uint64_t now = xkn_clock_ns(CLOCK_MONOTONIC), first = UINT64_MAX;
    for (uint32_t i = 0; i < L->nq; i++)
        if (L->q[i].held && L->q[i].held_since + L->hold_ns < first)
            first = L->q[i].held_since + L->hold_ns;
    if (first == UINT64_MAX)
        return 0;
    uint64_t left = first > now ? first - now : 0;
    ts->tv_sec = (time_t)(left / 1000000000ULL);
    ts->tv_nsec = (long)(left % 1000000000ULL);
    return 1;
}

int xkn_tx_loop(struct xkn_tx_loop *L)
{
    for (int event = 0;;) {
        for (uint32_t i = 0; i < L->nq; i++) {
            int code = xkn_tx_serve(L, i, event);
            if (code >= 0)
                return code;
        }
        if (event)          /* every response published: nothing is held while Python runs */
            return XKN_LOOP_EVENT;
        if (L->report_ns && xkn_clock_ns(CLOCK_MONOTONIC) >= L->report_ns)
            return XKN_LOOP_REPORT;
        if (L->wakeups != L->policy_seen) {     /* a kick's wake-up ended: every queue idle */
            L->policy_seen = L->wakeups;
            xkn_tx_policy(L);
        }
        struct pollfd p[2] = {{L->ctl_fd, POLLIN, 0}, {L->kick_fd, POLLIN, 0}};
        struct timespec ts;
        int n;
        while ((n = ppoll(p, 2, xkn_tx_timeout(L, &ts) ? &ts : NULL, NULL)) < 0) {
            if (errno != EINTR) {
                L->err = errno;
                return XKN_LOOP_ERROR;
            }
        }
        if (n == 0)         /* held responses are due */
            continue;
        if (p[0].revents) {
            event = 1;
            continue;
        }
        uint64_t count;
        if ((p[1].revents & POLLNVAL) || (read(L->kick_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)) {
            L->err = (p[1].revents & POLLNVAL) ? EBADF : errno;
            return XKN_LOOP_ERROR;
        }
        L->wakeups++;
        L->woke_ns = xkn_clock_ns(CLOCK_MONOTONIC);
        for (uint32_t i = 0; i < L->nq; i++) {
            L->q[i].pending = 1;
            L->q[i].wait_kick = 0;
        }
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
