/*
 * xen_netfront - a freestanding netfront against xenkvm's network backend
 * (xenkvm/backends/net.py), through xenstore, grants and event channels.
 * The host side is tests/backends/test_netfront_guest.py: it answers on the
 * tap with a packet socket, checks every frame byte for byte and injects
 * frames for us.  Addresses: we are 10.99.0.2 (our MAC from xenstore), the
 * host peer 10.99.0.1 (its MAC learnt by ARP).
 *
 * Default: finds device/vif/0, checks the backend's keys (feature-rx-copy,
 * -sg, -gso-tcpv4, InitWait), connects (tx-ring-ref, rx-ring-ref,
 * event-channel, request-rx-copy, feature-rx-notify, feature-sg,
 * feature-gso-tcpv4, state Connected), posts 64 rx buffers, then:
 *   1. ARP request for 10.99.0.1 (resent every 200 ms until answered);
 *   2. ICMP echo request; the reply's payload must match;
 *   3. three frames the host injects: 60 bytes, 1514 bytes, 9014 bytes (three
 *      rx slots with NETRXF_more_data), and a UDP frame whose checksum the host
 *      left partial (NETRXF_csum_blank), and a 20000-byte TCP frame left for
 *      segmentation (five slots and a GSO extra, mss 1448);
 *   4. a 3000-byte UDP frame in three tx slots (feature-sg), a UDP frame with
 *      NETTXF_csum_blank (the host finishes the checksum at the offsets our
 *      backend gave the tap), and a 20000-byte TCP frame with a GSO extra
 *      (mss 1448);
 *   5. a reset (Closing, Closed, Initialising: InitWait again) and a reconnect
 *      with two queues and split event channels (queue-N/tx-ring-ref,
 *      rx-ring-ref, event-channel-tx, event-channel-rx): a UDP frame to port
 *      9996 out of queue 1, then 16 UDP flows the host sends (ports
 *      6000-6015) arrive over both queues;
 *   6. "NET-DONE".
 * xk.net_hostile: before that, malformed tx packets (an ungranted ref, a slot
 * crossing its page, 19 slots, slots larger than the packet, a runt, an
 * unknown extra type, req_prod 1000 ahead): each answered NETIF_RSP_ERROR
 * (or nothing served, for the index); on rx, req_prod 1000 ahead (nothing
 * delivered until it is sane again and kicked) and a revoked rx buffer (that
 * slot answered with an error); then everything above still works.
 * xk.net_selftest (guests/xen_netfront*.yaml, no host peer): what needs no
 * answer: the hostile tx requests (with xk.net_hostile), SG/checksum/GSO
 * frames (their statuses), a reset and two queues, a frame out of queue 1.
 * xk.net_snapshot: ARP, then a UDP frame (port 9990) pushed and a snapshot asked for at once
 * (port XK_SNAPSHOT_PORT); "after snapshot" its tx response is collected, then ARP and a ping
 * again, through the tap the restore re-created, and a UDP frame to 9992
 * (tests/backends/test_snapshot_backends.py).
 * xk.net_bench (benchmarks/bench_netback.py): xk.net_bench_frames frames of
 * 64 and 1514 bytes and an eighth as many 60000-byte GSO frames sent with the
 * tx ring kept full, then the same sizes counted as the host injects them.
 */
#include "xen_front.h"
#include <xen/io/netif.h>

#define NRX 64
#define NTX 20
#define REF_TX_RING 16
#define REF_RX_RING 17
#define REF_TX(i)   (32 + (i))
#define REF_RX(i)   (64 + (i))
#define REF_NONE    500
#define ETH_HLEN    14

