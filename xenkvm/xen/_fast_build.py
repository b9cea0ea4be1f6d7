"""cffi API-mode build of the hypercall fast path: a vCPU run loop in C.

A guest's ``EVTCHNOP_send`` on a port whose other end is a PV backend of the
VMM is the hottest hypercall of disk and network I/O: one per ring kick.  In
Python each one is an exit handled on the vCPU thread (the GIL, the domain
lock, a KVM_TRANSLATE ioctl, the dispatcher), and then a thread hand-off to the
backend's worker.  ``xkf_run`` keeps such exits in C: it runs KVM_RUN, and
when the exit is a port-trap hypercall (``out %eax, HYPERCALL_PORT``, the
hypercall page's stubs and the patch trap alike) that is an
``EVTCHNOP_send`` from CPL 0 on a port the VMM registered with an eventfd, it
writes that eventfd (waking the backend's worker directly, as KVM_XEN's
in-kernel ``EVTCHNOP_send`` does for its eventfd-bound ports), sets RAX to 0
and re-enters the guest.  Every other exit, and any send it cannot finish
exactly as the Python path would (an argument outside guest RAM, a port not
registered, an unusual CPU mode), returns to Python with KVM's exit intact.

The vCPU's own single-shot Xen timer (``VCPUOP_set_singleshot_timer`` and
``_stop_``, Linux's clockevent: about one per I/O request) is kept in C too
when Python has given the vCPU a timerfd and published the domain's clock
(``xkf_timer_publish``: boot time, time paused, rate; off while paused).  C records the
deadline in ``timer_deadline`` and arms the timerfd for it; the machine's I/O
thread reads the timerfd and raises VIRQ_TIMER after taking the deadline with
a compare-and-swap (``xkf_timer_take``), so a timer re-armed meanwhile is not
fired for the old one.  A deadline already past, a flag it does not know, or
another vCPU's timer is Python's, as before.

The same headers as the rest of the project are read by the compiler
(``linux/kvm.h``, Xen's ``xen/xen.h`` and ``xen/event_channel.h``), so the
numbers and layouts are checked, not copied.
"""
from __future__ import annotations

from cffi import FFI

from xenkvm.xen._abi_build import HELPERS_SRC

CDEF = """
struct kvm_run;
struct xkf_region { uint64_t gpa; uint64_t size; uint64_t hva; };

struct xkf_domain {
    uint16_t hcall_port;
    uint32_t nports;
    int32_t *send_fd;
    uint64_t *send_ns;
    uint32_t nregions;
    struct xkf_region *regions;
    uint64_t sends;
    uint32_t nvcpus;
    int32_t *timer_fd;
    int64_t *timer_deadline;
    uint64_t *timer_gen;
    uint32_t clock_seq;
    uint32_t timer_on;
    int64_t boot_ns;
    int64_t paused_ns;
    int64_t clock_num;
    int64_t clock_den;
    uint64_t timer_ops;
};

#define XKF_MAX_REGIONS 8
#define XKF_NO_DEADLINE ...

long xkf_run(int vcpu_fd, struct kvm_run *run, struct xkf_domain *d, uint32_t vcpu_id);
uint64_t xkf_sends(struct xkf_domain *d);
uint64_t xkf_timer_ops(struct xkf_domain *d);
int xkf_timerfd(void);
int64_t xkf_timer_deadline(struct xkf_domain *d, uint32_t vcpu);
uint64_t xkf_timer_gen(struct xkf_domain *d, uint32_t vcpu);
int xkf_timer_take(struct xkf_domain *d, uint32_t vcpu, int64_t deadline);
void xkf_timer_clear(struct xkf_domain *d, uint32_t vcpu);
int xkf_timer_arm(struct xkf_domain *d, uint32_t vcpu, int64_t deadline);
void xkf_timer_publish(struct xkf_domain *d, uint32_t on, int64_t boot_ns, int64_t paused_ns,
                       int64_t num, int64_t den);
void xkf_set_port(struct xkf_domain *d, uint32_t port, int32_t fd);
uint64_t xkf_monotonic_ns(void);

#define XKD_NPORTS ...
#define XKD_MAX_VCPUS ...
#define XKD_PYTHON ...
#define XKD_POLLERS ...
#define XKD_RAISE ...
#define XKD_KICK ...
struct xkd;
struct xkd_load {
    void *shinfo; uint32_t nvcpus; void *vcpu_info[...]; uint8_t vector[...]; uint8_t port_vcpu[...];
    uint32_t timer_port[...]; uint16_t timer_vcpu[...]; ...;
};
struct xkd *xkd_new(int vm_fd);
void xkd_free(struct xkd *d);
void xkd_hold(struct xkd *d);
void xkd_load(struct xkd *d, const struct xkd_load *l);
void xkd_port_off(struct xkd *d, uint32_t port);
void xkd_pollers(struct xkd *d, int delta);
void xkd_close(struct xkd *d);
int xkd_notify(void *ctx, uint32_t port);
uint64_t xkd_count(struct xkd *d, int which);

#define XKT_EVENT ...
#define XKT_CHECK ...
#define XKT_FIRE ...
#define XKT_ERROR ...
struct xkt {
    struct xkf_domain *d; struct xkd *x; int32_t ctl_fd; int32_t vcpu; int32_t answer; int32_t err;
    uint64_t *fired; ...;
};
int xkt_wait(struct xkt *t);
int xkd_virq_timer(struct xkd *x, struct xkf_domain *d, uint32_t vcpu, int64_t deadline);
"""

SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <linux/kvm.h>
#define __XEN_INTERFACE_VERSION__ 0x00040e00   /* as xen/_abi_build.py: older ones alias the compat calls */
#include <xen/xen.h>
#include <xen/event_channel.h>
#include <xen/vcpu.h>
#ifndef XEN_PAGE_SIZE
#define XEN_PAGE_SIZE 4096
#endif

#define XKF_MAX_REGIONS 8
#define XKF_EFER_LMA (1ULL << 10)
#define XKF_CR0_PE 1ULL
#define XKF_RFLAGS_VM (1ULL << 17)
#define XKF_NO_DEADLINE INT64_MIN

struct xkf_region { uint64_t gpa; uint64_t size; uint64_t hva; };

struct xkf_domain {
    uint16_t hcall_port;      /* the port the hypercall stubs and patched sites `out` to */
    uint32_t nports;          /* entries in send_fd and send_ns */
    int32_t *send_fd;         /* per guest port: the eventfd a send signals, or -1 (Python) */
    uint64_t *send_ns;        /* per guest port: CLOCK_MONOTONIC ns of its last send */
    uint32_t nregions;        /* guest RAM (never unmapped while the machine lives) */
    struct xkf_region *regions;
    uint64_t sends;           /* sends completed here (statistics) */
    uint32_t nvcpus;          /* entries in timer_fd and timer_deadline */
    int32_t *timer_fd;        /* per vCPU: its single-shot timer's timerfd, or -1 (Python's) */
    int64_t *timer_deadline;  /* per vCPU: Xen system time of the timer armed here, or XKF_NO_DEADLINE */
    uint64_t *timer_gen;      /* per vCPU: set/stop calls done here (a timer Python armed before is stale) */
    uint32_t clock_seq;       /* odd while Python rewrites the clock below (a seqcount) */
    uint32_t timer_on;        /* Python's switch: off while the domain's clock is paused */
    int64_t boot_ns;          /* Xen system time = (CLOCK_MONOTONIC - boot_ns) * num / den - paused_ns */
    int64_t paused_ns;        /*   (machine/clock.py GuestClock, xen/domain.py now_ns) */
    int64_t clock_num;
    int64_t clock_den;
    uint64_t timer_ops;       /* timer set/stop calls completed here (statistics) */
};

