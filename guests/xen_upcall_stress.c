/*
 * xen_upcall_stress - no upcall and no LAPIC interrupt may be lost while
 * interrupts fly between two vCPUs and the VMM.
 *
 * Both vCPUs run the same loop at once, each towards the other, in lockstep
 * per round: an event-channel IPI (EVTCHNOP_send on an IPI port of the other
 * vCPU), a notify from the VMM side (the test device's NOTIFY on a port
 * bound to the other vCPU, sent from this vCPU's thread), and with
 * xk.apic=x2apic fixed LAPIC IPIs through the x2APIC ICR, pumped on 16
 * vectors all through the wait; then wait until the round arrived.  A periodic VIRQ_TIMER (3 ms) on each vCPU raises more
 * upcalls from the VMM's I/O thread at times unrelated to the loop.  Every
 * delivery is counted by its receiver; at the end each stream must have
 * delivered exactly what was sent (one pending bit per port, and a round
 * only starts when the previous one arrived, so nothing may coalesce), and
 * no round may have stalled (a lost upcall leaves evtchn_upcall_pending set
 * with no interrupt coming, so all later events on that vCPU stall too).
 *
 * With xk.upcall=global (HVM_PARAM_CALLBACK_IRQ, vector type) the guest
 * never EOIs the callback vector, as Linux does not: the VMM EOIs it on the
 * guest's behalf (xenkvm/xen/upcall.py), which is what this stresses.  The
 * callback vector is 0x50 and the raw IPIs 0xE0-0xEF, a higher priority class,
 * so the IPIs keep arriving while the callback vector is still in service
 * and race the VMM's EOI.
 *
 * Command line: xk.trap=page|direct, xk.upcall=global|percpu,
 * xk.apic=x2apic|xapic (xapic: no raw IPI stream), xk.rounds=N (default 150).
 * The last line before the SUMMARY, "stress: ...", carries the counts for
 * the host-side test (tests/xen/test_upcall_stress.py).
 */
#include "xen_guest.h"
#include "xen_testdev.h"

#define CALLBACK_VECTOR     0x50
#define IPI_VECTOR          0xE0        /* raw IPIs use IPI_VECTOR .. + IPI_VECTORS - 1 */
#define IPI_VECTORS         16
#define APIC_BASE_EXTD      (1ull << 10)
#define MSR_X2APIC_ID       0x802
#define MSR_X2APIC_EOI      0x80B
#define MSR_X2APIC_ICR      0x830
#define ICR_ASSERT          (1u << 14)
#define CPUID1_ECX_X2APIC   (1u << 21)
#define DEFAULT_ROUNDS      150u
#define MAX_ROUNDS          100000u
/* Guest time a round may wait before it counts as a loss.  A lost interrupt stalls forever; a
 * sender's vCPU thread kept off the CPU does not.  With 5 s the rig (one TCG CPU, CI load) once
 * reported a whole round lost on one vCPU, all three streams at once: most likely its sender
 * had not run yet (not established), so the bound is generous. */
#define STALL_NS            30000000000ull
#define PUMP_POLLS          1024u       /* polls of a round that also pump raw IPIs */
#define FINISH_OK           1u
#define FINISH_STALLED      2u
#define TIMER_PERIOD_NS     3000000ull

enum stream { S_XEN_IPI, S_NOTIFY, S_LAPIC, S_COUNT };
static const char *const stream_name[S_COUNT] = { "xen_ipi", "vmm_notify", "lapic_ipi" };

static bool percpu, x2apic;
static uint32_t rounds = DEFAULT_ROUNDS;
static uint32_t x2apic_id[2];

/* [i]: delivered on / sent to cpu i */
static evtchn_port_t ipi_port[2], notify_port[2], timer_port[2];
static uint64_t own_ports[2];   /* ports (all < 64) each CPU handles: the pending words are shared */
static volatile uint32_t got[2][S_COUNT];
static volatile uint32_t sent[2][S_COUNT];
static volatile uint32_t got_vec[2][IPI_VECTORS], sent_vec[2][IPI_VECTORS];
static unsigned pump_next[2];
static volatile uint32_t ticks[2], upcalls[2], stray[2];
static volatile uint32_t stalled_at[2];    /* 1 + the round whose wait ran out; 0: none */
static volatile uint32_t finish_state[2];  /* 0: finishing, FINISH_OK, FINISH_STALLED */
static volatile int32_t notify_err[2];
static struct xk_testdev_cmd notify_cmd[2];