static uint8_t tx_ring_page[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t rx_ring_page[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t txbuf[NTX][XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t rxbuf[NRX][XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t frame[24000];        /* a frame being built */
static uint8_t in[24000];           /* a frame received */

/* One queue's front end; V.q is the one the helpers use (use_queue swaps). */
struct queue {
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    evtchn_port_t port, rx_port;    /* the same port unless split event channels */
    unsigned rx_base, nrx;          /* its rx buffers: rxbuf[rx_base .. rx_base + nrx) */
};

static struct {
    char fe[64], be[96];
    uint8_t mac[6], peer[6];
    struct queue q;
    uint16_t next_id;
} V;

static const uint8_t my_ip[4] = {10, 99, 0, 2}, peer_ip[4] = {10, 99, 0, 1};

/* ---- handshake ----------------------------------------------------------------- */
static bool wait_be_state(long want)
{
    uint64_t end = xen_system_time() + 20 * SEC;
    while (xen_system_time() < end) {
        if (read_num(V.be, "state") == want)
            return true;
        xen_delay_ns(MS);
    }
    printf("%s: backend state %ld, expected %ld\n", V.be, read_num(V.be, "state"), want);
    return false;
}

static unsigned hexval(char c)
{
    return c >= 'a' ? (unsigned)(c - 'a' + 10) : c >= 'A' ? (unsigned)(c - 'A' + 10) : (unsigned)(c - '0');
}

static bool find_vif(void)
{
    snprintf(V.fe, sizeof(V.fe), "device/vif/0");
    if (xs_readf(V.fe, "backend", &r))
        return false;
    snprintf(V.be, sizeof(V.be), "%s", r.body);
    if (xs_readf(V.fe, "mac", &r) || strlen(r.body) != 17)
        return false;
    for (unsigned i = 0; i < 6; i++)
        V.mac[i] = (uint8_t)(hexval(r.body[i * 3]) << 4 | hexval(r.body[i * 3 + 1]));
    return true;
}

static void rx_post(unsigned idx)
{
    netif_rx_request_t *q = RING_GET_REQUEST(&V.q.rx, V.q.rx.req_prod_pvt);
    q->id = (uint16_t)(V.q.rx_base + idx % V.q.nrx);
    q->gref = REF_RX(q->id);
    V.q.rx.req_prod_pvt++;
}

static void rx_push(void)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&V.q.rx, notify);
    if (notify)
        xen_evtchn_send(V.q.rx_port);
}

static bool connect(void)
{
    netif_tx_sring_t *ts = (netif_tx_sring_t *)tx_ring_page;
    netif_rx_sring_t *rs = (netif_rx_sring_t *)rx_ring_page;
    SHARED_RING_INIT(ts);
    SHARED_RING_INIT(rs);
    FRONT_RING_INIT(&V.q.tx, ts, XEN_PAGE);
    FRONT_RING_INIT(&V.q.rx, rs, XEN_PAGE);
    grant(REF_TX_RING, tx_ring_page, false);
    grant(REF_RX_RING, rx_ring_page, false);
    for (unsigned i = 0; i < NRX; i++)
        grant(REF_RX(i), rxbuf[i], false);
    if (xen_evtchn_alloc_unbound(0, &V.q.port))
        return false;
    V.q.rx_port = V.q.port;
    V.q.rx_base = 0;
    V.q.nrx = NRX;
    xs_writef(V.fe, "tx-ring-ref", "%lu", REF_TX_RING);
    xs_writef(V.fe, "rx-ring-ref", "%lu", REF_RX_RING);
    xs_writef(V.fe, "event-channel", "%lu", V.q.port);
    xs_writef(V.fe, "request-rx-copy", "%lu", 1);
    xs_writef(V.fe, "feature-rx-notify", "%lu", 1);
    xs_writef(V.fe, "feature-sg", "%lu", 1);
    xs_writef(V.fe, "feature-gso-tcpv4", "%lu", 1);
    for (unsigned i = 0; i < NRX; i++)
        rx_post(i);
    xs_writef(V.fe, "state", "%lu", XenbusStateConnected);   /* netfront goes straight to Connected */
    rx_push();
    return wait_be_state(XenbusStateConnected);
}

/* ---- tx --------------------------------------------------------------------------- */
static netif_tx_request_t *tx_slot(grant_ref_t ref, uint16_t off, uint16_t size, uint16_t flags)
{
    netif_tx_request_t *q = RING_GET_REQUEST(&V.q.tx, V.q.tx.req_prod_pvt);
    q->gref = ref;
    q->offset = off;
    q->size = size;
    q->flags = flags;
    q->id = V.next_id++;
    V.q.tx.req_prod_pvt++;
    return q;
}

/* Publish, notify if asked, collect `n` responses' statuses (extras answer NETIF_RSP_NULL). */
static bool tx_submit(unsigned n, int16_t *st)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&V.q.tx, notify);
    if (notify)
        xen_evtchn_send(V.q.port);
    unsigned got = 0;
    uint64_t end = xen_system_time() + 10 * SEC;
    while (got < n && xen_system_time() < end) {
        while (RING_HAS_UNCONSUMED_RESPONSES(&V.q.tx) && got < n) {
            st[got++] = RING_GET_RESPONSE(&V.q.tx, V.q.tx.rsp_cons)->status;
            V.q.tx.rsp_cons++;
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&V.q.tx, more);
        if (!more && got < n)
            xen_irq_window(2000);
    }
    return got == n;
}

/* Send `len` bytes of `frame` in one slot (page 0); the status. */
static int16_t send1(unsigned len, uint16_t flags)
{
    memcpy(txbuf[0], frame, len);
    grant(REF_TX(0), txbuf[0], true);
    tx_slot(REF_TX(0), 0, (uint16_t)len, flags);
    int16_t st = 99;
    return tx_submit(1, &st) ? st : 99;
}

static unsigned rx_errors;          /* rx responses with a negative status */
static bool rx_nocopy;              /* bench: count the bytes, do not copy them (the guest's ring 0 is slow) */

