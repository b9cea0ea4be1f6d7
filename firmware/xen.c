/*
 * xen.c - Xen detection, hypercalls, shared_info/vcpu_info/pvclock, event
 * channels (2-level and FIFO) and the console ring for the test guests.
 * See xen_guest.h for the API and the two hypercall trap styles.
 */
#include "xen_guest.h"

struct xen_info xen;

/* The hypercall page (xk.trap=page): the VMM fills it on the MSR write. */
static uint8_t hypercall_page[XEN_PAGE] XEN_PAGE_ALIGNED;

/* ---- detection ---------------------------------------------------------------- */
uint32_t xen_find_base(void)
{
    for (uint32_t base = 0x40000000u; base < 0x40010000u; base += 0x100) {
        uint32_t a, b, c, d;
        cpuid(base, 0, &a, &b, &c, &d);
        if (b == XEN_CPUID_SIGNATURE_EBX && c == XEN_CPUID_SIGNATURE_ECX
            && d == XEN_CPUID_SIGNATURE_EDX && a - base >= 2)
            return base;
    }
    return 0;
}

const char *xen_trap_name(void)
{
    if (xen.trap == XEN_TRAP_PAGE)
        return "hypercall page";
    return xen.amd ? "direct (xen_hypercall_amd: vmmcall)" : "direct (xen_hypercall_intel: vmcall)";
}

static bool cpu_is_amd(void)
{
    uint32_t a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    /* "AuthenticAMD" / "HygonGenuine": EBX "Auth"/"Hygo" */
    return b == 0x68747541u || b == 0x6f677948u;
}

static bool setup_page(void)
{
    if (xen.hcall_pages < 1) {
        fail("xen.hypercall_setup", "CPUID %#x EAX = %u hypercall pages", xen.base + 2, xen.hcall_pages);
        return false;
    }
    uint64_t gpa = (uint64_t)(uintptr_t)hypercall_page;
    wrmsr(xen.hcall_msr, gpa | 0);      /* page index 0 */
    barrier();
    /* the VMM fills every entry; an all-zero first entry means it did not */
    bool filled = false;
    for (unsigned i = 0; i < 32; i++)
        if (((volatile uint8_t *)hypercall_page)[i])
            filled = true;
    if (!filled) {
        fail("xen.hypercall_setup", "hypercall page at %#lx still empty after wrmsr(%#x)",
             gpa, xen.hcall_msr);
        return false;
    }
    return true;
}

bool xen_init(void)
{
    memset(&xen, 0, sizeof(xen));
    xen.base = xen_find_base();
    if (!check(xen.base != 0, "xen.detect", "no XenVMMXenVMM CPUID leaves"))
        return false;
    uint32_t a, b, c, d;
    cpuid(xen.base, 0, &a, &b, &c, &d);
    xen.max_leaf = a;
    cpuid(xen.base + 1, 0, &a, &b, &c, &d);
    xen.major = (uint16_t)(a >> 16);
    xen.minor = (uint16_t)a;
    cpuid(xen.base + 2, 0, &a, &b, &c, &d);
    xen.hcall_pages = a;
    xen.hcall_msr = b;
    if (xen.max_leaf >= xen.base + 4) {
        cpuid(xen.base + 4, 0, &a, &b, &c, &d);
        xen.hvm_flags = a;
    }
    xen.amd = cpu_is_amd();

    char trap[16] = "page";
    xk_cmdline_value("xk.trap", trap, sizeof(trap));
    if (!strcmp(trap, "direct")) {
        xen.trap = XEN_TRAP_DIRECT;
    } else if (!strcmp(trap, "page")) {
        xen.trap = XEN_TRAP_PAGE;
    } else {
        fail("xen.hypercall_setup", "xk.trap=%s: expected page or direct", trap);
        return false;
    }
    printf("Xen %u.%u at CPUID %#x (max %#x), hypercall MSR %#x, hvm flags %#x, trap: %s\n",
           xen.major, xen.minor, xen.base, xen.max_leaf, xen.hcall_msr, xen.hvm_flags, xen_trap_name());
    if (xen.trap == XEN_TRAP_PAGE && !setup_page())
        return false;
    xen.ready = true;
    xen_cpu_online(0);
    /* one harmless call proves the trap works before the tests rely on it */
    long v = HYPERVISOR_xen_version(XENVER_version, NULL);
    xen.ready = check(v > 0, "xen.hypercall_setup", "XENVER_version returned %ld", v);
    return xen.ready;
}