static volatile uint32_t ap_ready, go, finished[2];
static volatile int32_t ap_rc;

/* ---- per-CPU plumbing --------------------------------------------------------------- */
static unsigned this_cpu(void)
{
    if (x2apic)     /* the xAPIC page (xen_cpu's source) is gone in x2APIC mode */
        return (uint32_t)rdmsr(MSR_X2APIC_ID) == x2apic_id[0] ? 0 : 1;
    return xen_cpu();
}

static void eoi(void)
{
    if (x2apic)
        wrmsr(MSR_X2APIC_EOI, 0);
    else
        lapic_eoi();
}

static void enter_x2apic(unsigned cpu)
{
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EXTD);
    x2apic_id[cpu] = (uint32_t)rdmsr(MSR_X2APIC_ID);
}

static inline bool test_and_clear64(volatile uint64_t *w, unsigned bit)
{
    bool old;
    __asm__ volatile("lock btrq %2, %0" : "+m"(*w), "=@ccc"(old) : "r"((uint64_t)bit) : "memory");
    return old;
}

/* ---- interrupt handlers (IF clear) -------------------------------------------------- */
static void on_port(unsigned cpu, evtchn_port_t port)
{
    if (port == ipi_port[cpu])
        xk_fetch_add(&got[cpu][S_XEN_IPI], 1);
    else if (port == notify_port[cpu])
        xk_fetch_add(&got[cpu][S_NOTIFY], 1);
    else if (port == timer_port[cpu])
        xk_fetch_add(&ticks[cpu], 1);
    else
        xk_fetch_add(&stray[cpu], 1);
}

static void upcall(unsigned vector)
{
    (void)vector;
    unsigned cpu = this_cpu();
    xk_fetch_add(&upcalls[cpu], 1);
    struct vcpu_info *vi = xen_vcpu_info(cpu);
    volatile struct shared_info *s = xen_shinfo;
    do {
        __atomic_store_n(&vi->evtchn_upcall_pending, 0, __ATOMIC_SEQ_CST);
        uint64_t sel = __atomic_exchange_n(&vi->evtchn_pending_sel, 0, __ATOMIC_ACQ_REL);
        while (sel) {
            unsigned i = (unsigned)__builtin_ctzll(sel);
            sel &= sel - 1;
            uint64_t bits = s->evtchn_pending[i] & ~s->evtchn_mask[i] & (i ? 0 : own_ports[cpu]);
            while (bits) {
                unsigned b = (unsigned)__builtin_ctzll(bits);
                bits &= bits - 1;
                if (test_and_clear64((volatile uint64_t *)&s->evtchn_pending[i], b))
                    on_port(cpu, i * 64 + b);
            }
        }
    } while (__atomic_load_n(&vi->evtchn_upcall_pending, __ATOMIC_ACQUIRE));
    if (percpu)     /* the global callback vector is never EOIed by the guest (as Linux) */
        eoi();
}

static void lapic_ipi(unsigned vector)
{
    unsigned cpu = this_cpu();
    xk_fetch_add(&got_vec[cpu][vector - IPI_VECTOR], 1);
    xk_fetch_add(&got[cpu][S_LAPIC], 1);
    eoi();
}

/* ---- the loop ------------------------------------------------------------------------ */
/* The raw IPI stream runs free of the rounds and of the receiver: 16 vectors,
 * each sent again as soon as its last one arrived (so none can coalesce), so
 * IPIs keep landing while the receiver is out of KVM_RUN for the VMM's EOI. */
static void lapic_pump(unsigned other)
{
    if (!x2apic)
        return;
    unsigned v = pump_next[other ^ 1]++ % IPI_VECTORS;
    if (__atomic_load_n(&got_vec[other][v], __ATOMIC_ACQUIRE) == sent_vec[other][v]) {
        sent_vec[other][v]++;
        sent[other][S_LAPIC]++;
        wrmsr(MSR_X2APIC_ICR, ((uint64_t)x2apic_id[other] << 32) | ICR_ASSERT | (IPI_VECTOR + v));
    }
}

