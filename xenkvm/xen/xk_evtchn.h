/*
 * Event delivery in C: Xen's delivery rules, and the notify a PV backend's thread makes
 * without Python.
 *
 * One source for two cffi modules: xen/_abi_build.py (the rules, called by the Python
 * delivery objects in xen/evtchn/) and xen/_fast_build.py (the rules again, and `struct
 * xkd`, the domain's C delivery state with `xkd_notify`).  The includer defines
 * __XEN_INTERFACE_VERSION__ and includes xen/xen.h and xen/event_channel.h first.
 *
 * The rules work on C pointers GuestMemory.cptr() hands out once (shared_info, a
 * vcpu_info, FIFO pages), so an event costs one or two calls instead of one GuestMemory
 * lookup per guest word.  All atomics are seq_cst (lock-prefixed on x86), like Xen's
 * guest_test_and_set_bit & co.
 */
#ifndef XK_EVTCHN_H
#define XK_EVTCHN_H

#include <stddef.h>
#include <stdint.h>

#ifndef XEN_PAGE_SIZE
#define XEN_PAGE_SIZE 4096
#endif

/* How far a delivery went; from XK_2L_NO_VCPU_INFO up the vCPU is to be told. */
enum { XK_2L_WAS_PENDING, XK_2L_MASKED, XK_2L_SEL_WAS_SET, XK_2L_NO_VCPU_INFO,
       XK_UPCALL_WAS_PENDING, XK_UPCALL };
enum { XK_FIFO_WAS_PENDING = 1, XK_FIFO_QUEUE = 2 };
enum { XK_FIFO_EMPTY, XK_FIFO_LINKED, XK_FIFO_GAVE_UP };

#define XK_NR_2L (sizeof(((struct shared_info *)0)->evtchn_pending) * 8)
#define XK_ULONG_BITS (sizeof(xen_ulong_t) * 8)

static inline int xk_tas(xen_ulong_t *map, unsigned nr)
{
    xen_ulong_t m = (xen_ulong_t)1 << (nr % XK_ULONG_BITS);
    return (__atomic_fetch_or(&map[nr / XK_ULONG_BITS], m, __ATOMIC_SEQ_CST) & m) != 0;
}

static inline int xk_test(xen_ulong_t *map, unsigned nr)
{
    return (__atomic_load_n(&map[nr / XK_ULONG_BITS], __ATOMIC_SEQ_CST) >> (nr % XK_ULONG_BITS)) & 1;
}

/* Xen's vcpu_mark_events_pending (common/event_channel.c): set bit 0 of
 * evtchn_upcall_pending; only a 0 -> 1 change interrupts the vCPU. */
static inline int xk_evtchn_mark_upcall(void *vcpu_info)
{
    uint8_t *up = &((struct vcpu_info *)vcpu_info)->evtchn_upcall_pending;
    return (__atomic_fetch_or(up, 1, __ATOMIC_SEQ_CST) & 1) ? XK_UPCALL_WAS_PENDING : XK_UPCALL;
}

/* The second half of the 2-level rule: a newly set bit `word` of the vCPU's
 * evtchn_pending_sel marks the upcall pending; an already set one does nothing. */
static inline int xk_evtchn_2l_set_sel(void *vcpu_info, unsigned word)
{
    struct vcpu_info *vi = vcpu_info;
    if (word >= XK_ULONG_BITS || xk_tas(&vi->evtchn_pending_sel, word))
        return XK_2L_SEL_WAS_SET;
    return xk_evtchn_mark_upcall(vi);
}

/* Xen's evtchn_2l_set_pending (common/event_2l.c), restated: test-and-set the
 * port's bit of shared_info.evtchn_pending; if it was already set, stop.  If
 * the port's evtchn_mask bit is clear, test-and-set bit port / BITS_PER_LONG of
 * the target vCPU's evtchn_pending_sel and, when that bit is new, mark the
 * upcall pending (vcpu_mark_events_pending).  vcpu_info may be NULL (the vCPU
 * has none yet): the caller then waits for resend. */
static inline int xk_evtchn_2l_set_pending(void *shinfo, void *vcpu_info, unsigned port)
{
    struct shared_info *s = shinfo;
    if (port >= XK_NR_2L || xk_tas(s->evtchn_pending, port))
        return XK_2L_WAS_PENDING;
    if (xk_test(s->evtchn_mask, port))
        return XK_2L_MASKED;
    if (!vcpu_info)
        return XK_2L_NO_VCPU_INFO;
    return xk_evtchn_2l_set_sel(vcpu_info, port / XK_ULONG_BITS);
}