%HELPERS%
_Static_assert(sizeof(evtchn_port_t) == 4, "evtchn_port_t");
_Static_assert(__HYPERVISOR_event_channel_op == 32, "the current event_channel_op, not the compat one");
_Static_assert(offsetof(struct evtchn_send, port) == 0, "evtchn_send.port");
_Static_assert(__HYPERVISOR_vcpu_op == 24, "vcpu_op");
_Static_assert(sizeof(struct vcpu_set_singleshot_timer) == 16, "vcpu_set_singleshot_timer");

uint64_t xkf_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t xkf_sends(struct xkf_domain *d)
{
    return __atomic_load_n(&d->sends, __ATOMIC_RELAXED);
}

/* Python registers (fd >= 0) or withdraws (-1) a port under the domain lock;
   vCPU threads read the entry without it. */
void xkf_set_port(struct xkf_domain *d, uint32_t port, int32_t fd)
{
    if (port < d->nports)
        __atomic_store_n(&d->send_fd[port], fd, __ATOMIC_SEQ_CST);
}

uint64_t xkf_timer_ops(struct xkf_domain *d)
{
    return __atomic_load_n(&d->timer_ops, __ATOMIC_RELAXED);
}

int xkf_timerfd(void)
{
    return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
}

int64_t xkf_timer_deadline(struct xkf_domain *d, uint32_t vcpu)
{
    return vcpu < d->nvcpus ? __atomic_load_n(&d->timer_deadline[vcpu], __ATOMIC_SEQ_CST)
                            : XKF_NO_DEADLINE;
}

uint64_t xkf_timer_gen(struct xkf_domain *d, uint32_t vcpu)
{
    return vcpu < d->nvcpus ? __atomic_load_n(&d->timer_gen[vcpu], __ATOMIC_SEQ_CST) : 0;
}

/* The I/O thread's claim on an expired timer: 1 if `deadline` was still the
   armed one (it is now disarmed: fire it), 0 if the vCPU re-armed or stopped it. */
int xkf_timer_take(struct xkf_domain *d, uint32_t vcpu, int64_t deadline)
{
    if (vcpu >= d->nvcpus || deadline == XKF_NO_DEADLINE)
        return 0;
    return __atomic_compare_exchange_n(&d->timer_deadline[vcpu], &deadline, XKF_NO_DEADLINE,
                                       0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void timer_disarm(struct xkf_domain *d, uint32_t vcpu)
{
    struct itimerspec off;
    memset(&off, 0, sizeof(off));
    __atomic_store_n(&d->timer_deadline[vcpu], XKF_NO_DEADLINE, __ATOMIC_SEQ_CST);
    if (d->timer_fd[vcpu] >= 0)
        timerfd_settime(d->timer_fd[vcpu], 0, &off, NULL);
}

/* Python arms or stops the timer itself: forget the one armed here (its own vCPU's thread, or
   any thread while the vCPUs are parked). */
void xkf_timer_clear(struct xkf_domain *d, uint32_t vcpu)
{
    if (vcpu < d->nvcpus)
        timer_disarm(d, vcpu);
}

void xkf_timer_publish(struct xkf_domain *d, uint32_t on, int64_t boot_ns, int64_t paused_ns,
                       int64_t num, int64_t den)
{
    __atomic_fetch_add(&d->clock_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->boot_ns, boot_ns, __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->paused_ns, paused_ns, __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->clock_num, num, __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->clock_den, den, __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->timer_on, on && num > 0 && den > 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&d->clock_seq, 1, __ATOMIC_SEQ_CST);
}

/* For `deadline` (Xen system time): now in system time and the host CLOCK_MONOTONIC
   instant it is reached at (rounded up, so that it is due then); 0 if the clock is off. */
static int system_clock(struct xkf_domain *d, int64_t deadline, int64_t *now, uint64_t *host)
{
    for (;;) {
        uint32_t seq = __atomic_load_n(&d->clock_seq, __ATOMIC_SEQ_CST);
        if (seq & 1)
            continue;
        uint32_t on = __atomic_load_n(&d->timer_on, __ATOMIC_SEQ_CST);
        int64_t boot = __atomic_load_n(&d->boot_ns, __ATOMIC_SEQ_CST);
        int64_t paused = __atomic_load_n(&d->paused_ns, __ATOMIC_SEQ_CST);
        int64_t num = __atomic_load_n(&d->clock_num, __ATOMIC_SEQ_CST);
        int64_t den = __atomic_load_n(&d->clock_den, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&d->clock_seq, __ATOMIC_SEQ_CST) != seq)
            continue;
        if (!on)
            return 0;
        __int128 since = (__int128)((int64_t)xkf_monotonic_ns() - boot);
        *now = (int64_t)(since * num / den) - paused;
        __int128 guest = (__int128)deadline + paused;
        *host = (uint64_t)(boot + (int64_t)((guest * den + num - 1) / num));
        return 1;
    }
}

/* The host address of [gpa, gpa+len) if it lies in one RAM region, else NULL. */
static const void *ram_at(const struct xkf_domain *d, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < d->nregions && i < XKF_MAX_REGIONS; i++) {
        const struct xkf_region *r = &d->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return (const void *)(uintptr_t)(r->hva + (gpa - r->gpa));
    }
    return NULL;
}