static uint64_t now_ns(unsigned cpu)
{
    return xen_pvclock_read(&xen_vcpu_info(cpu)->time);
}

/* Wait with interrupts on until *a >= ta and *b >= tb, pumping raw IPIs for a
 * while; false after STALL_NS of guest time (a lost interrupt stalls forever). */
static bool wait_for(unsigned cpu, volatile uint32_t *a, uint32_t ta, volatile uint32_t *b, uint32_t tb, bool pump)
{
    uint64_t start = now_ns(cpu);
    bool ok = false;
    xk_irq_enable();
    for (uint32_t i = 0; !ok; i++) {
        if (pump && i < PUMP_POLLS)
            lapic_pump(cpu ^ 1);
        ok = __atomic_load_n(a, __ATOMIC_ACQUIRE) >= ta && __atomic_load_n(b, __ATOMIC_ACQUIRE) >= tb;
        if (!ok && i % 256 == 255 && now_ns(cpu) - start > STALL_NS)
            break;
        cpu_relax();
    }
    xk_irq_disable();
    return ok;
}

static long periodic_timer(unsigned cpu, uint64_t period_ns)
{
    if (!period_ns)
        return HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, xen_vcpu_id(cpu), NULL);
    struct vcpu_set_periodic_timer t = { .period_ns = period_ns };
    return HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(cpu), &t);
}

static void stress(unsigned cpu)
{
    unsigned other = cpu ^ 1;
    struct xk_testdev_cmd *cmd = &notify_cmd[cpu];
    periodic_timer(cpu, TIMER_PERIOD_NS);
    for (uint32_t r = 0; r < rounds; r++) {
        uint32_t want[S_COUNT];
        xen_evtchn_send(ipi_port[other]);
        want[S_XEN_IPI] = ++sent[other][S_XEN_IPI];
        memset(cmd, 0, sizeof(*cmd));
        cmd->op = XK_TESTDEV_OP_NOTIFY;
        cmd->port = notify_port[other];
        int32_t rc = xk_testdev_run(cmd);
        if (rc && !notify_err[cpu])
            notify_err[cpu] = rc;
        want[S_NOTIFY] = rc ? sent[other][S_NOTIFY] : ++sent[other][S_NOTIFY];
        if (!wait_for(cpu, &got[other][S_XEN_IPI], want[S_XEN_IPI], &got[other][S_NOTIFY], want[S_NOTIFY], true)) {
            stalled_at[cpu] = r + 1;
            break;
        }
    }
    periodic_timer(cpu, 0);
}

/* Neither CPU stops taking interrupts before both loops ended and every raw IPI,
 * either way, arrived. */
static bool finish(unsigned cpu)
{
    unsigned other = cpu ^ 1;
    __atomic_store_n(&finished[cpu], 1, __ATOMIC_RELEASE);
    bool ok = wait_for(cpu, &finished[other], 1, &got[other][S_LAPIC], sent[other][S_LAPIC], false);
    /* the other's pumping has stopped: what it sent here must arrive before IF goes off */
    return wait_for(cpu, &got[cpu][S_LAPIC], sent[cpu][S_LAPIC], &got[cpu][S_LAPIC], 0, false) && ok;
}

/* ---- setup ----------------------------------------------------------------------------- */
static long setup_callback(unsigned cpu)
{
    if (percpu) {
        struct xen_hvm_evtchn_upcall_vector u = { .vcpu = xen_vcpu_id(cpu), .vector = CALLBACK_VECTOR };
        return HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &u);
    }
    if (cpu)
        return 0;   /* one parameter for the whole domain */
    return xen_set_param(HVM_PARAM_CALLBACK_IRQ, ((uint64_t)HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | CALLBACK_VECTOR);
}