/* ---- rx --------------------------------------------------------------------------- */
/* The next frame (more_data slots gathered) into `in`; its length, or -1 after `ns`. */
static int rx_frame(uint64_t ns, uint16_t *flags, struct netif_extra_info *extra)
{
    uint64_t end = xen_system_time() + ns;
    unsigned len = 0;
    bool in_frame = false, want_extra = false;
    while (xen_system_time() < end) {
        while (RING_HAS_UNCONSUMED_RESPONSES(&V.q.rx)) {
            RING_IDX i = V.q.rx.rsp_cons++;
            netif_rx_response_t *p = RING_GET_RESPONSE(&V.q.rx, i);
            netif_rx_response_t rsp = *p;
            rx_post(i);
            if (want_extra) {
                memcpy(extra, &rsp, sizeof(*extra));
                want_extra = false;
                continue;
            }
            if (!in_frame) {
                *flags = rsp.flags;
                want_extra = rsp.flags & NETRXF_extra_info;
                in_frame = true;
            }
            rx_errors += rsp.status < 0;
            if (!rx_nocopy && rsp.status > 0 && len + (unsigned)rsp.status <= sizeof(in) && rsp.offset + rsp.status <= XEN_PAGE)
                memcpy(in + len, rxbuf[rsp.id % NRX] + rsp.offset, (unsigned)rsp.status);
            len += rsp.status > 0 ? (unsigned)rsp.status : 0;
            if (!(rsp.flags & NETRXF_more_data)) {
                rx_push();
                return (int)len;
            }
        }
        rx_push();
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&V.q.rx, more);
        if (!more)
            xen_irq_window(2000);
    }
    return -1;
}

/* ---- frames ------------------------------------------------------------------------- */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t sum16(const uint8_t *p, unsigned n, uint32_t s)
{
    for (unsigned i = 0; i + 1 < n; i += 2)
        s += get16(p + i);
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static unsigned eth(const uint8_t *dst, uint16_t type)
{
    memcpy(frame, dst, 6);
    memcpy(frame + 6, V.mac, 6);
    put16(frame + 12, type);
    return ETH_HLEN;
}

/* IPv4 header at frame+14 for `l4len` bytes of protocol `proto`. */
static unsigned ip4(uint8_t proto, unsigned l4len)
{
    uint8_t *h = frame + ETH_HLEN;
    memset(h, 0, 20);
    h[0] = 0x45;
    put16(h + 2, (uint16_t)(20 + l4len));
    put16(h + 4, 1);
    put16(h + 6, 0x4000);
    h[8] = 64;
    h[9] = proto;
    memcpy(h + 12, my_ip, 4);
    memcpy(h + 16, peer_ip, 4);
    put16(h + 10, (uint16_t)~fold(sum16(h, 20, 0)));
    return ETH_HLEN + 20;
}

static uint32_t pseudo(uint8_t proto, unsigned l4len)
{
    return sum16(my_ip, 4, sum16(peer_ip, 4, proto + l4len));
}

/* UDP 7777 -> `dport` with `n` payload bytes (byte i = i*5 + seed); csum: 0 none, 1 full, 2 partial. */
static unsigned udp(uint16_t dport, unsigned n, unsigned seed, int csum)
{
    unsigned off = eth(V.peer, 0x0800);
    off = ip4(17, 8 + n);
    uint8_t *u = frame + off;
    put16(u, 7777);
    put16(u + 2, dport);
    put16(u + 4, (uint16_t)(8 + n));
    put16(u + 6, 0);
    for (unsigned i = 0; i < n; i++)
        u[8 + i] = (uint8_t)(i * 5 + seed);
    if (csum == 1)
        put16(u + 6, (uint16_t)~fold(sum16(u, 8 + n, pseudo(17, 8 + n))));
    else if (csum == 2)
        put16(u + 6, fold(pseudo(17, 8 + n)));
    return off + 8 + n;
}

static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

/* Who has 10.99.0.1, tell 10.99.0.2: 42 bytes in `frame`. */
static unsigned arp_frame(void)
{
    unsigned off = eth(bcast, 0x0806);
    uint8_t *a = frame + off;
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, 1);
    memcpy(a + 8, V.mac, 6);
    memcpy(a + 14, my_ip, 4);
    memset(a + 18, 0, 6);
    memcpy(a + 24, peer_ip, 4);
    return off + 28;
}

static bool arp(void)
{
    for (unsigned attempt = 0; attempt < 100; attempt++) {
        if (send1(arp_frame(), 0) != NETIF_RSP_OKAY)
            return false;
        uint64_t end = xen_system_time() + 200 * MS;
        while (xen_system_time() < end) {
            uint16_t fl;
            struct netif_extra_info ex;
            int n = rx_frame(end - xen_system_time(), &fl, &ex);
            if (n >= 42 && get16(in + 12) == 0x0806 && get16(in + 20) == 2 && !memcmp(in + 28, peer_ip, 4)) {
                memcpy(V.peer, in + 22, 6);
                return true;
            }
        }
    }
    return false;
}