/* ---- hypercalls ---------------------------------------------------------------- */
static void *hcall_target(uint64_t nr)
{
    if (xen.trap == XEN_TRAP_PAGE)
        return nr < XEN_PAGE / 32 ? hypercall_page + nr * 32 : NULL;
    return xen.amd ? (void *)xen_hypercall_amd : (void *)xen_hypercall_intel;
}

void *xen_hypercall_target(uint64_t nr)
{
    return xen.ready ? hcall_target(nr) : NULL;
}

long xen_hypercall(uint64_t nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5)
{
    void *target = xen_hypercall_target(nr);
    if (!target)
        return -XEN_ENOSYS;
    register uint64_t r10 __asm__("r10") = a4;
    register uint64_t r8 __asm__("r8") = a5;
    uint64_t rax = nr;
    __asm__ volatile("call *%[t]"
                     : "+a"(rax), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                     : [t] "r"(target)
                     : "rcx", "r9", "r11", "memory", "cc");
    return (long)rax;
}

long xen_get_param(uint32_t index, uint64_t *value)
{
    struct xen_hvm_param p = { .domid = DOMID_SELF, .index = index };
    long rc = HYPERVISOR_hvm_op(HVMOP_get_param, &p);
    if (!rc && value)
        *value = p.value;
    return rc;
}

long xen_set_param(uint32_t index, uint64_t value)
{
    struct xen_hvm_param p = { .domid = DOMID_SELF, .index = index, .value = value };
    return HYPERVISOR_hvm_op(HVMOP_set_param, &p);
}

long xen_add_to_physmap(unsigned space, uint64_t idx, uint64_t gpfn)
{
    struct xen_add_to_physmap x = { .domid = DOMID_SELF, .size = 0, .space = space, .idx = idx, .gpfn = gpfn };
    return HYPERVISOR_memory_op(XENMEM_add_to_physmap, &x);
}

/* ---- CPUs ---------------------------------------------------------------------- */
static uint8_t apic_to_cpu[256];
static uint32_t vcpu_ids[XK_MAX_CPUS];

void xen_cpu_online(unsigned cpu)
{
    if (cpu >= XK_MAX_CPUS)
        return;
    uint32_t apic = lapic_id();
    apic_to_cpu[apic & 0xFF] = (uint8_t)cpu;
    uint32_t a, b, c, d;
    vcpu_ids[cpu] = apic;
    if (xen.base && xen.max_leaf >= xen.base + 4) {
        cpuid(xen.base + 4, 0, &a, &b, &c, &d);
        if (a & XEN_HVM_CPUID_VCPU_ID_PRESENT)
            vcpu_ids[cpu] = b;
    }
}

unsigned xen_cpu(void)
{
    return apic_to_cpu[lapic_id() & 0xFF];
}

uint32_t xen_vcpu_id(unsigned cpu)
{
    return cpu < XK_MAX_CPUS ? vcpu_ids[cpu] : 0;
}

/* ---- shared info, vcpu_info, pvclock --------------------------------------------- */
struct shared_info *xen_shinfo;
static uint8_t shinfo_page[XEN_PAGE] XEN_PAGE_ALIGNED;
/* vcpu_info slots registered with VCPUOP_register_vcpu_info (64 bytes each) */
static struct vcpu_info vcpu_info_area[XK_MAX_CPUS] __attribute__((aligned(64)));
static bool vcpu_info_registered[XK_MAX_CPUS];

long xen_map_shared_info(void)
{
    uint64_t gpfn = (uint64_t)(uintptr_t)shinfo_page >> 12;
    long rc = xen_add_to_physmap(XENMAPSPACE_shared_info, 0, gpfn);
    if (!rc)
        xen_shinfo = (struct shared_info *)(uintptr_t)shinfo_page;
    return rc;
}

