/*
 * lapic.c - the xAPIC at XK_LAPIC_BASE and starting application processors
 * with INIT / SIPI / SIPI through the ICR.
 *
 * APs are started one at a time: the BSP patches the trampoline's parameter
 * block (CR3, stack, entry, cpu index), sends the IPIs and waits, with a
 * bounded busy loop, until the AP has announced itself before touching the
 * parameter block again.
 */
#include "xk.h"

#define ICR_DELIVERY_PENDING   (1u << 12)
#define ICR_LEVEL_ASSERT       (1u << 14)
#define ICR_TRIGGER_LEVEL      (1u << 15)
#define ICR_MODE_INIT          (5u << 8)
#define ICR_MODE_STARTUP       (6u << 8)

/* Loop bounds. Ring-0 code may be emulated at ~1.5 M instructions/s in CI,
 * so these are iteration counts, never wall time, and kept small. */
#define IPI_IDLE_WAIT          200000u     /* ICR delivery-status polls */
#define INIT_SETTLE            20000u      /* pause loops after INIT */
#define SIPI_SETTLE            4000u       /* pause loops after each SIPI */
#define AP_ARRIVAL_WAIT        2000000u    /* polls for the AP's announcement */

extern const char xk_ap_tramp_start[], xk_ap_tramp_end[];
extern uint64_t xk_ap_tramp_cr3, xk_ap_tramp_stack, xk_ap_tramp_entry, xk_ap_tramp_arg;
extern const char xk_ap_entry64[];
void xk_cpu_init(unsigned cpu);

struct xk_cpu xk_cpus[XK_MAX_CPUS];
volatile uint32_t xk_cpus_online = 1;          /* the BSP */

static uint8_t ap_stacks[XK_MAX_CPUS][XK_STACK_SIZE] __attribute__((aligned(16)));
static xk_ap_fn volatile ap_fns[XK_MAX_CPUS];

static inline volatile uint32_t *lapic_reg(uint32_t reg)
{
    return (volatile uint32_t *)(uintptr_t)(XK_LAPIC_BASE + reg);
}

uint32_t lapic_read(uint32_t reg) { return *lapic_reg(reg); }
void lapic_write(uint32_t reg, uint32_t v) { *lapic_reg(reg) = v; }

void lapic_enable(void)
{
    uint64_t base = rdmsr(MSR_APIC_BASE);
    if (!(base & (1u << 11)))
        wrmsr(MSR_APIC_BASE, base | (1u << 11));    /* xAPIC global enable */
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100 | 0xFF);
}

uint32_t lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

uint32_t cpuid_apic_id(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    return b >> 24;
}

static bool icr_idle(void)
{
    for (uint32_t i = 0; i < IPI_IDLE_WAIT; i++) {
        if (!(lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING))
            return true;
        cpu_relax();
    }
    return false;
}

bool lapic_send_ipi(uint32_t dest, uint32_t icr_low)
{
    if (!icr_idle())
        return false;
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, icr_low);
    return icr_idle();
}

/* C entry of an AP (from xk_ap_entry64 in start.S) */
XK_NORETURN void xk_ap_entry(unsigned cpu);
void xk_ap_entry(unsigned cpu)
{
    xk_cpu_init(cpu);
    struct xk_cpu *me = &xk_cpus[cpu];
    me->apic_id = lapic_id();
    me->cpuid_apic_id = cpuid_apic_id();
    xk_fetch_add(&xk_cpus_online, 1);
    __atomic_store_n(&me->online, 1, __ATOMIC_RELEASE);
    xk_ap_fn fn = ap_fns[cpu];
    if (fn)
        fn(cpu, me->apic_id);
    __atomic_store_n(&me->done, 1, __ATOMIC_RELEASE);
    xk_halt_forever();
}

bool smp_start_ap(uint32_t apic_id, unsigned cpu, xk_ap_fn fn)
{
    if (cpu == 0 || cpu >= XK_MAX_CPUS || apic_id > 0xFF)
        return false;
    size_t size = (size_t)(xk_ap_tramp_end - xk_ap_tramp_start);
    uint8_t *tramp = (uint8_t *)(uintptr_t)XK_AP_TRAMPOLINE_ADDR;
    memcpy(tramp, xk_ap_tramp_start, size);

#define PARAM(sym) (*(volatile uint64_t *)(tramp + ((const char *)&(sym) - xk_ap_tramp_start)))
    PARAM(xk_ap_tramp_cr3) = read_cr3();
    PARAM(xk_ap_tramp_stack) = (uint64_t)(uintptr_t)&ap_stacks[cpu][XK_STACK_SIZE];
    PARAM(xk_ap_tramp_entry) = (uint64_t)(uintptr_t)xk_ap_entry64;
    PARAM(xk_ap_tramp_arg) = cpu;
#undef PARAM
    ap_fns[cpu] = fn;
    xk_cpus[cpu].online = 0;
    xk_cpus[cpu].done = 0;
    __asm__ volatile("mfence" ::: "memory");

    uint32_t vector = XK_AP_TRAMPOLINE_ADDR >> 12;
    if (!lapic_send_ipi(apic_id, ICR_MODE_INIT | ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL))
        return false;
    xk_spin(INIT_SETTLE);
    for (int i = 0; i < 2; i++) {
        if (__atomic_load_n(&xk_cpus[cpu].online, __ATOMIC_ACQUIRE))
            break;
        if (!lapic_send_ipi(apic_id, ICR_MODE_STARTUP | vector))
            return false;
        xk_spin(SIPI_SETTLE);
    }
    for (uint32_t i = 0; i < AP_ARRIVAL_WAIT; i++) {
        if (__atomic_load_n(&xk_cpus[cpu].online, __ATOMIC_ACQUIRE))
            return true;
        cpu_relax();
    }
    return false;
}

bool smp_wait_done(unsigned ncpus, uint32_t max_iterations)
{
    for (uint32_t i = 0; i < max_iterations; i++) {
        unsigned done = 0;
        for (unsigned c = 1; c < ncpus && c < XK_MAX_CPUS; c++)
            if (!xk_cpus[c].online || __atomic_load_n(&xk_cpus[c].done, __ATOMIC_ACQUIRE))
                done++;
        if (done + 1 >= ncpus)
            return true;
        cpu_relax();
    }
    return false;
}