/* The guest's CPL at the exit, as xen/privilege.py computes it (SS.DPL; 0 in
   real mode); -1 for virtual-8086 mode, which Python answers. */
static int exit_cpl(const struct kvm_sregs *s, uint64_t rflags)
{
    if (rflags & XKF_RFLAGS_VM)
        return -1;
    if (!(s->cr0 & XKF_CR0_PE))
        return 0;
    return s->ss.dpl & 3;
}

/* A hypercall made through the port trap from CPL 0: its number and first three arguments. */
struct xkf_call { uint32_t nr; uint64_t a0, a1, a2; };

/* Decode this exit as a port-trap hypercall: 1 and *c filled, or 0 (not one, or Python's:
   another CPL, v8086, registers not synced). */
static int port_hypercall(int vcpu_fd, struct kvm_run *run, const struct xkf_domain *d,
                          struct xkf_call *c)
{
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT
        || run->io.port != d->hcall_port || run->io.size != 4 || run->io.count != 1)
        return 0;
    if (!(run->kvm_valid_regs & KVM_SYNC_X86_REGS))
        return 0;
    const struct kvm_regs *r = &run->s.regs.regs;
    c->nr = (uint32_t)r->rax;
    if (c->nr != __HYPERVISOR_event_channel_op && c->nr != __HYPERVISOR_vcpu_op)
        return 0;
    struct kvm_sregs own;
    const struct kvm_sregs *s = &run->s.regs.sregs;
    if (!(run->kvm_valid_regs & KVM_SYNC_X86_SREGS)) {
        if (ioctl(vcpu_fd, KVM_GET_SREGS, &own) < 0)
            return 0;
        s = &own;
    }
    if (exit_cpl(s, r->rflags) != 0)
        return 0;                 /* -EPERM (or v8086) is Python's to answer */
    int lm = (s->efer & XKF_EFER_LMA) != 0;
    c->a0 = lm ? r->rdi : (uint32_t)r->rbx;
    c->a1 = lm ? r->rsi : (uint32_t)r->rcx;
    c->a2 = lm ? r->rdx : (uint32_t)r->rdx;
    return 1;
}

/* Copy `len` bytes of the guest's argument at linear address `gva` (not across a page, in
   RAM): 1 if done, 0 to leave the call to Python. */
static int read_arg(int vcpu_fd, const struct xkf_domain *d, uint64_t gva, void *out, uint32_t len)
{
    struct kvm_translation t;
    memset(&t, 0, sizeof(t));
    t.linear_address = gva;
    if (ioctl(vcpu_fd, KVM_TRANSLATE, &t) < 0 || !t.valid)
        return 0;
    if ((t.physical_address & 0xfff) > 0x1000 - len)
        return 0;                 /* split over two pages: Python walks both */
    const void *p = ram_at(d, t.physical_address, len);
    if (p == NULL)
        return 0;
    memcpy(out, p, len);
    return 1;
}