long xen_register_vcpu_info(unsigned cpu)
{
    if (cpu >= XK_MAX_CPUS)
        return -XEN_EINVAL;
    uint64_t gpa = (uint64_t)(uintptr_t)&vcpu_info_area[cpu];
    struct vcpu_register_vcpu_info r = { .mfn = gpa >> 12, .offset = (uint32_t)(gpa & 0xFFF) };
    long rc = HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_info, xen_vcpu_id(cpu), &r);
    if (!rc)
        vcpu_info_registered[cpu] = true;
    return rc;
}

struct vcpu_info *xen_vcpu_info(unsigned cpu)
{
    if (cpu < XK_MAX_CPUS && vcpu_info_registered[cpu])
        return &vcpu_info_area[cpu];
    uint32_t id = xen_vcpu_id(cpu);
    if (!xen_shinfo || id >= XEN_LEGACY_MAX_VCPUS)
        return NULL;
    return &xen_shinfo->vcpu_info[id];
}

uint64_t xen_pvclock_read(const volatile struct vcpu_time_info *t)
{
    for (uint32_t tries = 0; tries < 100000; tries++) {
        uint32_t v = t->version;
        __asm__ volatile("" ::: "memory");
        if (v & 1) {
            cpu_relax();
            continue;
        }
        uint64_t tsc_ts = t->tsc_timestamp, sys = t->system_time;
        uint32_t mul = t->tsc_to_system_mul;
        int8_t shift = t->tsc_shift;
        uint64_t tsc = rdtsc();
        __asm__ volatile("" ::: "memory");
        if (t->version != v)
            continue;
        uint64_t delta = tsc - tsc_ts;
        if ((int64_t)delta < 0)
            delta = 0;
        if (shift < 0)
            delta >>= -shift;
        else
            delta <<= shift;
        return sys + (uint64_t)(((unsigned __int128)delta * mul) >> 32);
    }
    return 0;
}

uint64_t xen_system_time(void)
{
    struct vcpu_info *vi = xen_vcpu_info(xen_cpu());
    return vi ? xen_pvclock_read(&vi->time) : 0;
}

/* ---- event channels --------------------------------------------------------------- */
struct xen_port_stat xen_ports[XEN_MAX_PORTS];
volatile uint32_t xen_upcalls[XK_MAX_CPUS];
volatile uint32_t xen_stray_events;
bool xen_fifo;

/* FIFO: per-CPU control blocks, one event-array page (1024 ports) */
static uint8_t fifo_control[XK_MAX_CPUS][XEN_PAGE] XEN_PAGE_ALIGNED;
static volatile uint32_t fifo_array[XEN_PAGE / 4] XEN_PAGE_ALIGNED;
static uint32_t fifo_head[XK_MAX_CPUS][EVTCHN_FIFO_MAX_QUEUES];
static bool fifo_expanded;

static inline bool test_and_clear_bit64(volatile uint64_t *w, unsigned bit)
{
    bool old;
    __asm__ volatile("lock btrq %2, %0" : "+m"(*w), "=@ccc"(old) : "r"((uint64_t)bit) : "memory");
    return old;
}
static inline void set_bit64(volatile uint64_t *w, unsigned bit)
{
    __asm__ volatile("lock btsq %1, %0" : "+m"(*w) : "r"((uint64_t)bit) : "memory");
}
static inline bool test_and_clear_bit32(volatile uint32_t *w, unsigned bit)
{
    bool old;
    __asm__ volatile("lock btrl %2, %0" : "+m"(*w), "=@ccc"(old) : "r"(bit) : "memory");
    return old;
}
static inline void set_bit32(volatile uint32_t *w, unsigned bit)
{
    __asm__ volatile("lock btsl %1, %0" : "+m"(*w) : "r"(bit) : "memory");
}

