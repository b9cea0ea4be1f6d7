/*
 * xenstore.c - a minimal xenstore client on the xenstore ring
 * (HVM_PARAM_STORE_PFN / HVM_PARAM_STORE_EVTCHN), framing per xs_wire.h:
 * a 16-byte struct xsd_sockmsg header {type, req_id, tx_id, len} and len
 * payload bytes, in the req ring (guest -> store) and the rsp ring (replies
 * and XS_WATCH_EVENTs). One request is outstanding at a time; watch events
 * that arrive while waiting for a reply are queued for xs_next_watch_event.
 * Responses are polled (bounded); the store port is notified after each
 * produced request and each consumed response.
 *
 * A request waits for ring space and for its reply at least XEN_WAIT_POLLS
 * polls and, once shared_info gives the guest Xen time, XS_PATIENCE_NS of it:
 * the store runs on a host thread that a loaded host can keep off a CPU for
 * seconds (Linux's xenbus waits as long as it takes).  A request given up
 * half-written, or a reply given up after its header, leaves the stream out
 * of step for good (the store reads the next request's bytes as this one's),
 * so the client then refuses every further request (-XEN_EIO) instead of
 * writing garbage; a late reply to a request given up whole is skipped.
 */
#include "xen_guest.h"

evtchn_port_t xs_port;
const struct xs_reply *xs_last;
struct xenstore_domain_interface *xs_ring;
static uint32_t next_req_id = 1;
static bool xs_broken;          /* the stream is out of step: no more requests */

#define XS_PATIENCE_NS (60ULL * 1000000000ULL)

struct xs_wait {
    uint64_t polls, end;        /* end: Xen time to wait until (0: polls only) */
};

static struct xs_wait wait_start(bool patient)
{
    uint64_t now = patient ? xen_system_time() : 0;
    return (struct xs_wait){ .polls = 0, .end = now ? now + XS_PATIENCE_NS : 0 };
}

/* One poll more: false once both bounds are spent. */
static bool keep_waiting(struct xs_wait *w)
{
    cpu_relax();
    if (++w->polls < XEN_WAIT_POLLS)
        return true;
    return w->end && ((w->polls & 63) || xen_system_time() < w->end);
}

#define WATCH_QUEUE 8
static struct {
    char path[256];
    char token[64];
} watch_queue[WATCH_QUEUE];
static unsigned wq_head, wq_count;

long xs_init(void)
{
    uint64_t pfn = 0, port = 0;
    long rc = xen_get_param(HVM_PARAM_STORE_PFN, &pfn);
    if (rc)
        return rc;
    rc = xen_get_param(HVM_PARAM_STORE_EVTCHN, &port);
    if (rc)
        return rc;
    if (!pfn || pfn >= (1ULL << 20) || !port)
        return -XEN_ENOENT;
    xs_ring = (struct xenstore_domain_interface *)(uintptr_t)(pfn << 12);
    xs_port = (evtchn_port_t)port;
    return 0;
}

static volatile struct xenstore_domain_interface *ring(void)
{
    return (volatile struct xenstore_domain_interface *)xs_ring;
}

/* Append len bytes to the request ring; *done: how many went in (all, unless an error). */
static long put_bytes(const void *data, uint32_t len, uint32_t *done_out)
{
    const uint8_t *p = data;
    uint32_t done = 0;
    struct xs_wait w = wait_start(true);
    *done_out = 0;
    while (done < len) {
        XENSTORE_RING_IDX cons = ring()->req_cons, prod = ring()->req_prod;
        __asm__ volatile("" ::: "memory");
        if (prod - cons > XENSTORE_RING_SIZE) {
            printf("xenstore: req ring indexes out of step: cons %u prod %u\n", cons, prod);
            return -XEN_EINVAL;
        }
        if (prod - cons == XENSTORE_RING_SIZE) {
            if (!keep_waiting(&w))
                return -XEN_EBUSY;
            continue;
        }
        while (done < len && prod - cons < XENSTORE_RING_SIZE)
            ring()->req[MASK_XENSTORE_IDX(prod++)] = (char)p[done++];
        __asm__ volatile("sfence" ::: "memory");
        ring()->req_prod = prod;
        *done_out = done;
        xen_evtchn_send(xs_port);
    }
    return 0;
}