#define XK_FIFO_BIT(b) ((uint32_t)1 << (b))

/* Xen's evtchn_fifo_set_pending (common/event_fifo.c), first half: test-and-set
 * PENDING of the port's event word; then, if `queue` (its vCPU has a control
 * block), unless MASKED, test-and-set LINKED: a new LINKED means the port must
 * be appended to its queue.  idx indexes the page's 32-bit words. */
static inline int xk_evtchn_fifo_set_pending(void *page, unsigned idx, int queue)
{
    uint32_t *w = (uint32_t *)page + idx % (XEN_PAGE_SIZE / 4);
    uint32_t bit = XK_FIFO_BIT(EVTCHN_FIFO_PENDING);
    int ret = (__atomic_fetch_or(w, bit, __ATOMIC_SEQ_CST) & bit) ? XK_FIFO_WAS_PENDING : 0;
    if (!queue || (__atomic_load_n(w, __ATOMIC_SEQ_CST) & XK_FIFO_BIT(EVTCHN_FIFO_MASKED)))
        return ret;
    bit = XK_FIFO_BIT(EVTCHN_FIFO_LINKED);
    if (!(__atomic_fetch_or(w, bit, __ATOMIC_SEQ_CST) & bit))
        ret |= XK_FIFO_QUEUE;
    return ret;
}

/* Xen's evtchn_fifo_set_link + the tail handling of evtchn_fifo_set_pending:
 * point the tail's LINK at `port` with a compare-and-swap that only succeeds
 * while the tail is still LINKED (else the guest consumed it: the queue is
 * empty).  When the guest changes the word under us, set BUSY (the guest does
 * not unmask a BUSY word) and retry at most `retries` times; the stored value
 * has BUSY clear.  Gives up (BUSY cleared) if the guest keeps changing it. */