static int complete(struct kvm_run *run, uint64_t result)
{
    run->s.regs.regs.rax = result;
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    return 1;
}

/* Arm `vcpu`'s single-shot timer for `deadline` (Xen system time): its timerfd at the host
   instant the published clock gives.  1 if armed; 0 if the clock is off or the deadline is not
   in the future (it fires at once or is -ETIME: Python's) or the timerfd refused. */
int xkf_timer_arm(struct xkf_domain *d, uint32_t vcpu, int64_t deadline)
{
    int64_t now;
    uint64_t host;
    if (vcpu >= d->nvcpus || d->timer_fd[vcpu] < 0 || !system_clock(d, deadline, &now, &host)
        || deadline <= now)
        return 0;
    struct itimerspec at;
    memset(&at, 0, sizeof(at));
    at.it_value.tv_sec = (time_t)(host / 1000000000ULL);
    at.it_value.tv_nsec = (long)(host % 1000000000ULL);
    __atomic_store_n(&d->timer_deadline[vcpu], deadline, __ATOMIC_SEQ_CST);
    if (timerfd_settime(d->timer_fd[vcpu], TFD_TIMER_ABSTIME, &at, NULL) < 0) {
        __atomic_store_n(&d->timer_deadline[vcpu], XKF_NO_DEADLINE, __ATOMIC_SEQ_CST);
        return 0;
    }
    return 1;
}

/* VCPUOP_{set,stop}_singleshot_timer on the calling vCPU: 1 if done, 0 for Python. */
static int fast_timer(int vcpu_fd, const struct xkf_call *c, struct kvm_run *run,
                      struct xkf_domain *d, uint32_t vcpu_id)
{
    if (c->a1 != vcpu_id || vcpu_id >= d->nvcpus || d->timer_fd[vcpu_id] < 0
        || !__atomic_load_n(&d->timer_on, __ATOMIC_SEQ_CST))
        return 0;                 /* another vCPU's (Python answers), or timers not in C now */
    if (c->a0 == VCPUOP_stop_singleshot_timer) {
        timer_disarm(d, vcpu_id);
    } else if (c->a0 == VCPUOP_set_singleshot_timer) {
        struct vcpu_set_singleshot_timer req;
        if (!read_arg(vcpu_fd, d, c->a2, &req, sizeof(req)))
            return 0;
        if (req.flags & ~VCPU_SSHOTTMR_future)
            return 0;
        if (!xkf_timer_arm(d, vcpu_id, (int64_t)req.timeout_abs_ns))
            return 0;
    } else {
        return 0;
    }
    __atomic_fetch_add(&d->timer_gen[vcpu_id], 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&d->timer_ops, 1, __ATOMIC_RELAXED);
    return complete(run, 0);
}

/* EVTCHNOP_send to a registered port: 1 if done (RAX set, registers marked dirty), 0 for Python. */
static int fast_send(int vcpu_fd, const struct xkf_call *c, struct kvm_run *run, struct xkf_domain *d)
{
    if (c->a0 != EVTCHNOP_send)
        return 0;
    evtchn_port_t port;
    if (!read_arg(vcpu_fd, d, c->a1, &port, sizeof(port)))
        return 0;
    if (port >= d->nports)
        return 0;
    int32_t fd = __atomic_load_n(&d->send_fd[port], __ATOMIC_SEQ_CST);
    if (fd < 0)
        return 0;
    __atomic_store_n(&d->send_ns[port], xkf_monotonic_ns(), __ATOMIC_RELAXED);
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
        return 0;                 /* Python sends it (and sees the error) */
    __atomic_fetch_add(&d->sends, 1, __ATOMIC_RELAXED);
    return complete(run, 0);
}

/*
 * 2-level event delivery from C (xen/evtchn/cdeliver.py): a backend's thread notifies its ring's
 * port without Python.  Xen's evtchn_2l_set_pending (the shared helpers of xen/_abi_build.py)
 * on shared_info and the port's vCPU's vcpu_info, then the vCPU's upcall vector as an MSI.
 * What it needs is loaded by Python under the domain's lock (xkd_load) and withdrawn while a
 * hypercall that may change it runs (xkd_hold); `mu` orders both against a notify in flight.
 * The 2-level rule itself needs no lock against Python's own deliveries: every step is an
 * atomic bit operation on guest memory, as the guest's own are.
 */