/* Wait until `len` response bytes are available (bounded; patient: see the top). */
static bool rsp_avail(uint32_t len, bool patient)
{
    struct xs_wait w = wait_start(patient);
    do {
        XENSTORE_RING_IDX cons = ring()->rsp_cons, prod = ring()->rsp_prod;
        if (prod - cons >= len && prod - cons <= XENSTORE_RING_SIZE)
            return true;
    } while (keep_waiting(&w));
    return false;
}

static void get_bytes(void *out, uint32_t len)
{
    uint8_t *p = out;
    XENSTORE_RING_IDX cons = ring()->rsp_cons;
    __asm__ volatile("lfence" ::: "memory");
    for (uint32_t i = 0; i < len; i++)
        p[i] = (uint8_t)ring()->rsp[MASK_XENSTORE_IDX(cons + i)];
    __asm__ volatile("" ::: "memory");
    ring()->rsp_cons = cons + len;
}

/* Read one whole message (payloads larger than the ring arrive in pieces); once its header is
 * read, the rest is waited for patiently, and the stream is broken if it does not come. */
static long read_msg(struct xs_reply *r, bool patient)
{
    struct xsd_sockmsg h;
    if (!rsp_avail(sizeof(h), patient))
        return -XEN_EBUSY;
    get_bytes(&h, sizeof(h));
    if (h.len > XENSTORE_PAYLOAD_MAX) {
        xs_broken = true;
        return -XEN_EINVAL;
    }
    uint32_t got = 0;
    while (got < h.len) {
        uint32_t chunk = h.len - got;
        if (chunk > XENSTORE_RING_SIZE)
            chunk = XENSTORE_RING_SIZE;
        /* take what is there (at least one byte) */
        if (!rsp_avail(1, true)) {
            xs_broken = true;
            return -XEN_EBUSY;
        }
        XENSTORE_RING_IDX avail = ring()->rsp_prod - ring()->rsp_cons;
        if (avail < chunk)
            chunk = avail;
        get_bytes(r->body + got, chunk);
        got += chunk;
    }
    xen_evtchn_send(xs_port);
    r->type = h.type;
    r->req_id = h.req_id;
    r->tx_id = h.tx_id;
    r->len = h.len;
    r->body[h.len] = '\0';
    return 0;
}

static void queue_watch(const struct xs_reply *r)
{
    /* payload: path NUL token NUL */
    size_t plen = strnlen(r->body, r->len);
    const char *tok = plen < r->len ? r->body + plen + 1 : "";
    if (wq_count == WATCH_QUEUE) {
        printf("xenstore: watch queue full, dropping event for %s\n", r->body);
        return;
    }
    unsigned slot = (wq_head + wq_count++) % WATCH_QUEUE;
    snprintf(watch_queue[slot].path, sizeof(watch_queue[slot].path), "%s", r->body);
    snprintf(watch_queue[slot].token, sizeof(watch_queue[slot].token), "%s", tok);
}

long xs_request(uint32_t type, uint32_t tx, const void *payload, uint32_t len, struct xs_reply *r)
{
    if (!xs_ring)
        return -XEN_ENOENT;
    if (len > XENSTORE_PAYLOAD_MAX)
        return -XEN_EINVAL;
    if (xs_broken)
        return -XEN_EIO;
    struct xsd_sockmsg h = { .type = type, .req_id = next_req_id++, .tx_id = tx, .len = len };
    uint32_t hdone = 0, pdone = 0;
    long rc = put_bytes(&h, sizeof(h), &hdone);
    if (!rc)
        rc = put_bytes(payload, len, &pdone);
    if (rc) {
        if (hdone) {                   /* part of the message is in the ring: out of step */
            printf("xenstore: gave up writing request %u (%ld): no more requests\n", h.req_id, rc);
            xs_broken = true;
        }
        return rc;
    }
    for (int msgs = 0; msgs < 64; msgs++) {
        rc = read_msg(r, true);
        if (rc)
            return rc;
        if (r->type == XS_WATCH_EVENT) {
            queue_watch(r);
            continue;
        }
        if (r->req_id < h.req_id) {    /* the reply to a request given up earlier */
            printf("xenstore: skipping the late reply to request %u\n", r->req_id);
            continue;
        }
        if (r->req_id != h.req_id) {
            printf("xenstore: reply id %u to request %u (type %u)\n", r->req_id, h.req_id, r->type);
            return -XEN_EINVAL;
        }
        xs_last = r;
        return r->type == XS_ERROR ? -5 /* EIO */ : 0;
    }
    return -XEN_EBUSY;
}