static inline int xk_evtchn_fifo_set_link(void *page, unsigned idx, uint32_t port, int retries)
{
    uint32_t *w = (uint32_t *)page + idx % (XEN_PAGE_SIZE / 4);
    uint32_t linked = XK_FIFO_BIT(EVTCHN_FIFO_LINKED), busy = XK_FIFO_BIT(EVTCHN_FIFO_BUSY);
    uint32_t keep = ~(busy | EVTCHN_FIFO_LINK_MASK);
    uint32_t old = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    if (!(old & linked))
        return XK_FIFO_EMPTY;
    if (__atomic_compare_exchange_n(w, &old, (old & keep) | port, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return XK_FIFO_LINKED;
    __atomic_fetch_or(w, busy, __ATOMIC_SEQ_CST);
    old = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    for (int i = 0; i < retries; i++) {
        if (!(old & linked)) {
            __atomic_fetch_and(w, ~busy, __ATOMIC_SEQ_CST);
            return XK_FIFO_EMPTY;
        }
        if (__atomic_compare_exchange_n(w, &old, (old & keep) | port, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return XK_FIFO_LINKED;
    }
    __atomic_fetch_and(w, ~busy, __ATOMIC_SEQ_CST);
    return XK_FIFO_GAVE_UP;
}

static inline uint32_t xk_or32_at(void *base, size_t off, uint32_t bits)
{
    return __atomic_fetch_or((uint32_t *)((char *)base + off), bits, __ATOMIC_SEQ_CST);
}

static inline uint32_t xk_and32_at(void *base, size_t off, uint32_t bits)
{
    return __atomic_fetch_and((uint32_t *)((char *)base + off), bits, __ATOMIC_SEQ_CST);
}

/* Compare-and-swap of the aligned u32 at base + off: (swapped << 32) | value found. */
static inline uint64_t xk_cmpxchg32_at(void *base, size_t off, uint32_t expected, uint32_t desired)
{
    uint32_t *w = (uint32_t *)((char *)base + off);
    int ok = __atomic_compare_exchange_n(w, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return (uint64_t)ok << 32 | expected;
}

/* ---------------------------------------------------------------------------------------
 * struct xkd: one domain's delivery state for notifies made in C (xen/evtchn/cdeliver.py).
 *
 * A PV backend's thread signals its ring's port with xkd_notify() without the domain's
 * big lock or the GIL.  Python (under the big lock) keeps the state here in step:
 *  - what never changes under a guest's feet but through a hypercall (the ABI, where
 *    shared_info and each vcpu_info are, each vCPU's upcall vector, each VMM port's vCPU
 *    and priority) is loaded by xkd_load(); a hypercall that may change any of it makes
 *    C refuse (`enabled` 0, xkd_hold) until its handler is done and the state reloaded;
 *  - the FIFO queues' private state (each queue's tail, each port's last queue) lives only
 *    here, and every FIFO link, Python's and C's, goes through xkd_fifo_enqueue() under the
 *    mutex, so a notify in C and a hypercall in Python never append to one queue at once.
 * What C cannot do exactly as the Python path would (a port it was not given, a vCPU
 * without vcpu_info or per-vCPU upcall vector, an event-array page not there yet) it does
 * not start: XKD_PYTHON, and the caller takes the Python path.
 *
 * cdef:
 *   #define XKD_MAX_VCPUS ...
 *   #define XKD_NPORTS ...
 *   #define XKD_NR_FIFO ...
 *   #define XKD_PYTHON ...
 *   #define XKD_POLLERS ...
 *   #define XKD_RAISE ...
 *   #define XKD_GAVE_UP ...
 *   #define XKD_FIFO_UPCALL ...
 *   #define XKD_FIFO_GAVE_UP ...
 *   struct xkd_vcpu { void *vcpu_info; uint32_t vector; };
 *   struct xkd_load { int abi; void *shinfo; uint32_t nvcpus; struct xkd_vcpu vcpu[...];
 *                     uint8_t port_ok[...]; uint8_t port_vcpu[...]; uint8_t port_prio[...]; };
 *   struct xkd { int vm_fd; int enabled; int pollers; uint64_t notifies; uint64_t upcalls; ...; };
 *   struct xkd *xkd_new(int vm_fd);
 *   void xkd_free(struct xkd *d);
 *   void xkd_hold(struct xkd *d);
 *   void xkd_load(struct xkd *d, struct xkd_load *l, int enable);
 *   void xkd_close(struct xkd *d);
 *   void xkd_port_off(struct xkd *d, uint32_t port);
 *   void xkd_pollers(struct xkd *d, int delta);
 *   void xkd_fifo_reset(struct xkd *d);
 *   void xkd_fifo_page(struct xkd *d, uint32_t index, void *page);
 *   void xkd_fifo_control(struct xkd *d, uint32_t vcpu, void *control_block);
 *   void xkd_fifo_last(struct xkd *d, uint32_t port, uint32_t *vcpu_prio, int set);
 *   void xkd_fifo_tails(struct xkd *d, uint32_t vcpu, uint32_t *tails, int set);
 *   int xkd_fifo_enqueue(struct xkd *d, uint32_t port, uint32_t vcpu, uint32_t prio);
 *   int xkd_notify(struct xkd *d, uint32_t port);
 * end cdef
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define XKD_MAX_VCPUS 256          /* config.MAX_VCPUS is 255 */
#define XKD_NPORTS 4096            /* the fast path's ports (fastpath.NPORTS) */
#define XKD_NPRIO (EVTCHN_FIFO_PRIORITY_MIN + 1)
#define XKD_FIFO_PAGES (EVTCHN_FIFO_NR_CHANNELS / (XEN_PAGE_SIZE / 4))
#define XKD_NR_FIFO EVTCHN_FIFO_NR_CHANNELS
#define XKD_LINK_RETRIES 4         /* fifo.LINK_RETRIES */
#define XKD_NO_VCPU 0xFFFF

/* xkd_notify's answer: 0, or these bits with the target vCPU in bits 8 and up. */
#define XKD_PYTHON 1        /* nothing was done: take the Python path */
#define XKD_POLLERS 2       /* delivered; a vCPU may be in SCHEDOP_poll: wake the pollers */
#define XKD_RAISE 4         /* delivered, upcall_pending newly set, but the MSI is the caller's
                               (no VM fd, or KVM refused it): Upcalls.raise_(vcpu) */
#define XKD_GAVE_UP 8       /* delivered; the FIFO link gave up (the caller logs it) */
/* xkd_fifo_enqueue's answer bits */
#define XKD_FIFO_UPCALL 1   /* the queue was empty and READY newly set: mark the upcall */
#define XKD_FIFO_GAVE_UP 2  /* the guest kept changing the tail's word (logged by Python) */

enum { XKD_ABI_2L, XKD_ABI_FIFO };

struct xkd_vcpu {
    void *vcpu_info;       /* NULL: none in guest RAM yet (C refuses) */
    uint32_t vector;       /* HVMOP_set_evtchn_upcall_vector's; 0: another callback (C refuses) */
};

struct xkd_load {           /* what xkd_load copies in, built by Python under the big lock */
    int abi;
    void *shinfo;
    uint32_t nvcpus;
    struct xkd_vcpu vcpu[XKD_MAX_VCPUS];
    uint8_t port_ok[XKD_NPORTS];      /* a VMM port bound with a kick eventfd */
    uint8_t port_vcpu[XKD_NPORTS];
    uint8_t port_prio[XKD_NPORTS];
};

struct xkd {
    int vm_fd;              /* KVM_SIGNAL_MSI; -1: the caller raises upcalls (tests) */
    int enabled;            /* under mu: the loaded state is current */
    int pollers;            /* atomic: vCPU threads in SCHEDOP_poll */
    uint64_t notifies;      /* statistics: notifies done here, upcalls injected here */
    uint64_t upcalls;
    uint32_t tails[XKD_MAX_VCPUS][XKD_NPRIO];   /* FIFO: each queue's tail port, 0 = empty */
    pthread_mutex_t mu;
    struct xkd_load l;
    uint32_t *pages[XKD_FIFO_PAGES];           /* FIFO event array, guest RAM */
    uint32_t npages;
    uint32_t *control[XKD_MAX_VCPUS];           /* FIFO control blocks, guest RAM */
    uint16_t last_vcpu[XKD_NR_FIFO];            /* FIFO: the queue each port was last put on */
    uint8_t last_prio[XKD_NR_FIFO];
};

_Static_assert(offsetof(struct evtchn_fifo_control_block, ready) == 0, "ready");
_Static_assert(offsetof(struct evtchn_fifo_control_block, head) == 8, "head");

static inline struct xkd *xkd_new(int vm_fd)
{
    struct xkd *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->vm_fd = vm_fd;
    pthread_mutex_init(&d->mu, NULL);
    memset(d->last_vcpu, 0xff, sizeof(d->last_vcpu));
    return d;
}

static inline void xkd_free(struct xkd *d)
{
    if (d) {
        pthread_mutex_destroy(&d->mu);
        free(d);
    }
}

/* A hypercall that may change what was loaded is running: C refuses until xkd_load. */
static inline void xkd_hold(struct xkd *d)
{
    pthread_mutex_lock(&d->mu);
    d->enabled = 0;
    pthread_mutex_unlock(&d->mu);
}

static inline void xkd_load(struct xkd *d, struct xkd_load *l, int enable)
{
    pthread_mutex_lock(&d->mu);
    if (d->vm_fd != -2) {
        memcpy(&d->l, l, sizeof(*l));
        d->enabled = enable;
    }
    pthread_mutex_unlock(&d->mu);
}

/* The VM is going away: never again (the VM fd is about to be closed). */
static inline void xkd_close(struct xkd *d)
{
    pthread_mutex_lock(&d->mu);
    d->enabled = 0;
    d->vm_fd = -2;
    pthread_mutex_unlock(&d->mu);
}

static inline void xkd_port_off(struct xkd *d, uint32_t port)
{
    pthread_mutex_lock(&d->mu);
    if (port < XKD_NPORTS)
        d->l.port_ok[port] = 0;
    pthread_mutex_unlock(&d->mu);
}

static inline void xkd_pollers(struct xkd *d, int delta)
{
    __atomic_fetch_add(&d->pollers, delta, __ATOMIC_SEQ_CST);
}

/* A new FIFO ABI (EVTCHNOP_init_control from 2-level, or a restore): no pages, no queues. */
static inline void xkd_fifo_reset(struct xkd *d)
{
    pthread_mutex_lock(&d->mu);
    d->npages = 0;
    memset(d->pages, 0, sizeof(d->pages));
    memset(d->control, 0, sizeof(d->control));
    memset(d->tails, 0, sizeof(d->tails));
    memset(d->last_vcpu, 0xff, sizeof(d->last_vcpu));
    memset(d->last_prio, 0, sizeof(d->last_prio));
    pthread_mutex_unlock(&d->mu);
}

/* Event-array page `index` (Python checked it is a whole page of guest RAM, which never
 * leaves); pages are only ever appended. */
static inline void xkd_fifo_page(struct xkd *d, uint32_t index, void *page)
{
    pthread_mutex_lock(&d->mu);
    if (index < XKD_FIFO_PAGES && index == d->npages) {
        d->pages[index] = page;
        d->npages = index + 1;
    }
    pthread_mutex_unlock(&d->mu);
}

static inline void xkd_fifo_control(struct xkd *d, uint32_t vcpu, void *control_block)
{
    pthread_mutex_lock(&d->mu);
    if (vcpu < XKD_MAX_VCPUS)
        d->control[vcpu] = control_block;
    pthread_mutex_unlock(&d->mu);
}

/* A port's last queue, read (set 0) or written (set 1) as {vcpu, prio}; XKD_NO_VCPU: none. */
static inline void xkd_fifo_last(struct xkd *d, uint32_t port, uint32_t *vcpu_prio, int set)
{
    if (port >= XKD_NR_FIFO)
        return;
    pthread_mutex_lock(&d->mu);
    if (set) {
        d->last_vcpu[port] = vcpu_prio[0] < XKD_MAX_VCPUS ? vcpu_prio[0] : XKD_NO_VCPU;
        d->last_prio[port] = vcpu_prio[1] < XKD_NPRIO ? vcpu_prio[1] : 0;
    } else {
        vcpu_prio[0] = d->last_vcpu[port];
        vcpu_prio[1] = d->last_prio[port];
    }
    pthread_mutex_unlock(&d->mu);
}

static inline void xkd_fifo_tails(struct xkd *d, uint32_t vcpu, uint32_t *tails, int set)
{
    if (vcpu >= XKD_MAX_VCPUS)
        return;
    pthread_mutex_lock(&d->mu);
    if (set)
        memcpy(d->tails[vcpu], tails, sizeof(d->tails[vcpu]));
    else
        memcpy(tails, d->tails[vcpu], sizeof(d->tails[vcpu]));
    pthread_mutex_unlock(&d->mu);
}

/* The tail half of Xen's evtchn_fifo_set_pending (common/event_fifo.c) for a port the
 * caller has just made LINKED: "if the port was the tail of its old queue, which the
 * guest has since consumed, that queue is empty"; link it after the tail of its queue
 * (vcpu, prio) if the tail is still LINKED, else write the queue's head; the port is
 * the new tail; on an empty queue set READY's bit, and if that bit is new the vCPU must
 * be told (XKD_FIFO_UPCALL).  Caller holds mu; the vCPU has a control block. */
static int xkd_enqueue_locked(struct xkd *d, uint32_t port, uint32_t v, uint32_t prio)
{
    int ret = 0, linked = 0;
    uint32_t ov = d->last_vcpu[port], op = d->last_prio[port];
    if (ov < XKD_MAX_VCPUS && op < XKD_NPRIO && d->tails[ov][op] == port)
        d->tails[ov][op] = 0;
    d->last_vcpu[port] = v;
    d->last_prio[port] = prio;
    uint32_t tail = d->tails[v][prio];
    if (tail && tail / (XEN_PAGE_SIZE / 4) < d->npages) {
        int c = xk_evtchn_fifo_set_link(d->pages[tail / (XEN_PAGE_SIZE / 4)], tail % (XEN_PAGE_SIZE / 4),
                                        port, XKD_LINK_RETRIES);
        if (c == XK_FIFO_GAVE_UP)
            ret |= XKD_FIFO_GAVE_UP;
        linked = c != XK_FIFO_EMPTY;
    }
    d->tails[v][prio] = port;
    if (linked)
        return ret;
    struct evtchn_fifo_control_block *cb = (void *)d->control[v];
    __atomic_store_n(&cb->head[prio], port, __ATOMIC_SEQ_CST);
    uint32_t bit = (uint32_t)1 << prio;
    if (!(__atomic_fetch_or(&cb->ready, bit, __ATOMIC_SEQ_CST) & bit))
        ret |= XKD_FIFO_UPCALL;
    return ret;
}

/* Python's FIFO append (fifo.Fifo._enqueue), under the same mutex as C's notifies. */
static inline int xkd_fifo_enqueue(struct xkd *d, uint32_t port, uint32_t vcpu, uint32_t prio)
{
    int ret = 0;
    if (port >= XKD_NR_FIFO || vcpu >= XKD_MAX_VCPUS || prio >= XKD_NPRIO)
        return 0;
    pthread_mutex_lock(&d->mu);
    if (d->control[vcpu])
        ret = xkd_enqueue_locked(d, port, vcpu, prio);
    pthread_mutex_unlock(&d->mu);
    return ret;
}

/* Set `port` pending by the loaded ABI's rule (caller holds mu, d->enabled).  Returns
 * XKD_PYTHON when C must not, else bit 0 of *newly: newly pending, bit 1: the vCPU is to be
 * told (2-level: its selector bit is new; FIFO: READY is new), bit 2: upcall_pending went
 * 0 -> 1 (the interrupt is due), bit 3: the FIFO link gave up. */
static int xkd_set_pending_locked(struct xkd *d, uint32_t port, uint32_t v, void *vi, int *how)
{
    if (d->l.abi == XKD_ABI_2L) {
        if (!d->l.shinfo)
            return XKD_PYTHON;
        int c = xk_evtchn_2l_set_pending(d->l.shinfo, vi, port);
        *how = (c != XK_2L_WAS_PENDING) | (c >= XK_2L_NO_VCPU_INFO) << 1 | (c == XK_UPCALL) << 2;
        return 0;
    }
    uint32_t page = port / (XEN_PAGE_SIZE / 4);
    if (page >= d->npages || !d->control[v])
        return XKD_PYTHON;                      /* saved_pending and resend are Python's */
    int c = xk_evtchn_fifo_set_pending(d->pages[page], port % (XEN_PAGE_SIZE / 4), 1);
    *how = !(c & XK_FIFO_WAS_PENDING);
    if (c & XK_FIFO_QUEUE) {
        int q = xkd_enqueue_locked(d, port, v, d->l.port_prio[port]);
        if (q & XKD_FIFO_GAVE_UP)
            *how |= 8;
        if (q & XKD_FIFO_UPCALL)
            *how |= 2 | (xk_evtchn_mark_upcall(vi) == XK_UPCALL) << 2;
    }
    return 0;
}

/* EVTCHNOP_send from domain 0 on a VMM port, as VmmPorts.notify does it: the port made
 * pending, and the upcall (Xen's vcpu_mark_events_pending) as an MSI of the vCPU's upcall
 * vector, KVM_SIGNAL_MSI on the VM fd, which KVM takes from any thread.  0 when done;
 * else the XKD_* bits with the vCPU in bits 8 and up: XKD_PYTHON (nothing done),
 * XKD_POLLERS (a vCPU polls: wake the pollers), XKD_RAISE (the MSI is the caller's:
 * no VM fd, or KVM refused it, e.g. a LAPIC not yet enabled), XKD_GAVE_UP. */
static inline int xkd_notify(struct xkd *d, uint32_t port)
{
    int how = 0, ret;
    if (port >= XKD_NPORTS)
        return XKD_PYTHON;
    pthread_mutex_lock(&d->mu);
    uint32_t v = d->l.port_vcpu[port];
    if (!d->enabled || !d->l.port_ok[port] || v >= d->l.nvcpus || v >= XKD_MAX_VCPUS
            || !d->l.vcpu[v].vcpu_info || !d->l.vcpu[v].vector) {
        pthread_mutex_unlock(&d->mu);
        return XKD_PYTHON;
    }
    uint32_t vector = d->l.vcpu[v].vector;
    int vm_fd = d->vm_fd;
    ret = xkd_set_pending_locked(d, port, v, d->l.vcpu[v].vcpu_info, &how);
    if (!ret)
        d->notifies++;
    pthread_mutex_unlock(&d->mu);
    if (ret)
        return ret;
    if (how & 4) {
        struct kvm_msi msi = { .address_lo = 0xFEE00000u | (v & 0xFF) << 12, .data = vector & 0xFF };
        if (vm_fd >= 0 && ioctl(vm_fd, KVM_SIGNAL_MSI, &msi) > 0)
            __atomic_fetch_add(&d->upcalls, 1, __ATOMIC_RELAXED);
        else
            ret |= XKD_RAISE;
    }
    /* Pollers (poll.py) count themselves in before they look at their ports: either they
     * see this port pending, or this load sees them. */
    if ((how & 3) && __atomic_load_n(&d->pollers, __ATOMIC_SEQ_CST) > 0)
        ret |= XKD_POLLERS;
    if (how & 8)
        ret |= XKD_GAVE_UP;
    return ret ? ret | (int)(v << 8) : 0;
}

#endif /* XK_EVTCHN_H */