#define XKD_NPORTS 4096
#define XKD_MAX_VCPUS 256
#define XKD_PYTHON 1          /* declined: the caller delivers through Python (the reference) */
#define XKD_POLLERS 2         /* delivered; vCPUs wait in SCHEDOP_poll: Python wakes them */
#define XKD_RAISE 4           /* pending and upcall_pending set, KVM refused the MSI: Python raises it */
#define XKD_KICK 8            /* the event reached the vCPU: its poll returns (Python kicks it) */

struct xkd_load {
    void *shinfo;                          /* NULL: not 2-level, or shared_info not mapped */
    uint32_t nvcpus;
    void *vcpu_info[XKD_MAX_VCPUS];        /* NULL: C declines that vCPU */
    uint8_t vector[XKD_MAX_VCPUS];         /* the per-vCPU upcall vector; 0: C declines */
    uint8_t port_vcpu[XKD_NPORTS];         /* the vCPU + 1 a VMM port delivers to; 0: not C's */
    uint32_t timer_port[XKD_MAX_VCPUS];    /* the port each vCPU's VIRQ_TIMER is bound to; 0: none */
    uint16_t timer_vcpu[XKD_MAX_VCPUS];    /*   the vCPU + 1 that port delivers to */
};

struct xkd {
    pthread_mutex_t mu;
    int vm_fd;
    int on;                                /* loaded, and no hypercall that may change it runs */
    int closed;                            /* the VM went: never again */
    int pollers;                           /* vCPU threads in SCHEDOP_poll (Python counts them) */
    uint64_t notifies, upcalls, declined;
    struct xkd_load l;
};

struct xkd *xkd_new(int vm_fd)
{
    struct xkd *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return NULL;
    pthread_mutex_init(&d->mu, NULL);
    d->vm_fd = vm_fd;
    return d;
}

void xkd_free(struct xkd *d)
{
    if (d != NULL) {
        pthread_mutex_destroy(&d->mu);
        free(d);
    }
}

void xkd_hold(struct xkd *d)
{
    pthread_mutex_lock(&d->mu);
    d->on = 0;
    pthread_mutex_unlock(&d->mu);
}

void xkd_load(struct xkd *d, const struct xkd_load *l)
{
    pthread_mutex_lock(&d->mu);
    memcpy(&d->l, l, sizeof(*l));
    if (d->l.nvcpus > XKD_MAX_VCPUS)
        d->l.nvcpus = XKD_MAX_VCPUS;
    d->on = !d->closed;
    pthread_mutex_unlock(&d->mu);
}

void xkd_port_off(struct xkd *d, uint32_t port)
{
    pthread_mutex_lock(&d->mu);
    if (port < XKD_NPORTS)
        d->l.port_vcpu[port] = 0;
    pthread_mutex_unlock(&d->mu);
}

void xkd_pollers(struct xkd *d, int delta)
{
    __atomic_fetch_add(&d->pollers, delta, __ATOMIC_SEQ_CST);
}

/* The VM goes (its fd closes next): never deliver again, and no MSI is in flight after this. */
void xkd_close(struct xkd *d)
{
    pthread_mutex_lock(&d->mu);
    d->on = 0;
    d->closed = 1;
    d->vm_fd = -1;
    pthread_mutex_unlock(&d->mu);
}

uint64_t xkd_count(struct xkd *d, int which)
{
    uint64_t *c = which == 0 ? &d->notifies : which == 1 ? &d->upcalls : &d->declined;
    return __atomic_load_n(c, __ATOMIC_RELAXED);
}