/* payload of strings joined by NULs: "a\0b\0" (each terminated) */
static uint32_t join(char *buf, size_t size, const char *a, const char *b, bool nul_last)
{
    size_t la = strlen(a), lb = b ? strlen(b) : 0, n = 0;
    if (la + lb + 2 > size)
        return 0;
    memcpy(buf, a, la);
    n = la;
    if (b) {
        buf[n++] = '\0';
        memcpy(buf + n, b, lb);
        n += lb;
    }
    if (nul_last)
        buf[n++] = '\0';
    return (uint32_t)n;
}

long xs_read(uint32_t tx, const char *path, struct xs_reply *r)
{
    char buf[512];
    uint32_t n = join(buf, sizeof(buf), path, NULL, true);
    return n ? xs_request(XS_READ, tx, buf, n, r) : -XEN_EINVAL;
}

long xs_directory(uint32_t tx, const char *path, struct xs_reply *r)
{
    char buf[512];
    uint32_t n = join(buf, sizeof(buf), path, NULL, true);
    return n ? xs_request(XS_DIRECTORY, tx, buf, n, r) : -XEN_EINVAL;
}

static struct xs_reply scratch;

long xs_write(uint32_t tx, const char *path, const char *value)
{
    char buf[1024];
    /* path NUL value (the value is not NUL-terminated) */
    uint32_t n = join(buf, sizeof(buf), path, value, false);
    return n ? xs_request(XS_WRITE, tx, buf, n, &scratch) : -XEN_EINVAL;
}

long xs_rm(uint32_t tx, const char *path)
{
    char buf[512];
    uint32_t n = join(buf, sizeof(buf), path, NULL, true);
    return n ? xs_request(XS_RM, tx, buf, n, &scratch) : -XEN_EINVAL;
}

long xs_watch(const char *path, const char *token)
{
    char buf[512];
    uint32_t n = join(buf, sizeof(buf), path, token, true);
    return n ? xs_request(XS_WATCH, 0, buf, n, &scratch) : -XEN_EINVAL;
}

long xs_unwatch(const char *path, const char *token)
{
    char buf[512];
    uint32_t n = join(buf, sizeof(buf), path, token, true);
    return n ? xs_request(XS_UNWATCH, 0, buf, n, &scratch) : -XEN_EINVAL;
}

long xs_transaction_start(uint32_t *tx)
{
    long rc = xs_request(XS_TRANSACTION_START, 0, "", 1, &scratch);
    if (rc)
        return rc;
    uint32_t v = 0;
    for (const char *p = scratch.body; *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (uint32_t)(*p - '0');
    *tx = v;
    return v ? 0 : -XEN_EINVAL;
}

long xs_transaction_end(uint32_t tx, bool commit)
{
    const char *what = commit ? "T" : "F";
    return xs_request(XS_TRANSACTION_END, tx, what, 2, &scratch);
}

bool xs_watch_event_ready(void)
{
    return wq_count || ring()->rsp_prod != ring()->rsp_cons;
}

bool xs_next_watch_event(char *path, size_t psize, char *token, size_t tsize)
{
    if (!wq_count) {
        /* wait (bounded) for one to arrive on the ring */
        static struct xs_reply ev;
        for (int msgs = 0; msgs < 8 && !wq_count; msgs++) {
            if (read_msg(&ev, false))
                break;
            if (ev.type == XS_WATCH_EVENT)
                queue_watch(&ev);
            else
                printf("xenstore: unexpected message type %u outside a request\n", ev.type);
        }
        if (!wq_count)
            return false;
    }
    unsigned slot = wq_head;
    wq_head = (wq_head + 1) % WATCH_QUEUE;
    wq_count--;
    snprintf(path, psize, "%s", watch_queue[slot].path);
    snprintf(token, tsize, "%s", watch_queue[slot].token);
    return true;
}
