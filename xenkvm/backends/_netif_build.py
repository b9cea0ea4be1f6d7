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
"""
from __future__ import annotations

from cffi import FFI

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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("xenkvm.backends._netif_cffi", SOURCE, extra_compile_args=["-Wall", "-O2"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