/* Whether C can deliver to vCPU `v` + 1 (0: no vCPU) now (caller holds mu). */
static int xkd_can(const struct xkd *d, uint32_t v)
{
    return d->on && v != 0 && v <= d->l.nvcpus && d->l.shinfo != NULL && d->l.vcpu_info[v - 1] != NULL
           && d->l.vector[v - 1] != 0;
}

static int xkd_deliver(struct xkd *d, uint32_t port, uint32_t v);

/* Signal VMM port `port` as VmmPorts.notify would: 0 if done, else XKD_* bits for the caller
   (with the vCPU in bits 8 and up).  `ctx` is the struct xkd (a backend's C loop calls it).
   Without a VM fd (unit tests' domains) the upcall is XKD_RAISE: Python raises it. */
int xkd_notify(void *ctx, uint32_t port)
{
    struct xkd *d = ctx;
    pthread_mutex_lock(&d->mu);
    uint32_t v = port < XKD_NPORTS ? d->l.port_vcpu[port] : 0;
    if (!xkd_can(d, v)) {
        d->declined++;
        pthread_mutex_unlock(&d->mu);
        return XKD_PYTHON;
    }
    int ret = xkd_deliver(d, port, v - 1);
    pthread_mutex_unlock(&d->mu);
    return ret;
}

/* Set `port` pending for vCPU `v` and raise its upcall (caller holds mu, xkd_can said yes):
   0, or XKD_* bits for Python with the vCPU in bits 8 and up. */
static int xkd_deliver(struct xkd *d, uint32_t port, uint32_t v)
{
    int ret = 0;
    d->notifies++;
    int r = xk_evtchn_2l_set_pending(d->l.shinfo, d->l.vcpu_info[v], port);
    if (r == XK_UPCALL) {
        struct kvm_msi msi;
        memset(&msi, 0, sizeof(msi));
        msi.address_lo = 0xFEE00000u | (v & 0xFFu) << 12;      /* fixed, physical: the vCPU's LAPIC */
        msi.data = d->l.vector[v];
        if (d->vm_fd >= 0 && ioctl(d->vm_fd, KVM_SIGNAL_MSI, &msi) > 0)
            d->upcalls++;
        else
            ret |= XKD_RAISE;
    }
    if (r != XK_2L_WAS_PENDING && __atomic_load_n(&d->pollers, __ATOMIC_SEQ_CST) > 0)
        ret |= XKD_POLLERS | (r >= XK_2L_NO_VCPU_INFO ? XKD_KICK : 0);   /* as Signal.done */
    return ret ? ret | (int)(v << 8) : 0;
}

/*
 * VIRQ_TIMER from C: the timer thread's delivery of an expired single-shot timer C armed.
 * The claim (xkf_timer_take) and the delivery are one step under `mu`, and only while C may
 * deliver (`on`): a snapshot or a hypercall that may change the bindings holds C off
 * (xkd_hold), so a timer is either still armed for Python (which takes and fires it under the
 * domain's lock) or already pending in shared_info, never taken and not yet delivered.
 * -1: declined, nothing taken (Python's look: xen/timers.py _check_fast); 0: fired; 1: the
 * timer was re-armed or stopped meanwhile; else XKD_* bits (fired, Python finishes the upcall).
 */
int xkd_virq_timer(struct xkd *x, struct xkf_domain *d, uint32_t vcpu, int64_t deadline)
{
    pthread_mutex_lock(&x->mu);
    uint32_t port = vcpu < XKD_MAX_VCPUS ? x->l.timer_port[vcpu] : 0;
    uint32_t v = vcpu < XKD_MAX_VCPUS ? x->l.timer_vcpu[vcpu] : 0;
    if (port == 0 || !xkd_can(x, v)) {
        pthread_mutex_unlock(&x->mu);
        return -1;
    }
    if (!xkf_timer_take(d, vcpu, deadline)) {
        pthread_mutex_unlock(&x->mu);
        return 1;
    }
    int ret = xkd_deliver(x, port, v - 1);
    pthread_mutex_unlock(&x->mu);
    return ret;
}

