/*
 * xen_guest.h - the Xen side of the xenkvm guest toolkit (guests/xen_*.c).
 *
 * Brings in Xen's public headers (libxen-dev, /usr/include/xen) and adds:
 *   - hypervisor detection (CPUID 0x40000000 + n*0x100, "XenVMMXenVMM");
 *   - hypercalls in two trap styles, chosen by the command line
 *     xk.trap=page (default): the hypercall page, filled by the VMM after a
 *         write of its address to the MSR named by CPUID base+2 EBX;
 *         hypercall N = call page + N*32;
 *     xk.trap=direct: call xen_hypercall_intel (vmcall; ret) or
 *         xen_hypercall_amd (vmmcall; ret) by CPUID vendor, as Linux 6.1 does;
 *         the VMM traps these two functions (hardware breakpoints);
 *     No vmcall/vmmcall exists anywhere else in the image.
 *   - shared_info / vcpu_info / pvclock helpers;
 *   - event channels: per-vCPU (HVMOP_set_evtchn_upcall_vector) or global
 *     (HVM_PARAM_CALLBACK_IRQ vector type) upcalls on XEN_UPCALL_VECTOR,
 *     2-level and FIFO ABIs, per-port counters and handlers;
 *   - the console ring, a xenstore client on the xenstore ring.
 *
 * Ring-0 code may be emulated at ~1.5 M instructions/s in CI: every wait is
 * a bounded number of polls (XEN_WAIT_POLLS), never a wall-clock timeout.
 */
#ifndef XEN_GUEST_H
#define XEN_GUEST_H

#ifndef __XEN_INTERFACE_VERSION__
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#endif

#include "xk.h"

#include <xen/xen.h>
#include <xen/version.h>
#include <xen/features.h>
#include <xen/memory.h>
#include <xen/vcpu.h>
#include <xen/sched.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/params.h>
#include <xen/arch-x86/cpuid.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>

/* The layouts the guests depend on (x86-64 ABI; mirrored in the VMM). */
_Static_assert(sizeof(struct vcpu_time_info) == 32, "vcpu_time_info");
_Static_assert(sizeof(struct vcpu_info) == 64, "vcpu_info");
_Static_assert(__builtin_offsetof(struct shared_info, evtchn_pending) == 0x800, "shared_info.evtchn_pending");
_Static_assert(__builtin_offsetof(struct shared_info, evtchn_mask) == 0xA00, "shared_info.evtchn_mask");
_Static_assert(__builtin_offsetof(struct shared_info, wc_version) == 0xC00, "shared_info.wc");
_Static_assert(sizeof(struct xen_add_to_physmap) == 24, "xen_add_to_physmap");
_Static_assert(sizeof(struct xen_hvm_param) == 16, "xen_hvm_param");
_Static_assert(sizeof(struct vcpu_runstate_info) == 48, "vcpu_runstate_info");
_Static_assert(sizeof(struct evtchn_init_control) == 24, "evtchn_init_control");
_Static_assert(sizeof(struct xencons_interface) == 0xC10, "xencons_interface");
_Static_assert(sizeof(struct xsd_sockmsg) == 16, "xsd_sockmsg");
_Static_assert(sizeof(grant_entry_v1_t) == 8 && sizeof(grant_entry_v2_t) == 16, "grant entries");

/* Linux-style errno values the hypercalls return (negated). */
#define XEN_EPERM       1
#define XEN_EIO         5
#define XEN_ENOENT      2
#define XEN_ESRCH       3
#define XEN_EFAULT      14
#define XEN_EBUSY       16
#define XEN_EEXIST      17
#define XEN_EINVAL      22
#define XEN_ENOSPC      28
#define XEN_ENOSYS      38
#define XEN_ETIME       62
#define XEN_EOPNOTSUPP  95

#define XEN_UPCALL_VECTOR   0xF3
#define XEN_WAIT_POLLS      2000000u    /* upper bound of any busy wait */
#define XEN_MAX_PORTS       1024        /* ports the toolkit tracks */
#define XEN_PAGE            4096

#define XEN_PAGE_ALIGNED __attribute__((aligned(4096)))

enum xen_trap { XEN_TRAP_PAGE, XEN_TRAP_DIRECT };

struct xen_info {
    uint32_t base;              /* CPUID leaf of "XenVMMXenVMM" (0: not Xen) */
    uint32_t max_leaf;
    uint16_t major, minor;      /* CPUID base+1 */
    uint32_t hcall_msr;         /* CPUID base+2 EBX */
    uint32_t hcall_pages;       /* CPUID base+2 EAX */
    uint32_t hvm_flags;         /* CPUID base+4 EAX */
    enum xen_trap trap;
    bool amd;                   /* vendor AuthenticAMD/HygonGenuine: vmmcall */
    bool ready;                 /* hypercalls usable */
};
extern struct xen_info xen;

/* ---- detection and hypercalls (xen.c) ------------------------------------- */
/* Detect Xen, set up the trap style chosen on the command line; PASS/FAIL
 * lines "xen.detect" and "xen.hypercall_setup". Returns xen.ready. */