static void deliver(evtchn_port_t port, unsigned cpu)
{
    if (port >= XEN_MAX_PORTS) {
        xk_fetch_add(&xen_stray_events, 1);
        return;
    }
    struct xen_port_stat *p = &xen_ports[port];
    p->cpu = cpu;
    p->last_ns = xen_system_time();
    xk_fetch_add(&p->count, 1);
    if (p->fn)
        p->fn(port, cpu);
}

static void l2_handle(unsigned cpu, struct vcpu_info *vi)
{
    volatile struct shared_info *s = xen_shinfo;
    if (!s)
        return;
    uint64_t sel = __atomic_exchange_n(&vi->evtchn_pending_sel, 0, __ATOMIC_ACQ_REL);
    while (sel) {
        unsigned i = (unsigned)__builtin_ctzll(sel);
        sel &= sel - 1;
        uint64_t bits = s->evtchn_pending[i] & ~s->evtchn_mask[i];
        while (bits) {
            unsigned b = (unsigned)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (test_and_clear_bit64((volatile uint64_t *)&s->evtchn_pending[i], b))
                deliver(i * 64 + b, cpu);
        }
    }
}

static inline volatile uint32_t *fifo_word(evtchn_port_t port)
{
    return port < XEN_PAGE / 4 && fifo_expanded ? &fifo_array[port] : NULL;
}

/* Clear LINKED and the link; returns the next port in the queue. */
static uint32_t fifo_clear_linked(volatile uint32_t *w)
{
    uint32_t old = *w, new;
    do {
        new = old & ~((1u << EVTCHN_FIFO_LINKED) | EVTCHN_FIFO_LINK_MASK);
    } while (!__atomic_compare_exchange_n(w, &old, new, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    return old & EVTCHN_FIFO_LINK_MASK;
}

static void fifo_handle(unsigned cpu)
{
    volatile struct evtchn_fifo_control_block *cb = (void *)fifo_control[cpu];
    uint32_t ready = __atomic_exchange_n(&cb->ready, 0, __ATOMIC_ACQ_REL);
    for (unsigned guard = 0; ready && guard < 4 * XEN_MAX_PORTS; guard++) {
        unsigned q = (unsigned)__builtin_ctz(ready);
        uint32_t head = fifo_head[cpu][q];
        if (!head)
            head = cb->head[q];
        volatile uint32_t *w = fifo_word(head);
        if (!head || !w) {
            ready &= ~(1u << q);
            fifo_head[cpu][q] = 0;
        } else {
            uint32_t next = fifo_clear_linked(w);
            if (!next)
                ready &= ~(1u << q);
            fifo_head[cpu][q] = next;
            uint32_t v = *w;
            if ((v & (1u << EVTCHN_FIFO_PENDING)) && !(v & (1u << EVTCHN_FIFO_MASKED))
                && test_and_clear_bit32(w, EVTCHN_FIFO_PENDING))
                deliver(head, cpu);
        }
        ready |= __atomic_exchange_n(&cb->ready, 0, __ATOMIC_ACQ_REL);
    }
}

static void handle_events(unsigned cpu)
{
    struct vcpu_info *vi = xen_vcpu_info(cpu);
    if (!vi)
        return;
    for (int round = 0; round < 8; round++) {
        __atomic_store_n(&vi->evtchn_upcall_pending, 0, __ATOMIC_SEQ_CST);
        if (xen_fifo)
            fifo_handle(cpu);
        else
            l2_handle(cpu, vi);
        if (!__atomic_load_n(&vi->evtchn_upcall_pending, __ATOMIC_ACQUIRE))
            break;
    }
}

static void upcall_irq(unsigned vector)
{
    (void)vector;
    unsigned cpu = xen_cpu();
    xk_fetch_add(&xen_upcalls[cpu], 1);
    handle_events(cpu);
    /* per-vCPU vectors come through the LAPIC as MSIs and need an EOI; with
     * nothing in service (a global callback injected around the LAPIC) the
     * EOI is harmless */
    lapic_eoi();
}

void xen_evtchn_poll(void)
{
    handle_events(xen_cpu());
}

long xen_setup_upcall(unsigned cpu, bool percpu)
{
    xk_set_irq_handler(XEN_UPCALL_VECTOR, upcall_irq);
    lapic_enable();
    if (percpu) {
        struct xen_hvm_evtchn_upcall_vector u = { .vcpu = xen_vcpu_id(cpu), .vector = XEN_UPCALL_VECTOR };
        return HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &u);
    }
    return xen_set_param(HVM_PARAM_CALLBACK_IRQ,
                         ((uint64_t)HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | XEN_UPCALL_VECTOR);
}

long xen_fifo_init_cpu(unsigned cpu)
{
    if (cpu >= XK_MAX_CPUS)
        return -XEN_EINVAL;
    memset(fifo_control[cpu], 0, XEN_PAGE);
    memset(fifo_head[cpu], 0, sizeof(fifo_head[cpu]));
    struct evtchn_init_control c = {
        .control_gfn = (uint64_t)(uintptr_t)fifo_control[cpu] >> 12,
        .offset = 0,
        .vcpu = xen_vcpu_id(cpu),
    };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_init_control, &c);
    if (!rc)
        xen_fifo = true;
    return rc;
}

long xen_fifo_expand(void)
{
    struct evtchn_expand_array e = { .array_gfn = (uint64_t)(uintptr_t)fifo_array >> 12 };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_expand_array, &e);
    if (!rc)
        fifo_expanded = true;
    return rc;
}

