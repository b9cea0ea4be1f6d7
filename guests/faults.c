/*
 * faults.c - exceptions raised by instructions the host refuses are the guest's.
 *
 * On PVM hosts ring-0 x87/SSE/popcnt instructions are refused by KVM's emulator
 * and completed by the VMM (xenkvm/machine/gaps.py). When such an instruction
 * faults, the guest must get the exception a CPU raises (vector, error code,
 * CR2) in its own handler and go on; on hardware KVM the CPU raises it itself.
 * Each case installs a handler, runs one faulting instruction, checks what the
 * handler saw, and resumes after the instruction.
 *
 * Command line: `faults` runs every case; `xk.halt=cli` instead ends with
 * cli; hlt (a guest that stops for good), `xk.halt=sti` with sti; hlt and a
 * LAPIC timer due in a few hundred ms that then powers off.
 */
#include "xk.h"

#define X86_CR0_TS (1ul << 3)

struct seen {
    uint64_t vector, error, cr2, rip;
    unsigned hits;
};

static volatile struct seen seen;
static volatile uint64_t resume_at;

static bool on_fault(struct xk_frame *f)
{
    seen.vector = f->vector;
    seen.error = f->error;
    seen.cr2 = read_cr2();
    seen.rip = f->rip;
    seen.hits++;
    if (!resume_at)
        return false;
    f->rip = resume_at;
    resume_at = 0;
    return true;
}

/* Run one instruction `insn` (operand: %rbx = addr), recording its address
 * in *at and resuming after it if it faults. */
#define TRY(insn, addr, at)                                                   \
    do {                                                                      \
        seen.hits = 0;                                                        \
        seen.vector = ~0ul;                                                   \
        __asm__ volatile("lea 2f(%%rip), %%rax\n\t"                           \
                         "mov %%rax, %0\n\t"                                  \
                         "lea 1f(%%rip), %%rax\n\t"                           \
                         "mov %%rax, %1\n\t"                                  \
                         "1: " insn "\n\t"                                    \
                         "2:\n\t"                                             \
                         : "=m"(resume_at), "=m"(*(at))                       \
                         : "b"(addr)                                          \
                         : "rax", "rcx", "memory");                           \
    } while (0)

static void expect(const char *name, uint64_t vector, uint64_t error, uint64_t at)
{
    check(seen.hits == 1 && seen.vector == vector && seen.error == error && seen.rip == at, name,
          "hits=%u vector=%lu err=%#lx rip=%#lx (want vector %lu err %#lx rip %#lx)",
          seen.hits, seen.vector, seen.error, seen.rip, vector, error, at);
}

/* A 2 MiB page of RAM the guest does not otherwise use, made read-only for one case. */
#define RO_ADDR 0x3000000ul

/* The page-directory entry mapping `va` in the toolkit's identity map (2 MiB pages). */
static volatile uint64_t *pd_entry(uint64_t va)
{
    uint64_t *pml4 = (uint64_t *)(uintptr_t)(read_cr3() & ~0xFFFul);
    uint64_t *pdpt = (uint64_t *)(uintptr_t)(pml4[(va >> 39) & 511] & 0x000FFFFFFFFFF000ul);
    uint64_t *pd = (uint64_t *)(uintptr_t)(pdpt[(va >> 30) & 511] & 0x000FFFFFFFFFF000ul);
    return &pd[(va >> 21) & 511];
}

/* noinline: guests/check-insns.sh lets only this function use x87/SSE */
__attribute__((noinline)) static void fault_cases(void)
{
    static const unsigned vectors[] = { 6, 7, 13, 14 };
    for (unsigned i = 0; i < XK_ARRAY_SIZE(vectors); i++)
        xk_set_exception_handler(vectors[i], on_fault);
    uint64_t at;

    /* #NM: an x87 instruction with CR0.TS set */
    __asm__ volatile("mov %%cr0, %%rax; or %0, %%rax; mov %%rax, %%cr0" :: "i"(X86_CR0_TS) : "rax");
    TRY(".byte 0xd9, 0xd0", 0ul, &at);                 /* fnop */
    __asm__ volatile("clts");
    expect("nm-fnop-ts", 7, 0, at);

    /* #UD: an SSE instruction with CR4.OSFXSR clear (the toolkit never sets it) */
    TRY(".byte 0x0f, 0x28, 0xc1", 0ul, &at);          /* movaps %xmm1, %xmm0 */
    expect("ud-sse-no-osfxsr", 6, 0, at);

    /* #GP(0): a memory operand at a non-canonical address */
    TRY("popcnt (%%rbx), %%rcx", 0x8000000000000000ul, &at);
    expect("gp-noncanonical", 13, 0, at);

    /* #PF, read of a page that is not present (above the 4 GiB identity map) */
    uint64_t addr = 0x0000100000000123ul;
    TRY("popcnt (%%rbx), %%rcx", addr, &at);
    expect("pf-read-not-present", 14, 0, at);
    check(seen.cr2 == addr, "pf-read-cr2", "cr2=%#lx want %#lx", seen.cr2, addr);

    /* #PF, write (x87 store) to a page that is not present: W in the error code */
    addr = 0x0000200000000ff0ul;
    TRY(".byte 0xd9, 0x3b", addr, &at);                /* fnstcw (%rbx) */
    expect("pf-write-not-present", 14, 2, at);
    check(seen.cr2 == addr, "pf-write-cr2", "cr2=%#lx want %#lx", seen.cr2, addr);

    /* #PF, write to a present read-only page (CR0.WP is set): P and W in the error code */
    volatile uint64_t *pd = pd_entry(RO_ADDR);
    *pd &= ~2ul;
    __asm__ volatile("invlpg (%0)" :: "r"(RO_ADDR) : "memory");
    addr = RO_ADDR + 0x10;
    TRY(".byte 0xd9, 0x3b", addr, &at);                /* fnstcw (%rbx) */
    *pd |= 2ul;
    __asm__ volatile("invlpg (%0)" :: "r"(RO_ADDR) : "memory");
    expect("pf-write-read-only", 14, 3, at);
    check(seen.cr2 == addr, "pf-read-only-cr2", "cr2=%#lx want %#lx", seen.cr2, addr);

    /* and execution goes on normally after all of them */
    uint64_t n;
    __asm__ volatile("popcnt %1, %0" : "=r"(n) : "r"(0xF0F0ul));
    check(n == 8, "continues", "popcnt after the faults gave %lu", n);
}

/* ---- guests that stop ------------------------------------------------------- */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3E0

/* One-shot LAPIC timer: KVM's APIC bus runs at 1 GHz, divided by 128 here. */
static void lapic_timer_oneshot(uint8_t vector, uint32_t count)
{
    lapic_enable();
    lapic_write(LAPIC_TIMER_DCR, 0xA);
    lapic_write(LAPIC_LVT_TIMER, vector);
    lapic_write(LAPIC_TIMER_ICR, count);
}

static void on_timer(unsigned vector)
{
    (void)vector;
    lapic_eoi();
    puts("timer fired");
    xk_poweroff();
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    char mode[8];
    if (xk_cmdline_value("xk.halt", mode, sizeof(mode))) {
        if (!strcmp(mode, "cli")) {
            puts("halting with interrupts off");
            xk_halt_forever();
        }
        /* sti; hlt with a one-shot LAPIC timer pending: alive, not dead */
        xk_set_irq_handler(0xEF, on_timer);
        lapic_timer_oneshot(0xEF, 0x1000000);   /* ~2 s */
        puts("halting with a timer pending");
        for (;;)
            __asm__ volatile("sti; hlt");
    }
    fault_cases();
    return 0;
}