static bool ping(void)
{
    unsigned off = eth(V.peer, 0x0800);
    off = ip4(1, 64);
    uint8_t *c = frame + off;
    c[0] = 8;
    c[1] = 0;
    put16(c + 2, 0);
    put16(c + 4, 0x4b58);
    put16(c + 6, 1);
    for (unsigned i = 0; i < 56; i++)
        c[8 + i] = (uint8_t)(i * 3 + 7);
    put16(c + 2, (uint16_t)~fold(sum16(c, 64, 0)));
    if (!check(send1(off + 64, 0) == NETIF_RSP_OKAY, "net.icmp_sent", "status"))
        return false;
    for (unsigned tries = 0; tries < 50; tries++) {
        uint16_t fl;
        struct netif_extra_info ex;
        int n = rx_frame(5 * SEC, &fl, &ex);
        if (n < 0)
            break;
        if (n >= 98 && get16(in + 12) == 0x0800 && in[23] == 1 && in[34] == 0)
            return !memcmp(in + 38, c + 4, 60) && !memcmp(in, V.mac, 6);
    }
    return false;
}

static uint8_t pat(unsigned i, unsigned seed) { return (uint8_t)(i * 7 + seed); }

/* Frames the host injects: ethertype 0x88b5, byte i of the payload = i*7 + seed. */
static void receive_injected(void)
{
    static const struct { unsigned len, seed; const char *name; } want[] = {
        {60, 1, "net.rx_60"}, {1514, 2, "net.rx_1514"}, {9014, 3, "net.rx_9014_three_slots"}};
    for (unsigned k = 0; k < 3; k++) {
        uint16_t fl = 0;
        struct netif_extra_info ex;
        int n;
        do
            n = rx_frame(10 * SEC, &fl, &ex);
        while (n >= 0 && !(n >= ETH_HLEN && get16(in + 12) == 0x88b5));
        bool ok = n == (int)want[k].len && !memcmp(in, V.mac, 6);
        for (int i = ETH_HLEN; ok && i < n; i++)
            ok = in[i] == pat((unsigned)(i - ETH_HLEN), want[k].seed);
        check(ok, want[k].name, "got %d bytes", n);
    }
    uint16_t fl = 0;
    struct netif_extra_info ex;
    int n;
    do
        n = rx_frame(10 * SEC, &fl, &ex);
    while (n >= 0 && !(n > 42 && get16(in + 12) == 0x0800 && in[23] == 17 && get16(in + 36) == 5555));
    check(n == 42 + 300 && (fl & NETRXF_csum_blank) && (fl & NETRXF_data_validated), "net.rx_csum_blank",
          "len %d flags %#x", n, fl);
    /* a 20000-byte TCP frame the host left for segmentation: five slots and a GSO extra */
    memset(&ex, 0, sizeof(ex));
    do
        n = rx_frame(10 * SEC, &fl, &ex);
    while (n >= 0 && !(n > 54 && get16(in + 12) == 0x0800 && in[23] == 6 && get16(in + 36) == 5556));
    bool ok = n == 20000 && (fl & NETRXF_extra_info) && ex.type == XEN_NETIF_EXTRA_TYPE_GSO &&
              ex.u.gso.type == XEN_NETIF_GSO_TYPE_TCPV4 && ex.u.gso.size == 1448;
    for (int i = 54; ok && i < n; i++)
        ok = in[i] == pat((unsigned)(i - 54), 4);
    check(ok, "net.rx_gso_tcpv4", "len %d flags %#x extra type %u gso %u/%u", n, fl, ex.type, ex.u.gso.type,
          ex.u.gso.size);
}

static void send_sg_csum_gso(void)
{
    /* 3000 bytes in three slots: 1000 at offset 100, 1500 at 0, 500 at 3596 (ends on the page end) */
    unsigned len = udp(9999, 3000 - 42, 1, 1);
    memcpy(txbuf[1] + 100, frame, 1000);
    memcpy(txbuf[2], frame + 1000, 1500);
    memcpy(txbuf[3] + 3596, frame + 2500, 500);
    for (unsigned i = 1; i <= 3; i++)
        grant(REF_TX(i), txbuf[i], true);
    tx_slot(REF_TX(1), 100, (uint16_t)len, NETTXF_more_data);
    tx_slot(REF_TX(2), 0, 1500, NETTXF_more_data);
    tx_slot(REF_TX(3), 3596, 500, 0);
    int16_t st[3] = {9, 9, 9};
    check(tx_submit(3, st) && st[0] == 0 && st[1] == 0 && st[2] == 0, "net.tx_sg_three_slots", "%d %d %d", st[0], st[1],
          st[2]);
    len = udp(9998, 200, 2, 2);
    check(send1(len, NETTXF_csum_blank | NETTXF_data_validated) == NETIF_RSP_OKAY, "net.tx_csum_blank", "status");
    /* TCP 20000 bytes, GSO mss 1448: the first 54 + 4042 bytes in page 4, then 4096 a page */
    unsigned plen = 20000 - 54;
    eth(V.peer, 0x0800);
    ip4(6, 20 + plen);
    uint8_t *t = frame + 34;
    memset(t, 0, 20);
    put16(t, 7777);
    put16(t + 2, 9997);
    t[12] = 5 << 4;
    t[13] = 0x18;
    put16(t + 14, 65535);
    for (unsigned i = 0; i < plen; i++)
        t[20 + i] = (uint8_t)(i * 5 + 3);
    put16(t + 16, fold(pseudo(6, 20 + plen)));
    unsigned nslots = (20000 + XEN_PAGE - 1) / XEN_PAGE;
    for (unsigned s = 0; s < nslots; s++) {
        unsigned n = 20000 - s * XEN_PAGE < XEN_PAGE ? 20000 - s * XEN_PAGE : XEN_PAGE;
        memcpy(txbuf[4 + s], frame + s * XEN_PAGE, n);
        grant(REF_TX(4 + s), txbuf[4 + s], true);
        tx_slot(REF_TX(4 + s), 0, (uint16_t)(s == 0 ? 20000 : n),
                (uint16_t)((s == 0 ? NETTXF_extra_info | NETTXF_csum_blank | NETTXF_data_validated : 0) |
                           (s + 1 < nslots ? NETTXF_more_data : 0)));
        if (s == 0) {
            struct netif_extra_info *e = (struct netif_extra_info *)RING_GET_REQUEST(&V.q.tx, V.q.tx.req_prod_pvt);
            memset(e, 0, sizeof(*e));
            e->type = XEN_NETIF_EXTRA_TYPE_GSO;
            e->u.gso.size = 1448;
            e->u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
            V.q.tx.req_prod_pvt++;
        }
    }
    int16_t gst[8];
    bool ok = tx_submit(nslots + 1, gst);
    check(ok && gst[0] == 0 && gst[1] == NETIF_RSP_NULL && gst[nslots] == 0, "net.tx_gso_tcpv4", "ok %d %d %d", ok,
          gst[0], gst[1]);
}

