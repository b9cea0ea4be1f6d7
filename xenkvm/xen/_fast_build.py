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

The same headers as the rest of the project are read by the compiler
(``linux/kvm.h``, Xen's ``xen/xen.h`` and ``xen/event_channel.h``), so the
numbers and layouts are checked, not copied.
"""
from __future__ import annotations

from cffi import FFI

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
};

#define XKF_MAX_REGIONS 8

long xkf_run(int vcpu_fd, struct kvm_run *run, struct xkf_domain *d);
uint64_t xkf_sends(struct xkf_domain *d);
void xkf_set_port(struct xkf_domain *d, uint32_t port, int32_t fd);
uint64_t xkf_monotonic_ns(void);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#define __XEN_INTERFACE_VERSION__ 0x00040e00   /* as xen/_abi_build.py: older ones alias the compat calls */
#include <xen/xen.h>
#include <xen/event_channel.h>

#define XKF_MAX_REGIONS 8
#define XKF_EFER_LMA (1ULL << 10)
#define XKF_CR0_PE 1ULL
#define XKF_RFLAGS_VM (1ULL << 17)

struct xkf_region { uint64_t gpa; uint64_t size; uint64_t hva; };

struct xkf_domain {
    uint16_t hcall_port;      /* the port the hypercall stubs and patched sites `out` to */
    uint32_t nports;          /* entries in send_fd and send_ns */
    int32_t *send_fd;         /* per guest port: the eventfd a send signals, or -1 (Python) */
    uint64_t *send_ns;        /* per guest port: CLOCK_MONOTONIC ns of its last send */
    uint32_t nregions;        /* guest RAM (never unmapped while the machine lives) */
    struct xkf_region *regions;
    uint64_t sends;           /* sends completed here (statistics) */
};

_Static_assert(sizeof(evtchn_port_t) == 4, "evtchn_port_t");
_Static_assert(__HYPERVISOR_event_channel_op == 32, "the current event_channel_op, not the compat one");
_Static_assert(offsetof(struct evtchn_send, port) == 0, "evtchn_send.port");

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

/* Complete this exit here if it is an EVTCHNOP_send to a registered port:
   1 if done (RAX set, registers marked dirty), 0 to leave it to Python. */
static int fast_send(int vcpu_fd, struct kvm_run *run, struct xkf_domain *d)
{
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT
        || run->io.port != d->hcall_port || run->io.size != 4 || run->io.count != 1)
        return 0;
    if (!(run->kvm_valid_regs & KVM_SYNC_X86_REGS))
        return 0;
    struct kvm_regs *r = &run->s.regs.regs;
    if ((uint32_t)r->rax != __HYPERVISOR_event_channel_op)
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
    uint64_t cmd = lm ? r->rdi : (uint32_t)r->rbx;
    uint64_t arg = lm ? r->rsi : (uint32_t)r->rcx;
    if (cmd != EVTCHNOP_send)
        return 0;
    struct kvm_translation t;
    memset(&t, 0, sizeof(t));
    t.linear_address = arg;
    if (ioctl(vcpu_fd, KVM_TRANSLATE, &t) < 0 || !t.valid)
        return 0;
    if ((t.physical_address & 0xfff) > 0x1000 - sizeof(evtchn_port_t))
        return 0;                 /* split over two pages: Python walks both */
    const void *p = ram_at(d, t.physical_address, sizeof(evtchn_port_t));
    if (p == NULL)
        return 0;
    evtchn_port_t port;
    memcpy(&port, p, sizeof(port));
    if (port >= d->nports)
        return 0;
    int32_t fd = __atomic_load_n(&d->send_fd[port], __ATOMIC_SEQ_CST);
    if (fd < 0)
        return 0;
    __atomic_store_n(&d->send_ns[port], xkf_monotonic_ns(), __ATOMIC_RELAXED);
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
        return 0;                 /* Python sends it (and sees the error) */
    r->rax = 0;
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    __atomic_fetch_add(&d->sends, 1, __ATOMIC_RELAXED);
    return 1;
}

/* KVM_RUN until an exit Python must see: its exit reason, or -errno. */
long xkf_run(int vcpu_fd, struct kvm_run *run, struct xkf_domain *d)
{
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (!fast_send(vcpu_fd, run, d))
            return run->exit_reason;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("xenkvm.xen._fast_cffi", SOURCE, extra_compile_args=["-O2", "-Wall"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