static void ap_main(unsigned cpu, uint32_t apic_id)
{
    (void)apic_id;
    xen_cpu_online(cpu);
    lapic_enable();
    long rc = xen_register_vcpu_info(cpu);
    if (!rc)
        rc = setup_callback(cpu);
    if (x2apic)
        enter_x2apic(cpu);
    ap_rc = (int32_t)rc;
    __atomic_store_n(&ap_ready, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        cpu_relax();
    if (!rc)
        stress(cpu);
    __atomic_store_n(&finish_state[cpu], finish(cpu) ? FINISH_OK : FINISH_STALLED, __ATOMIC_RELEASE);
}

static bool start_ap(const struct hvm_start_info *si)
{
    const struct acpi_rsdp *rsdp = acpi_rsdp(si);
    const struct acpi_madt *madt = rsdp ? (const struct acpi_madt *)acpi_find(rsdp, "APIC", true) : NULL;
    uint32_t ids[XK_MAX_CPUS];
    int n = madt ? acpi_madt_cpus(madt, ids, XK_MAX_CPUS) : 0;
    if (!check(n >= 2, "stress.two_vcpus", "%d CPU(s): the stress needs vcpus: 2", n))
        return false;
    uint32_t bsp = lapic_id();
    for (int i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        if (!check(smp_start_ap(ids[i], 1, ap_main), "stress.ap_started", "APIC ID %u did not come up", ids[i]))
            return false;
        return check(xen_wait_count(&ap_ready, 1, XEN_WAIT_POLLS) && ap_rc == 0, "stress.ap_setup",
                     "vcpu_info/callback setup on the AP: %d", (int)ap_rc);
    }
    return false;
}

static bool bind_ports(void)
{
    static struct xk_testdev_cmd alloc;
    for (unsigned cpu = 0; cpu < 2; cpu++) {
        long rc = xen_evtchn_bind_ipi(xen_vcpu_id(cpu), &ipi_port[cpu]);
        if (!check(rc == 0, "stress.bind_ipi", "cpu %u: rc %ld", cpu, rc))
            return false;
        rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(cpu), &timer_port[cpu]);
        if (!check(rc == 0, "stress.bind_virq_timer", "cpu %u: rc %ld", cpu, rc))
            return false;
        memset(&alloc, 0, sizeof(alloc));
        alloc.op = XK_TESTDEV_OP_ALLOC_ECHO;
        int32_t r = xk_testdev_run(&alloc);
        if (!check(r == 0 && alloc.value > 0 && alloc.value < EVTCHN_2L_NR_CHANNELS, "stress.testdev_port",
                   "cpu %u: result %d port %lu", cpu, r, (unsigned long)alloc.value))
            return false;
        notify_port[cpu] = (evtchn_port_t)alloc.value;
        struct evtchn_bind_vcpu bv = { .port = notify_port[cpu], .vcpu = xen_vcpu_id(cpu) };
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_vcpu, &bv);
        if (!check(rc == 0, "stress.bind_vcpu", "port %u to vcpu %u: rc %ld", notify_port[cpu], cpu, rc))
            return false;
    }
    for (unsigned cpu = 0; cpu < 2; cpu++) {
        evtchn_port_t p[3] = { ipi_port[cpu], notify_port[cpu], timer_port[cpu] };
        for (int i = 0; i < 3; i++)
            if (!check(p[i] < 64, "stress.ports_in_word0", "port %u", p[i]))
                return false;
        own_ports[cpu] = (1ull << p[0]) | (1ull << p[1]) | (1ull << p[2]);
    }
    printf("ports: cpu0 ipi %u notify %u timer %u; cpu1 ipi %u notify %u timer %u\n", ipi_port[0],
           notify_port[0], timer_port[0], ipi_port[1], notify_port[1], timer_port[1]);
    return true;
}

static void parse_cmdline(void)
{
    char v[16] = "global";
    xk_cmdline_value("xk.upcall", v, sizeof(v));
    percpu = !strcmp(v, "percpu");
    char apic[16] = "x2apic";
    xk_cmdline_value("xk.apic", apic, sizeof(apic));
    x2apic = strcmp(apic, "xapic") != 0;
    if (xk_cmdline_value("xk.rounds", v, sizeof(v))) {
        uint32_t n = 0;
        for (const char *p = v; *p >= '0' && *p <= '9' && n <= MAX_ROUNDS; p++)
            n = n * 10 + (uint32_t)(*p - '0');
        if (n >= 1 && n <= MAX_ROUNDS)
            rounds = n;
    }
}