/* ---- reset, then two queues with split event channels ------------------------------------ */
static uint8_t q1_pages[2][XEN_PAGE] XEN_PAGE_ALIGNED;
static struct queue Q[2];
static unsigned cur;

static void use_queue(unsigned i)
{
    Q[cur] = V.q;
    V.q = Q[i];
    cur = i;
}

static bool reset(void)
{
    bool ok = true;
    for (unsigned k = 0; k < 3; k++) {
        static const unsigned fe[] = {XenbusStateClosing, XenbusStateClosed, XenbusStateInitialising};
        static const unsigned be[] = {XenbusStateClosing, XenbusStateClosed, XenbusStateInitWait};
        xs_writef(V.fe, "state", "%lu", fe[k]);
        ok = wait_be_state(be[k]) && ok;
    }
    return ok;
}

static bool connect_two_queues(void)
{
    char key[64];
    uint8_t *pages[2][2] = {{tx_ring_page, rx_ring_page}, {q1_pages[0], q1_pages[1]}};
    for (unsigned i = 0; i < 2; i++) {
        struct queue *q = &Q[i];
        memset(pages[i][0], 0, XEN_PAGE);
        memset(pages[i][1], 0, XEN_PAGE);
        SHARED_RING_INIT((netif_tx_sring_t *)pages[i][0]);
        SHARED_RING_INIT((netif_rx_sring_t *)pages[i][1]);
        FRONT_RING_INIT(&q->tx, (netif_tx_sring_t *)pages[i][0], XEN_PAGE);
        FRONT_RING_INIT(&q->rx, (netif_rx_sring_t *)pages[i][1], XEN_PAGE);
        grant(REF_TX_RING + 2 * i + 2, pages[i][0], false);
        grant(REF_RX_RING + 2 * i + 2, pages[i][1], false);
        if (xen_evtchn_alloc_unbound(0, &q->port) || xen_evtchn_alloc_unbound(0, &q->rx_port))
            return false;
        q->rx_base = i * (NRX / 2);
        q->nrx = NRX / 2;
        snprintf(key, sizeof(key), "queue-%u/tx-ring-ref", i);
        xs_writef(V.fe, key, "%lu", REF_TX_RING + 2 * i + 2);
        snprintf(key, sizeof(key), "queue-%u/rx-ring-ref", i);
        xs_writef(V.fe, key, "%lu", REF_RX_RING + 2 * i + 2);
        snprintf(key, sizeof(key), "queue-%u/event-channel-tx", i);
        xs_writef(V.fe, key, "%lu", q->port);
        snprintf(key, sizeof(key), "queue-%u/event-channel-rx", i);
        xs_writef(V.fe, key, "%lu", q->rx_port);
    }
    static const char *stale[] = {"tx-ring-ref", "rx-ring-ref", "event-channel"};
    for (unsigned k = 0; k < 3; k++) {
        snprintf(key, sizeof(key), "%s/%s", V.fe, stale[k]);
        xs_rm(0, key);
    }
    xs_writef(V.fe, "multi-queue-num-queues", "%lu", 2);
    cur = 0;
    V.q = Q[0];
    for (unsigned i = 0; i < 2; i++) {
        use_queue(i);
        for (unsigned k = 0; k < V.q.nrx; k++)
            rx_post(k);
    }
    xs_writef(V.fe, "state", "%lu", XenbusStateConnected);
    bool ok = wait_be_state(XenbusStateConnected);
    for (unsigned i = 0; i < 2; i++) {
        use_queue(i);
        rx_push();
    }
    return ok;
}

