/*
 * snapshot - asks the VMM for a snapshot mid-run and checks that everything it set up
 * before is intact after it.
 *
 * Run with `xenkvm run guests/snapshot.yaml --snapshot-on-port FILE`: the write to
 * XK_SNAPSHOT_PORT snapshots the guest at that instruction and it runs on.  Run again
 * with `xenkvm run --restore FILE`, it resumes right after that write: the checks below
 * must pass in the original run and in every restored one, and a restored run never
 * prints the "before" lines (it did not boot).
 *
 * Checked after the request: RAM written before it (a pattern on every other page of
 * FILL_MIB MiB, the pages between left zero: the RAM file's holes), registers held
 * across the request (r12-r15), an MSR the guest wrote (KERNEL_GS_BASE), the TSC still
 * moving forward, and a periodic LAPIC timer still ticking (the LAPIC, IDT and IF state).
 *
 * Command line: xk.fill_mib=N (default 1; ring 0 is slow on PVM) sizes the pattern (the
 * benchmark's big guests); xk.smp starts the AP with APIC ID 1 counting in a loop before the
 * request, and checks after it that the AP still runs (its count grows) and finishes.
 */
#include "xk.h"

#define FILL_BASE       (16ull << 20)
#define MSR_KERNEL_GS   0xC0000102u
#define GS_VALUE        0xffff8880cafef00dull   /* canonical, or wrmsr faults */
#define TIMER_VECTOR    0xEE
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3E0
#define LVT_PERIODIC    (1u << 17)
#define TICKS_EACH_SIDE 3

static volatile uint32_t ticks;
static volatile uint64_t ap_count;
static volatile uint32_t ap_stop;

static void ap_work(unsigned cpu, uint32_t apic_id)
{
    (void)cpu;
    (void)apic_id;
    while (!__atomic_load_n(&ap_stop, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&ap_count, 1, __ATOMIC_RELAXED);
        cpu_relax();
    }
}

static void on_timer(unsigned vector)
{
    (void)vector;
    ticks++;
    lapic_eoi();
}

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static uint64_t pattern(uint64_t page, uint64_t word)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 0xD1B54A32D192ED03ull;
}

static void fill(uint64_t pages)
{
    for (uint64_t p = 0; p < pages; p += 2) {
        uint64_t *w = (uint64_t *)(uintptr_t)(FILL_BASE + p * 4096);
        for (unsigned i = 0; i < 512; i++)
            w[i] = pattern(p, i);
    }
}

static void check_fill(uint64_t pages)
{
    uint64_t bad = 0, first = ~0ull;
    for (uint64_t p = 0; p < pages; p++) {
        const uint64_t *w = (const uint64_t *)(uintptr_t)(FILL_BASE + p * 4096);
        for (unsigned i = 0; i < 512; i++)
            if (w[i] != (p & 1 ? 0 : pattern(p, i))) {
                bad++;
                if (first == ~0ull)
                    first = p;
                break;
            }
    }
    check(bad == 0, "ram", "%lu of %lu pages differ, the first at page %lu", bad, pages, first);
}

static void wait_ticks(uint32_t n)
{
    uint32_t target = ticks + n;
    while (ticks < target)
        __asm__ volatile("sti; hlt" ::: "memory");
}

static void start_timer(void)
{
    xk_set_irq_handler(TIMER_VECTOR, on_timer);
    lapic_enable();
    lapic_write(LAPIC_TIMER_DCR, 0xA);                  /* divide by 128 */
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LVT_PERIODIC);
    lapic_write(LAPIC_TIMER_ICR, 0x100000);             /* ~134 ms at KVM's 1 GHz APIC bus */
    xk_irq_enable();
}

/* Ask for the snapshot with values in r12-r15 and return what those hold afterwards. */
static void request_snapshot(uint64_t out[4])
{
    register uint64_t r12 __asm__("r12") = 0x1212121212121212ull;
    register uint64_t r13 __asm__("r13") = 0x1313131313131313ull;
    register uint64_t r14 __asm__("r14") = 0x1414141414141414ull;
    register uint64_t r15 __asm__("r15") = 0x1515151515151515ull;
    __asm__ volatile("outb %%al, %w4" : "+r"(r12), "+r"(r13), "+r"(r14), "+r"(r15)
                     : "Nd"(XK_SNAPSHOT_PORT), "a"(1) : "memory");
    out[0] = r12, out[1] = r13, out[2] = r14, out[3] = r15;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    char arg[16];
    uint64_t mib = 1;
    if (xk_cmdline_value("xk.fill_mib", arg, sizeof(arg))) {
        mib = 0;
        for (const char *c = arg; *c >= '0' && *c <= '9'; c++)
            mib = mib * 10 + (uint64_t)(*c - '0');
    }
    uint64_t pages = mib << 8;
    bool smp = xk_cmdline_has("xk.smp");
    puts("before snapshot: filling RAM, starting the timer");
    if (smp)
        lapic_enable();                 /* the IPIs that start the AP need it */
    if (smp && !check(smp_start_ap(1, 1, ap_work), "smp.start", "the AP did not come up"))
        return 1;
    fill(pages);
    wrmsr(MSR_KERNEL_GS, GS_VALUE);
    start_timer();
    wait_ticks(TICKS_EACH_SIDE);
    uint64_t tsc_before = rdtsc();
    uint64_t regs[4];
    request_snapshot(regs);
    uint64_t tsc_after = rdtsc();
    puts("after snapshot");
    check(regs[0] == 0x1212121212121212ull && regs[1] == 0x1313131313131313ull &&
          regs[2] == 0x1414141414141414ull && regs[3] == 0x1515151515151515ull,
          "registers", "r12-r15 = %lx %lx %lx %lx", regs[0], regs[1], regs[2], regs[3]);
    check(tsc_after > tsc_before, "tsc", "TSC went from %lx to %lx", tsc_before, tsc_after);
    check(rdmsr(MSR_KERNEL_GS) == GS_VALUE, "msr", "KERNEL_GS_BASE = %lx", rdmsr(MSR_KERNEL_GS));
    check_fill(pages);
    uint32_t t0 = ticks;
    wait_ticks(TICKS_EACH_SIDE);
    check(ticks >= t0 + TICKS_EACH_SIDE, "timer", "%u ticks after the snapshot", ticks - t0);
    if (smp) {
        uint64_t c0 = ap_count;
        wait_ticks(1);
        uint64_t c1 = ap_count;
        __atomic_store_n(&ap_stop, 1, __ATOMIC_RELEASE);
        bool done = smp_wait_done(2, 20000000u);
        check(c1 > c0 && done, "smp.ap_runs", "AP count %lu -> %lu, done %d", c0, c1, done);
    }
    return 0;
}
