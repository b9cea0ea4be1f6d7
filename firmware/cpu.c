/*
 * cpu.c - per-CPU setup (TSS, IDT), the exception reporter, power off and
 * the C side of the BSP entry.
 */
#include "xk.h"
#include "xk_asm.h"

_Static_assert(XK_MAX_CPUS == XK_MAX_CPUS_ASM, "xk_asm.h out of sync");
_Static_assert(XK_STACK_SIZE == XK_STACK_SIZE_ASM, "xk_asm.h out of sync");

int main(const struct hvm_start_info *si);

const struct hvm_start_info *xk_start_info;

/* ---- GDT / TSS / IDT ------------------------------------------------------- */
struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));
_Static_assert(sizeof(struct tss64) == 104, "TSS layout");

struct idt_entry {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t zero;
} __attribute__((packed));

struct desc_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

extern uint64_t xk_gdt[];
extern const char xk_isr_stubs[];

static struct tss64 tss[XK_MAX_CPUS] __attribute__((aligned(16)));
/* #DF, NMI and #MC run on a per-CPU IST stack, so even a blown stack reports */
static uint8_t ist_stacks[XK_MAX_CPUS][4096] __attribute__((aligned(16)));
static struct idt_entry idt[256] __attribute__((aligned(16)));
static bool idt_ready;

static void idt_build(void)
{
    for (unsigned v = 0; v < 256; v++) {
        uint64_t a = (uint64_t)(uintptr_t)(xk_isr_stubs + v * XK_STUB_SIZE);
        idt[v].offset_lo = (uint16_t)a;
        idt[v].selector = SEL_CODE64;
        idt[v].ist = (v == 2 || v == 8 || v == 18) ? 1 : 0;
        idt[v].type_attr = 0x8E;        /* present, DPL0, 64-bit interrupt gate */
        idt[v].offset_mid = (uint16_t)(a >> 16);
        idt[v].offset_hi = (uint32_t)(a >> 32);
        idt[v].zero = 0;
    }
    idt_ready = true;
}

void xk_cpu_init(unsigned cpu);
void xk_cpu_init(unsigned cpu)
{
    if (!idt_ready)
        idt_build();
    struct desc_ptr idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));

    struct tss64 *t = &tss[cpu];
    memset(t, 0, sizeof(*t));
    t->ist[0] = (uint64_t)(uintptr_t)&ist_stacks[cpu][sizeof(ist_stacks[cpu])];
    t->iomap_base = sizeof(*t);         /* no I/O bitmap */

    uint64_t base = (uint64_t)(uintptr_t)t, limit = sizeof(*t) - 1;
    unsigned slot = (SEL_TSS0 >> 3) + 2 * cpu;
    xk_gdt[slot] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40)
                 | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    xk_gdt[slot + 1] = base >> 32;
    uint16_t sel = (uint16_t)(SEL_TSS0 + 16 * cpu);
    __asm__ volatile("ltr %0" :: "r"(sel) : "memory");
}

void xk_set_rsp0(unsigned cpu, uint64_t rsp0)
{
    if (cpu < XK_MAX_CPUS)
        tss[cpu].rsp[0] = rsp0;
}

/* ---- exceptions ------------------------------------------------------------ */
_Static_assert((SEL_USER_DATA & ~3) == SEL_TSS0 + 16 * XK_MAX_CPUS, "user segments follow the TSS descriptors");

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
    "#DF", "#CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23",
    "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
};

static volatile uint32_t exc_owner = 0xFFFFFFFFu;

XK_NORETURN void xk_exception(struct xk_frame *f);
void xk_exception(struct xk_frame *f)
{
    uint32_t me = cpuid_apic_id();
    uint32_t prev = __atomic_exchange_n(&exc_owner, me, __ATOMIC_ACQ_REL);
    if (prev != 0xFFFFFFFFu) {
        if (prev == me) {               /* fault while reporting a fault */
            static const char msg[] = "FAIL exception: nested fault while reporting\n";
            for (const char *p = msg; *p; p++)
                putchar_raw(*p);
            xk_poweroff();
        }
        exc_owner = prev;               /* another CPU reports; park this one */
        xk_halt_forever();
    }
    if (!console_claim_final())         /* another CPU is already finishing */
        xk_halt_forever();

    const char *what = f->vector < 32 ? exc_names[f->vector] : "unexpected interrupt";
    fail("exception", "vector %lu (%s) rip=%016lx err=%lx cr2=%016lx rsp=%016lx apic=%u",
         f->vector, what, f->rip, f->error, read_cr2(), f->rsp, me);
    printf("  rax=%016lx rbx=%016lx rcx=%016lx rdx=%016lx\n", f->rax, f->rbx, f->rcx, f->rdx);
    printf("  rsi=%016lx rdi=%016lx rbp=%016lx r8 =%016lx\n", f->rsi, f->rdi, f->rbp, f->r8);
    printf("  r9 =%016lx r10=%016lx r11=%016lx r12=%016lx\n", f->r9, f->r10, f->r11, f->r12);
    printf("  r13=%016lx r14=%016lx r15=%016lx rflags=%lx cs=%lx\n", f->r13, f->r14, f->r15, f->rflags, f->cs);
    xk_finish();
}