/* After a reset: two queues, split channels; a frame out of queue 1, 16 flows in over both. */
static void test_multiqueue(void)
{
    check(read_num(V.be, "multi-queue-max-queues") >= 2 && read_num(V.be, "feature-split-event-channels") == 1,
          "net.mq.keys", "backend keys");
    if (!check(reset(), "net.reset", "states") || !check(connect_two_queues(), "net.mq.connected", "handshake"))
        return;
    use_queue(1);
    unsigned len = udp(9996, 100, 6, 1);
    check(send1(len, 0) == NETIF_RSP_OKAY, "net.mq.tx_queue_1", "status");
    unsigned seen = 0, per_queue[2] = {0, 0};
    bool good = true;
    uint64_t end = xen_system_time() + 30 * SEC;
    while (seen != 0xffff && xen_system_time() < end) {
        for (unsigned i = 0; i < 2; i++) {
            use_queue(i);
            uint16_t fl;
            struct netif_extra_info ex;
            int n = rx_frame(20 * MS, &fl, &ex);
            if (n != 42 + 64 || get16(in + 12) != 0x0800 || in[23] != 17 || get16(in + 36) < 6000 || get16(in + 36) > 6015)
                continue;
            unsigned flow = get16(in + 36) - 6000u;
            for (unsigned k = 0; k < 64; k++)
                good = good && in[42 + k] == (uint8_t)(flow * 13 + k);
            seen |= 1u << flow;
            per_queue[i]++;
        }
    }
    check(seen == 0xffff && good, "net.mq.rx_16_flows", "flows %#x good %d", seen, good);
    check(per_queue[0] > 0 && per_queue[1] > 0, "net.mq.rx_both_queues", "%u + %u", per_queue[0], per_queue[1]);
    /* the first push on each ring notifies (rsp_event starts at 1): wait for both upcalls to be taken */
    bool tx_seen = xen_wait_port(Q[1].port, 1, 5 * SEC), rx_seen = xen_wait_port(Q[1].rx_port, 1, 5 * SEC);
    check(tx_seen && rx_seen, "net.mq.split_ports_notified",
          "tx %u rx %u", xen_ports[Q[1].port].count, xen_ports[Q[1].rx_port].count);
}

/* ---- the hostile frontend ------------------------------------------------------------ */
static int16_t bad(grant_ref_t ref, uint16_t off, uint16_t size)
{
    udp(9999, 100, 4, 0);
    memcpy(txbuf[0], frame, 142);
    grant(REF_TX(0), txbuf[0], true);
    tx_slot(ref, off, size, 0);
    int16_t st = 99;
    return tx_submit(1, &st) ? st : 99;
}

static void hostile_tx(void)
{
    check(bad(REF_NONE, 0, 142) == NETIF_RSP_ERROR, "hostile.ungranted_ref", "status");
    check(bad(0xFFFFFFF0u, 0, 142) == NETIF_RSP_ERROR, "hostile.huge_ref", "status");
    check(bad(REF_TX(0), 4000, 142) == NETIF_RSP_ERROR, "hostile.slot_crosses_page", "status");
    check(bad(REF_TX(0), 0, 10) == NETIF_RSP_ERROR, "hostile.runt", "status");
    int16_t st[20];
    for (unsigned i = 0; i < 19; i++)
        tx_slot(REF_TX(0), 0, (uint16_t)(i == 0 ? 19 * 64 : 64), i < 18 ? NETTXF_more_data : 0);
    bool ok = tx_submit(19, st);
    for (unsigned i = 0; i < 19; i++)
        ok = ok && st[i] == NETIF_RSP_ERROR;
    check(ok, "hostile.nineteen_slots", "statuses");
    tx_slot(REF_TX(0), 0, 100, NETTXF_more_data);
    tx_slot(REF_TX(0), 0, 200, 0);
    check(tx_submit(2, st) && st[0] == NETIF_RSP_ERROR && st[1] == NETIF_RSP_ERROR, "hostile.slots_exceed_size",
          "%d %d", st[0], st[1]);
    tx_slot(REF_TX(0), 0, 142, NETTXF_extra_info);
    struct netif_extra_info *e = (struct netif_extra_info *)RING_GET_REQUEST(&V.q.tx, V.q.tx.req_prod_pvt++);
    memset(e, 0, sizeof(*e));
    e->type = 9;
    check(tx_submit(2, st) && st[0] == NETIF_RSP_ERROR, "hostile.unknown_extra", "%d", st[0]);
    /* req_prod a thousand requests ahead: nothing is served; then the real index and a kick */
    RING_IDX real = V.q.tx.req_prod_pvt;
    V.q.tx.sring->req_prod = real + 1000;
    xen_mb();
    xen_evtchn_send(V.q.port);
    xen_delay_ns(50 * MS);
    check(V.q.tx.sring->rsp_prod == V.q.tx.rsp_cons, "hostile.far_ahead_not_served", "rsp_prod %u", V.q.tx.sring->rsp_prod);
    V.q.tx.sring->req_prod = real;
    xen_mb();
    check(bad(REF_TX(0), 0, 142) == NETIF_RSP_OKAY, "hostile.good_frame_after", "status");
}