void xen_evtchn_mask(evtchn_port_t port)
{
    if (xen_fifo) {
        volatile uint32_t *w = fifo_word(port);
        if (w)
            set_bit32(w, EVTCHN_FIFO_MASKED);
    } else if (xen_shinfo && port < EVTCHN_2L_NR_CHANNELS) {
        set_bit64((volatile uint64_t *)&xen_shinfo->evtchn_mask[port / 64], port % 64);
    }
}

bool xen_evtchn_is_masked(evtchn_port_t port)
{
    if (xen_fifo) {
        volatile uint32_t *w = fifo_word(port);
        return w && (*w & (1u << EVTCHN_FIFO_MASKED));
    }
    return xen_shinfo && port < EVTCHN_2L_NR_CHANNELS
        && ((volatile uint64_t *)xen_shinfo->evtchn_mask)[port / 64] & (1ULL << (port % 64));
}

bool xen_evtchn_is_pending(evtchn_port_t port)
{
    if (xen_fifo) {
        volatile uint32_t *w = fifo_word(port);
        return w && (*w & (1u << EVTCHN_FIFO_PENDING));
    }
    return xen_shinfo && port < EVTCHN_2L_NR_CHANNELS
        && ((volatile uint64_t *)xen_shinfo->evtchn_pending)[port / 64] & (1ULL << (port % 64));
}

void xen_evtchn_clear(evtchn_port_t port)
{
    if (xen_fifo) {
        volatile uint32_t *w = fifo_word(port);
        if (w)
            test_and_clear_bit32(w, EVTCHN_FIFO_PENDING);
    } else if (xen_shinfo && port < EVTCHN_2L_NR_CHANNELS) {
        test_and_clear_bit64((volatile uint64_t *)&xen_shinfo->evtchn_pending[port / 64], port % 64);
    }
}

long xen_evtchn_unmask(evtchn_port_t port)
{
    if (xen_fifo) {
        /* the guest clears MASKED itself; the hypercall relinks a pending event */
        volatile uint32_t *w = fifo_word(port);
        if (w)
            test_and_clear_bit32(w, EVTCHN_FIFO_MASKED);
    }
    struct evtchn_unmask u = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_unmask, &u);
}

long xen_evtchn_send(evtchn_port_t port)
{
    struct evtchn_send s = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &s);
}

long xen_evtchn_close(evtchn_port_t port)
{
    struct evtchn_close c = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_close, &c);
}

long xen_evtchn_alloc_unbound(domid_t remote, evtchn_port_t *port)
{
    struct evtchn_alloc_unbound a = { .dom = DOMID_SELF, .remote_dom = remote };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &a);
    if (!rc)
        *port = a.port;
    return rc;
}