/* ---- interrupt handlers ------------------------------------------------------ */
static xk_irq_fn volatile irq_handlers[256];
static xk_user_trap_fn volatile user_trap;
static xk_exc_fn volatile exc_handlers[32];

void xk_set_user_trap(xk_user_trap_fn fn)
{
    user_trap = fn;
}

void xk_set_exception_handler(unsigned vector, xk_exc_fn fn)
{
    if (vector < 32)
        exc_handlers[vector] = fn;
}

void xk_set_irq_handler(unsigned vector, xk_irq_fn fn)
{
    if (vector >= 32 && vector < 256)
        irq_handlers[vector] = fn;
}

void xk_interrupt(struct xk_frame *f);
void xk_interrupt(struct xk_frame *f)
{
    xk_user_trap_fn ut = user_trap;
    if ((f->cs & 3) && ut)
        ut(f);                          /* does not return */
    if (f->vector < 32) {
        xk_exc_fn handler = exc_handlers[f->vector];
        if (!handler || !handler(f))
            xk_exception(f);            /* does not return */
        return;                         /* resume at f->rip (the handler may have moved it) */
    }
    xk_irq_fn fn = f->vector < 256 ? irq_handlers[f->vector] : NULL;
    if (!fn)
        xk_exception(f);                /* does not return */
    fn((unsigned)f->vector);
}

/* ---- power ------------------------------------------------------------------ */
void xk_halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void xk_poweroff(void)
{
    /* The platform contract: SLP_TYP 5 (S5) | SLP_EN into PM1a_CNT. */
    outw(XK_PM1A_CNT, (uint16_t)((XK_SLP_TYP_S5 << 10) | XK_SLP_EN));
    xk_spin(1000);
    /* Still running: a firmware whose DSDT says _S5 = 0 (QEMU/SeaBIOS on q35,
     * where the toolkit is also validated) powers off on SLP_TYP 0 instead. */
    outw(XK_PM1A_CNT, (uint16_t)XK_SLP_EN);
    xk_halt_forever();
}

void xk_reset(void)
{
    outb(XK_RESET_PORT, XK_RESET_VALUE);
    xk_halt_forever();
}

void xk_spin(uint32_t iterations)
{
    for (uint32_t i = 0; i < iterations; i++)
        cpu_relax();
}

/* ---- command line ------------------------------------------------------------ */
const char *xk_cmdline(void)
{
    const struct hvm_start_info *si = xk_start_info;
    if (!si || si->magic != XEN_HVM_START_MAGIC_VALUE || !si->cmdline_paddr
        || si->cmdline_paddr >= 0x100000000ULL)
        return "";
    return (const char *)(uintptr_t)si->cmdline_paddr;
}

bool xk_cmdline_has(const char *word)
{
    const char *s = xk_cmdline();
    size_t n = strlen(word);
    while (*s) {
        while (*s == ' ' || *s == '\t')
            s++;
        const char *e = s;
        while (*e && *e != ' ' && *e != '\t')
            e++;
        if ((size_t)(e - s) == n && !memcmp(s, word, n))
            return true;
        s = e;
    }
    return false;
}

bool xk_cmdline_value(const char *key, char *buf, size_t size)
{
    const char *s = xk_cmdline();
    size_t n = strlen(key);
    while (*s) {
        while (*s == ' ' || *s == '\t')
            s++;
        const char *e = s;
        while (*e && *e != ' ' && *e != '\t')
            e++;
        if ((size_t)(e - s) > n && s[n] == '=' && !memcmp(s, key, n)) {
            size_t len = (size_t)(e - s) - n - 1;
            if (size) {
                if (len >= size)
                    len = size - 1;
                memcpy(buf, s + n + 1, len);
                buf[len] = '\0';
            }
            return true;
        }
        s = e;
    }
    return false;
}

/* ---- deliberate faults (to test the exception path) ------------------------ */
bool xk_inject_fault(const char *kind)
{
    if (!strcmp(kind, "ud")) {
        __asm__ volatile("ud2");
    } else if (!strcmp(kind, "pf")) {
        /* canonical but above the 4 GiB identity map: not present */
        (void)*(volatile uint64_t *)(uintptr_t)0x0000100000000000ULL;
    } else if (!strcmp(kind, "gp")) {
        /* non-canonical address */
        (void)*(volatile uint64_t *)(uintptr_t)0x8000000000000000ULL;
    } else if (!strcmp(kind, "de")) {
        volatile uint32_t zero = 0;
        uint32_t q;
        __asm__ volatile("divl %2" : "=a"(q) : "a"(1u), "r"(zero), "d"(0u));
        (void)q;
    } else if (!strcmp(kind, "df")) {
        /* a stack the #PF cannot be delivered on: #DF, handled on IST1 */
        __asm__ volatile("mov %0, %%rsp; pushq $0" :: "r"(0x0000100000000000ULL) : "memory");
    } else {
        return false;
    }
    return true;    /* not reached when the fault fired */
}

/* ---- BSP entry (from start.S) -------------------------------------------------- */
XK_NORETURN void xk_bsp_entry(uint32_t start_info_paddr);
void xk_bsp_entry(uint32_t start_info_paddr)
{
    xk_start_info = (const struct hvm_start_info *)(uintptr_t)start_info_paddr;
    xk_cpu_init(0);
    main(xk_start_info);
    xk_finish();
}