/* Needs the host peer: it answers the ARP requests sent meanwhile. */
static void hostile_rx(void)
{
    /* rx: req_prod 1000 ahead while the peer answers our ARP: nothing delivered until we fix it and kick */
    uint16_t fl;
    struct netif_extra_info ex;
    while (rx_frame(100 * MS, &fl, &ex) >= 0)
        ;                               /* whatever the host sent so far */
    RING_IDX rx_real = V.q.rx.req_prod_pvt;
    V.q.rx.sring->req_prod = rx_real + 1000;
    xen_mb();
    check(send1(arp_frame(), 0) == NETIF_RSP_OKAY, "hostile.rx.arp_sent", "status");
    xen_delay_ns(300 * MS);
    check(V.q.rx.sring->rsp_prod == V.q.rx.rsp_cons, "hostile.rx.far_ahead_not_served", "rsp_prod %u cons %u",
          V.q.rx.sring->rsp_prod, V.q.rx.rsp_cons);
    /* rx: the next buffer's grant revoked: that slot is answered with an error, the next frames land */
    unsigned victim = V.q.rx_base + V.q.rx.rsp_cons % V.q.nrx;
    gnt[REF_RX(victim)].flags = 0;
    V.q.rx.sring->req_prod = rx_real;
    xen_mb();
    xen_evtchn_send(V.q.rx_port);
    uint64_t end = xen_system_time() + 10 * SEC;
    while (!rx_errors && xen_system_time() < end) {
        if (rx_frame(200 * MS, &fl, &ex) < 0)
            send1(arp_frame(), 0);
    }
    check(rx_errors >= 1, "hostile.rx.revoked_buffer_error", "%u errors", rx_errors);
    grant(REF_RX(victim), rxbuf[victim], false);
}

/* ---- without a host peer (guests/xen_netfront*.yaml): what the tx statuses alone show --------- */
static void selftest(void)
{
    memset(V.peer, 0xfe, 6);        /* nobody's MAC: the host stack drops what we send */
    if (xk_cmdline_has("xk.net_hostile"))
        hostile_tx();
    send_sg_csum_gso();
    check(send1(arp_frame(), 0) == NETIF_RSP_OKAY, "net.arp_sent", "status");
    if (!check(reset(), "net.reset", "states") || !check(connect_two_queues(), "net.mq.connected", "handshake"))
        return;
    use_queue(1);
    check(send1(udp(9996, 100, 6, 1), 0) == NETIF_RSP_OKAY, "net.mq.tx_queue_1", "status");
    check(xen_wait_port(V.q.port, 1, 5 * SEC), "net.mq.tx_port_notified", "no event on port %u", V.q.port);
    puts("NET-DONE");
}

/* ---- benchmarks/bench_netback.py ------------------------------------------------------ */
/* `count` frames of `len` bytes (GSO TCPv4 mss 1448 when len > 4096), the tx ring kept full. */
static void bench_tx(unsigned len, unsigned count)
{
    unsigned slots = (len + XEN_PAGE - 1) / XEN_PAGE, gso = len > XEN_PAGE, sent = 0, done = 0, rsps = 0, errors = 0;
    eth(V.peer, 0x0800);
    ip4(6, len - 34);
    memset(frame + 34, 0, 20);
    frame[34 + 12] = 5 << 4;
    for (unsigned s = 0; s < slots; s++) {
        memcpy(txbuf[s], frame + s * XEN_PAGE, XEN_PAGE);
        grant(REF_TX(s), txbuf[s], true);
    }
    printf("BENCH-START tx %u %u\n", len, count);
    uint64_t end = xen_system_time() + 600 * SEC;
    while (done < count && xen_system_time() < end) {
        while (sent < count && RING_SIZE(&V.q.tx) - (V.q.tx.req_prod_pvt - V.q.tx.rsp_cons) >= slots + gso) {
            for (unsigned s = 0; s < slots; s++) {
                unsigned n = len - s * XEN_PAGE < XEN_PAGE ? len - s * XEN_PAGE : XEN_PAGE;
                tx_slot(REF_TX(s), 0, (uint16_t)(s == 0 ? len : n),
                        (uint16_t)((s == 0 && gso ? NETTXF_extra_info | NETTXF_csum_blank : 0) |
                                   (s + 1 < slots ? NETTXF_more_data : 0)));
                if (s == 0 && gso) {
                    struct netif_extra_info *e = (struct netif_extra_info *)RING_GET_REQUEST(&V.q.tx, V.q.tx.req_prod_pvt++);
                    memset(e, 0, sizeof(*e));
                    e->type = XEN_NETIF_EXTRA_TYPE_GSO;
                    e->u.gso.size = 1448;
                    e->u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
                }
            }
            sent++;
        }
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&V.q.tx, notify);
        if (notify)
            xen_evtchn_send(V.q.port);
        while (RING_HAS_UNCONSUMED_RESPONSES(&V.q.tx)) {
            netif_tx_response_t *p = RING_GET_RESPONSE(&V.q.tx, V.q.tx.rsp_cons++);
            errors += p->status == NETIF_RSP_ERROR;
            rsps++;
        }
        done = rsps / (slots + gso);     /* a response per slot, the extra's included */
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&V.q.tx, more);
        if (!more)
            xen_irq_window(200);
    }
    puts("BENCH-END");
    check(done == count && !errors, "bench.tx_all_sent", "%u of %u, %u errors", done, count, errors);
}