/*
 * The timer thread (xen/timers.py CTimerThread): it sleeps on every vCPU's timerfd and fires
 * VIRQ_TIMER in C when the deadline C armed is due (xkd_virq_timer), so a guest tick costs no
 * Python; it returns to Python only for
 *   XKT_EVENT  ctl_fd is readable (the domain closes);
 *   XKT_CHECK  vCPU `vcpu`'s timer needs Python's look: C delivery declined (FIFO channels,
 *              nothing bound, C held off), or the clock is off or not at the deadline yet;
 *   XKT_FIRE   vCPU `vcpu`'s timer fired here, `answer` (XKD_* bits) left for Python;
 *   XKT_ERROR  poll failed (errno in `err`).
 * Without a struct xkd (`x` NULL) every expiry is XKT_CHECK: Python's own path.
 */
#define XKT_EVENT 0
#define XKT_CHECK 1
#define XKT_FIRE 2
#define XKT_ERROR 3

struct xkt {
    struct xkf_domain *d;
    struct xkd *x;             /* C delivery, or NULL */
    int32_t ctl_fd;
    int32_t vcpu;              /* out: XKT_CHECK's and XKT_FIRE's vCPU */
    int32_t answer;            /* out: XKT_FIRE's XKD_* bits */
    int32_t err;               /* out: XKT_ERROR's errno */
    uint64_t *fired;           /* per vCPU: VIRQ_TIMERs fired here (statistics) */
};

int xkt_wait(struct xkt *t)
{
    struct xkf_domain *d = t->d;
    uint32_t n = d->nvcpus < XKD_MAX_VCPUS ? d->nvcpus : XKD_MAX_VCPUS;
    struct pollfd p[XKD_MAX_VCPUS + 1];
    p[0].fd = t->ctl_fd;
    p[0].events = POLLIN;
    for (uint32_t v = 0; v < n; v++) {
        p[v + 1].fd = d->timer_fd[v];
        p[v + 1].events = POLLIN;
    }
    for (;;) {
        if (poll(p, n + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            t->err = errno;
            return XKT_ERROR;
        }
        if (p[0].revents)
            return XKT_EVENT;
        for (uint32_t v = 0; v < n; v++) {
            if (!p[v + 1].revents)
                continue;
            if (p[v + 1].revents & POLLNVAL) {
                t->err = EBADF;
                return XKT_ERROR;
            }
            uint64_t count;
            if (read(d->timer_fd[v], &count, sizeof(count)) < 0) {
                if (errno == EAGAIN)
                    continue;                     /* re-armed or stopped since it expired */
                t->err = errno;
                return XKT_ERROR;
            }
            int64_t deadline = xkf_timer_deadline(d, v), now;
            uint64_t host;
            if (deadline == XKF_NO_DEADLINE)
                continue;                         /* stopped, or taken: nothing to fire */
            int r = -1;
            if (t->x != NULL && system_clock(d, deadline, &now, &host) && deadline <= now)
                r = xkd_virq_timer(t->x, d, v, deadline);
            t->vcpu = (int32_t)v;
            if (r < 0)
                return XKT_CHECK;
            if (r == 1)
                continue;
            t->fired[v]++;
            if (r != 0) {
                t->answer = r;
                return XKT_FIRE;
            }
        }
    }
}

/* KVM_RUN until an exit Python must see: its exit reason, or -errno. */
long xkf_run(int vcpu_fd, struct kvm_run *run, struct xkf_domain *d, uint32_t vcpu_id)
{
    struct xkf_call c;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (!port_hypercall(vcpu_fd, run, d, &c))
            return run->exit_reason;
        int done = c.nr == __HYPERVISOR_event_channel_op ? fast_send(vcpu_fd, &c, run, d)
                                                          : fast_timer(vcpu_fd, &c, run, d, vcpu_id);
        if (!done)
            return run->exit_reason;
    }
}
"""

SOURCE = SOURCE.replace("%HELPERS%", HELPERS_SRC)     # Xen's delivery rules, the same C as the Xen layer's

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("xenkvm.xen._fast_cffi", SOURCE, extra_compile_args=["-O2", "-Wall"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