bool xen_init(void);
uint32_t xen_find_base(void);
/* Raw hypercall: RAX = nr, RDI, RSI, RDX, R10, R8 = a1..a5. Numbers the trap
 * style cannot express (page style: nr >= 128) return -ENOSYS untrapped. */
long xen_hypercall(uint64_t nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
const char *xen_trap_name(void);
/* Where xen_hypercall() calls for `nr` (page stub or direct function); NULL
 * when the trap style cannot express it or Xen is not ready. */
void *xen_hypercall_target(uint64_t nr);

/* The two direct-trap functions (xen_hcall.S). */
void xen_hypercall_intel(void);
void xen_hypercall_amd(void);

static inline long HYPERVISOR_xen_version(int cmd, void *arg)
{ return xen_hypercall(__HYPERVISOR_xen_version, (uint64_t)cmd, (uint64_t)(uintptr_t)arg, 0, 0, 0); }
static inline long HYPERVISOR_memory_op(unsigned cmd, void *arg)
{ return xen_hypercall(__HYPERVISOR_memory_op, cmd, (uint64_t)(uintptr_t)arg, 0, 0, 0); }
static inline long HYPERVISOR_hvm_op(unsigned cmd, void *arg)
{ return xen_hypercall(__HYPERVISOR_hvm_op, cmd, (uint64_t)(uintptr_t)arg, 0, 0, 0); }
static inline long HYPERVISOR_vcpu_op(unsigned cmd, unsigned vcpu, void *arg)
{ return xen_hypercall(__HYPERVISOR_vcpu_op, cmd, vcpu, (uint64_t)(uintptr_t)arg, 0, 0); }
static inline long HYPERVISOR_event_channel_op(unsigned cmd, void *arg)
{ return xen_hypercall(__HYPERVISOR_event_channel_op, cmd, (uint64_t)(uintptr_t)arg, 0, 0, 0); }
static inline long HYPERVISOR_grant_table_op(unsigned cmd, void *arg, unsigned count)
{ return xen_hypercall(__HYPERVISOR_grant_table_op, cmd, (uint64_t)(uintptr_t)arg, count, 0, 0); }
static inline long HYPERVISOR_sched_op(unsigned cmd, void *arg)
{ return xen_hypercall(__HYPERVISOR_sched_op, cmd, (uint64_t)(uintptr_t)arg, 0, 0, 0); }
static inline long HYPERVISOR_console_io(unsigned cmd, unsigned count, const void *buf)
{ return xen_hypercall(__HYPERVISOR_console_io, cmd, count, (uint64_t)(uintptr_t)buf, 0, 0); }
static inline long HYPERVISOR_set_timer_op(uint64_t timeout_ns)
{ return xen_hypercall(__HYPERVISOR_set_timer_op, timeout_ns, 0, 0, 0, 0); }
static inline long HYPERVISOR_vm_assist(unsigned cmd, unsigned type)
{ return xen_hypercall(__HYPERVISOR_vm_assist, cmd, type, 0, 0, 0); }

long xen_get_param(uint32_t index, uint64_t *value);
long xen_set_param(uint32_t index, uint64_t value);
/* XENMEM_add_to_physmap for DOMID_SELF. */
long xen_add_to_physmap(unsigned space, uint64_t idx, uint64_t gpfn);

/* ---- CPUs: Xen vcpu ids and per-CPU state ----------------------------------- */
/* Toolkit CPU index (0 = BSP) of the calling CPU; call xen_cpu_online() first. */
unsigned xen_cpu(void);
/* Record the calling CPU as toolkit index `cpu` and learn its Xen vcpu id
 * (CPUID base+4 EBX when VCPU_ID_PRESENT, else the APIC ID). */
void xen_cpu_online(unsigned cpu);
uint32_t xen_vcpu_id(unsigned cpu);

/* ---- shared info, vcpu_info, time ------------------------------------------ */
extern struct shared_info *xen_shinfo;          /* NULL until mapped */
long xen_map_shared_info(void);                 /* a .bss page, add_to_physmap space 0 */
/* VCPUOP_register_vcpu_info for toolkit CPU `cpu` (a slot in a .bss page). */
long xen_register_vcpu_info(unsigned cpu);
/* The vcpu_info in use for `cpu`: the registered one, else shared_info's slot. */
struct vcpu_info *xen_vcpu_info(unsigned cpu);
/* pvclock system time (ns) from `t`, read consistently (version even). */
uint64_t xen_pvclock_read(const volatile struct vcpu_time_info *t);
uint64_t xen_system_time(void);                 /* the calling CPU's pvclock */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* ---- event channels (xen.c) ------------------------------------------------- */
typedef void (*xen_port_fn)(evtchn_port_t port, unsigned cpu);
struct xen_port_stat {
    volatile uint32_t count;    /* events delivered to the handler */
    volatile uint32_t cpu;      /* toolkit CPU that handled the last one */
    volatile uint64_t last_ns;  /* pvclock time of the last one */
    xen_port_fn fn;             /* optional, runs in the upcall (IF clear) */
};
extern struct xen_port_stat xen_ports[XEN_MAX_PORTS];
extern volatile uint32_t xen_upcalls[XK_MAX_CPUS];     /* upcall interrupts per CPU */
extern volatile uint32_t xen_stray_events;              /* ports >= XEN_MAX_PORTS */
extern bool xen_fifo;                                   /* FIFO ABI active */

/* Install the IDT handler and enable this CPU's LAPIC; then either the per-
 * vCPU upcall vector (HVMOP_set_evtchn_upcall_vector, percpu=true) or the
 * global HVM_PARAM_CALLBACK_IRQ vector (percpu=false). */
long xen_setup_upcall(unsigned cpu, bool percpu);
/* Switch to the FIFO ABI: EVTCHNOP_init_control on each of `ncpus` CPUs'
 * control blocks, then EVTCHNOP_expand_array with one event-array page. */
long xen_fifo_init_cpu(unsigned cpu);
long xen_fifo_expand(void);
void xen_evtchn_mask(evtchn_port_t port);
bool xen_evtchn_is_masked(evtchn_port_t port);
bool xen_evtchn_is_pending(evtchn_port_t port);
void xen_evtchn_clear(evtchn_port_t port);
/* Clear the mask bit through EVTCHNOP_unmask (which redelivers a pending event). */
long xen_evtchn_unmask(evtchn_port_t port);
long xen_evtchn_send(evtchn_port_t port);
long xen_evtchn_close(evtchn_port_t port);
long xen_evtchn_alloc_unbound(domid_t remote, evtchn_port_t *port);
long xen_evtchn_bind_interdomain(domid_t remote_dom, evtchn_port_t remote_port, evtchn_port_t *local);
long xen_evtchn_bind_virq(uint32_t virq, uint32_t vcpu, evtchn_port_t *port);
long xen_evtchn_bind_ipi(uint32_t vcpu, evtchn_port_t *port);
/* Enable interrupts and poll (bounded) until *counter >= target; IF is
 * restored to clear. Returns whether it got there. */
bool xen_wait_count(volatile uint32_t *counter, uint32_t target, uint32_t polls);
/* Same for a port's counter, also giving up after max_ns of pvclock time. */
bool xen_wait_port(evtchn_port_t port, uint32_t target, uint64_t max_ns);
/* Spin with interrupts enabled for `ns` of pvclock time (bounded polls). */
void xen_delay_ns(uint64_t ns);
/* Let pending interrupts in for a short while (a few thousand polls). */
void xen_irq_window(uint32_t polls);
/* Handle pending events on this CPU without an interrupt (tests, polling). */
void xen_evtchn_poll(void);

/* ---- console ring ------------------------------------------------------------- */
/* Map (HVM_PARAM_CONSOLE_PFN/EVTCHN) and write `n` bytes to the out ring,
 * notifying the console port; bounded wait while the ring is full. */
long xen_console_ring_init(void);
long xen_console_ring_write(const char *s, size_t n);

/* ---- xenstore client (xenstore.c) --------------------------------------------- */
struct xs_reply {
    uint32_t type;              /* XS_* (XS_ERROR on error) */
    uint32_t req_id, tx_id;
    uint32_t len;
    char body[XENSTORE_PAYLOAD_MAX + 1];   /* NUL-terminated copy */
};
long xs_init(void);                         /* STORE_PFN / STORE_EVTCHN */
/* Send one request (payload = parts joined with NULs as the wire wants) and
 * wait for its reply (watch events that arrive meanwhile are queued). 0 or
 * a negative errno (-EIO for an XS_ERROR reply, whose text is in r->body). */
long xs_request(uint32_t type, uint32_t tx, const void *payload, uint32_t len, struct xs_reply *r);
long xs_read(uint32_t tx, const char *path, struct xs_reply *r);
long xs_write(uint32_t tx, const char *path, const char *value);
long xs_directory(uint32_t tx, const char *path, struct xs_reply *r);
long xs_watch(const char *path, const char *token);
long xs_unwatch(const char *path, const char *token);
long xs_transaction_start(uint32_t *tx);
long xs_transaction_end(uint32_t tx, bool commit);
long xs_rm(uint32_t tx, const char *path);
/* Next queued or arriving XS_WATCH_EVENT (bounded wait): path and token. */
bool xs_next_watch_event(char *path, size_t psize, char *token, size_t tsize);
/* Whether a watch event is queued or message bytes wait on the ring, now: no
 * waiting.  After a request's reply, an event the request caused is there. */
bool xs_watch_event_ready(void);
extern evtchn_port_t xs_port;
/* The reply to the last request (also for helpers without a reply argument). */
extern const struct xs_reply *xs_last;
extern struct xenstore_domain_interface *xs_ring;

#endif /* XEN_GUEST_H */