/* Count `count` frames of `len` bytes the host injects. */
static void bench_rx(unsigned len, unsigned count)
{
    printf("BENCH-START rx %u %u\n", len, count);
    unsigned got = 0;
    uint16_t fl;
    struct netif_extra_info ex;
    while (got < count) {
        int n = rx_frame(30 * SEC, &fl, &ex);
        if (n < 0)
            break;
        got += n == (int)len;
    }
    puts("BENCH-END");
    check(got == count, "bench.rx_all_received", "%u of %u", got, count);
}

static void bench(void)
{
    char buf[16];
    unsigned count = 2000;
    if (xk_cmdline_value("xk.net_bench_frames", buf, sizeof(buf))) {
        count = 0;
        for (const char *c = buf; *c >= '0' && *c <= '9'; c++)
            count = count * 10 + (unsigned)(*c - '0');
    }
    memset(V.peer, 0xfe, 6);
    rx_nocopy = true;
    bench_tx(64, count);
    bench_tx(1514, count);
    bench_tx(60000, count / 8);
    bench_rx(64, count);
    bench_rx(1514, count);
    bench_rx(60000, count / 8);
}

/* ---- snapshot: a tx frame in flight across a snapshot, then the restored (new) tap ----- */
static void snapshot_run(void)
{
    if (!check(arp(), "snap.arp_before", "no ARP reply"))
        return;
    unsigned len = udp(9990, 100, 9, 1);     /* in flight: pushed and notified, not waited for */
    memcpy(txbuf[1], frame, len);
    grant(REF_TX(1), txbuf[1], true);
    tx_slot(REF_TX(1), 0, (uint16_t)len, 0);
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&V.q.tx, notify);
    if (notify)
        xen_evtchn_send(V.q.port);
    puts("before snapshot");
    outb(XK_SNAPSHOT_PORT, 1);
    puts("after snapshot");
    int16_t st = 99;
    bool got = tx_submit(1, &st);            /* nothing new to push: collects the in-flight response */
    check(got && st == NETIF_RSP_OKAY, "snap.inflight_tx_answered", "got %d status %d", got, st);
    /* the restored vif's tap is a new one: ARP again (a peer attaches to it), then a ping */
    if (!check(arp(), "snap.arp_after", "no ARP reply on the restored tap"))
        return;
    check(ping(), "snap.icmp_after", "no matching reply");
    check(send1(udp(9992, 100, 10, 1), 0) == NETIF_RSP_OKAY, "snap.tx_after", "status");
    puts("NET-DONE");
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_netfront guest");
    if (!xen_init())
        return 1;
    check(xen_map_shared_info() == 0, "shinfo.map", "failed");
    check(xen_setup_upcall(0, true) == 0, "net.upcall", "failed");
    if (!check(xs_init() == 0, "xs.ring", "failed"))
        return 1;
    if (!check(xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN) == 0, "net.grant_frame", "failed"))
        return 1;
    if (!check(find_vif(), "net.found_vif", "no device/vif/0 with a mac"))
        return 1;
    check(read_num(V.be, "feature-rx-copy") == 1 && read_num(V.be, "feature-sg") == 1 &&
          read_num(V.be, "feature-gso-tcpv4") == 1, "net.features", "backend keys");
    check(read_num(V.be, "state") == XenbusStateInitWait, "net.initwait", "%ld", read_num(V.be, "state"));
    if (!check(connect(), "net.connected", "handshake failed"))
        return 1;
    if (xk_cmdline_has("xk.net_bench")) {
        bench();
        return 0;
    }
    if (xk_cmdline_has("xk.net_snapshot")) {
        snapshot_run();
        return 0;
    }
    if (xk_cmdline_has("xk.net_selftest")) {
        selftest();
        return 0;
    }
    if (xk_cmdline_has("xk.net_hostile")) {
        memset(V.peer, 0xfe, 6);
        hostile_tx();
        hostile_rx();
    }
    if (!check(arp(), "net.arp_answered", "no ARP reply"))
        return 1;
    check(ping(), "net.icmp_echo_reply", "no matching reply");
    receive_injected();
    send_sg_csum_gso();
    check(xen_wait_port(V.q.port, 1, 5 * SEC), "net.notified", "no event on port %u", V.q.port);
    if (!xk_cmdline_has("xk.net_hostile"))
        test_multiqueue();
    puts("NET-DONE");
    return 0;
}