long xen_evtchn_bind_interdomain(domid_t remote_dom, evtchn_port_t remote_port, evtchn_port_t *local)
{
    struct evtchn_bind_interdomain b = { .remote_dom = remote_dom, .remote_port = remote_port };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &b);
    if (!rc)
        *local = b.local_port;
    return rc;
}

long xen_evtchn_bind_virq(uint32_t virq, uint32_t vcpu, evtchn_port_t *port)
{
    struct evtchn_bind_virq b = { .virq = virq, .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &b);
    if (!rc)
        *port = b.port;
    return rc;
}

long xen_evtchn_bind_ipi(uint32_t vcpu, evtchn_port_t *port)
{
    struct evtchn_bind_ipi b = { .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &b);
    if (!rc)
        *port = b.port;
    return rc;
}

bool xen_wait_count(volatile uint32_t *counter, uint32_t target, uint32_t polls)
{
    bool ok = false;
    xk_irq_enable();
    for (uint32_t i = 0; i < polls; i++) {
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target) {
            ok = true;
            break;
        }
        cpu_relax();
    }
    xk_irq_disable();
    return ok || __atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target;
}

bool xen_wait_port(evtchn_port_t port, uint32_t target, uint64_t max_ns)
{
    if (port >= XEN_MAX_PORTS)
        return false;
    volatile uint32_t *counter = &xen_ports[port].count;
    uint64_t end = xen_system_time() + max_ns;
    bool ok = false;
    xk_irq_enable();
    for (uint32_t i = 0; i < XEN_WAIT_POLLS; i++) {
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target) {
            ok = true;
            break;
        }
        if ((i & 63) == 0 && xen_system_time() > end)
            break;
        cpu_relax();
    }
    xk_irq_disable();
    return ok || __atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target;
}

void xen_delay_ns(uint64_t ns)
{
    uint64_t end = xen_system_time() + ns;
    xk_irq_enable();
    for (uint32_t i = 0; i < XEN_WAIT_POLLS; i++) {
        if ((i & 63) == 0 && xen_system_time() > end)
            break;
        cpu_relax();
    }
    xk_irq_disable();
}

void xen_irq_window(uint32_t polls)
{
    xk_irq_enable();
    xk_spin(polls);
    xk_irq_disable();
}

/* ---- console ring ----------------------------------------------------------------- */
static volatile struct xencons_interface *cons_ring;
static evtchn_port_t cons_port;

long xen_console_ring_init(void)
{
    uint64_t pfn = 0, port = 0;
    long rc = xen_get_param(HVM_PARAM_CONSOLE_PFN, &pfn);
    if (rc)
        return rc;
    rc = xen_get_param(HVM_PARAM_CONSOLE_EVTCHN, &port);
    if (rc)
        return rc;
    if (!pfn || pfn >= (1ULL << 20) || !port)
        return -XEN_ENOENT;
    cons_ring = (volatile struct xencons_interface *)(uintptr_t)(pfn << 12);
    cons_port = (evtchn_port_t)port;
    return 0;
}

long xen_console_ring_write(const char *s, size_t n)
{
    if (!cons_ring)
        return -XEN_ENOENT;
    size_t done = 0;
    uint32_t polls = 0;
    while (done < n) {
        XENCONS_RING_IDX cons = cons_ring->out_cons, prod = cons_ring->out_prod;
        __asm__ volatile("" ::: "memory");
        if (prod - cons > sizeof(cons_ring->out))
            return -XEN_EINVAL;             /* the VMM corrupted the indexes */
        if (prod - cons == sizeof(cons_ring->out)) {
            if (++polls > XEN_WAIT_POLLS)
                return -XEN_EBUSY;
            xen_evtchn_send(cons_port);
            cpu_relax();
            continue;
        }
        while (done < n && prod - cons < sizeof(cons_ring->out)) {
            cons_ring->out[MASK_XENCONS_IDX(prod, cons_ring->out)] = s[done++];
            prod++;
        }
        __asm__ volatile("sfence" ::: "memory");
        cons_ring->out_prod = prod;
        long rc = xen_evtchn_send(cons_port);
        if (rc)
            return rc;
    }
    return (long)n;
}