static void report(void)
{
    for (unsigned cpu = 0; cpu < 2; cpu++) {
        for (int s = 0; s < S_COUNT; s++) {
            char name[48];
            snprintf(name, sizeof(name), "stress.to_cpu%u.%s", cpu, stream_name[s]);
            bool count_ok = s != S_LAPIC ? sent[cpu][s] == rounds : x2apic ? sent[cpu][s] > 0 : !sent[cpu][s];
            check(got[cpu][s] == sent[cpu][s] && count_ok, name, "received %u of %u sent (%u rounds)",
                  got[cpu][s], sent[cpu][s], rounds);
        }
        check(!stalled_at[cpu], cpu ? "stress.ap_no_stall" : "stress.bsp_no_stall",
              "cpu %u waited in vain in round %u: got xen_ipi %u/%u notify %u/%u lapic %u/%u, pending %u",
              cpu, stalled_at[cpu] - 1, got[cpu ^ 1][0], sent[cpu ^ 1][0], got[cpu ^ 1][1], sent[cpu ^ 1][1],
              got[cpu ^ 1][2], sent[cpu ^ 1][2], xen_vcpu_info(cpu ^ 1)->evtchn_upcall_pending);
        check(!notify_err[cpu], "stress.testdev_notify", "cpu %u: NOTIFY result %d", cpu, notify_err[cpu]);
        check(stray[cpu] == 0, "stress.no_stray", "cpu %u: %u events on unexpected ports", cpu, stray[cpu]);
    }
    printf("stress: mode %s/%s rounds %u", percpu ? "percpu" : "global", x2apic ? "x2apic" : "xapic", rounds);
    for (unsigned cpu = 0; cpu < 2; cpu++) {
        printf(" | cpu%u", cpu);
        for (int s = 0; s < S_COUNT; s++)
            printf(" %s=%u/%u", stream_name[s], got[cpu][s], sent[cpu][s]);
        printf(" timer=%u upcalls=%u", ticks[cpu], upcalls[cpu]);
    }
    printf("\n");
}

int main(const struct hvm_start_info *si)
{
    puts("xenkvm xen_upcall_stress guest");
    parse_cmdline();
    if (!xen_init())
        return 1;
    printf("upcall %s, %s, %u rounds\n", percpu ? "per-vCPU vector" : "global callback vector",
           x2apic ? "x2APIC" : "xAPIC", rounds);
    if (x2apic) {
        uint32_t a, b, c, d;
        cpuid(1, 0, &a, &b, &c, &d);
        if (!check(c & CPUID1_ECX_X2APIC, "stress.x2apic_cpuid", "CPUID.1:ECX %#x has no x2APIC", c))
            return 1;
    }
    long rc = xen_map_shared_info();
    if (!check(rc == 0, "stress.shinfo", "rc %ld", rc))
        return 1;
    rc = xen_register_vcpu_info(0);
    if (!check(rc == 0, "stress.vcpu_info", "rc %ld", rc))
        return 1;
    xk_set_irq_handler(CALLBACK_VECTOR, upcall);
    for (unsigned v = 0; v < IPI_VECTORS; v++)
        xk_set_irq_handler(IPI_VECTOR + v, lapic_ipi);
    lapic_enable();
    rc = setup_callback(0);
    if (!check(rc == 0, "stress.callback", "rc %ld", rc))
        return 1;
    if (!start_ap(si) || !bind_ports())
        return 1;
    if (x2apic)
        enter_x2apic(0);    /* after the AP's INIT/SIPI, which went through the xAPIC page */
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    stress(0);
    check(finish(0), "stress.bsp_finished", "the AP never finished, or the BSP's last IPI never arrived");
    bool ap_done = wait_for(0, &finish_state[1], FINISH_OK, &finish_state[1], 0, false);
    check(ap_done && finish_state[1] == FINISH_OK, "stress.ap_finished",
          "the AP %s", ap_done ? "waited in vain for its last IPI" : "never finished");
    report();
    return 0;
}
