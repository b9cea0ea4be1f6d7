/*
 * xk.h - the xenkvm freestanding guest toolkit.
 *
 * A guest provides   int main(const struct hvm_start_info *si);
 * The runtime (start.S + cpu.c) enters it in 64-bit mode on an identity map
 * of the low 4 GiB, with an IDT that turns any exception into a FAIL line.
 * When main returns, xk_finish() prints the SUMMARY line and powers off.
 */
#ifndef XK_H
#define XK_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "platform.h"
#include "start_info.h"

#define XK_NORETURN   __attribute__((noreturn))
#define XK_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define XK_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#define XK_MAX_CPUS       16
#define XK_STACK_SIZE     16384
/* The AP trampoline is copied here (0x8000..0xffff is left to guests). */
#define XK_AP_TRAMPOLINE_ADDR  0x8000

/* ---- port I/O and CPU helpers ------------------------------------------- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

#define MSR_EFER        0xC0000080u
#define EFER_LME        (1u << 8)
#define EFER_LMA        (1u << 10)
#define MSR_APIC_BASE   0x1Bu

/* Atomic add returning the old value (compiles to lock xadd). */
static inline uint32_t xk_fetch_add(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}

/* ---- string.c ------------------------------------------------------------ */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strstr(const char *hay, const char *needle);

/* ---- console.c ------------------------------------------------------------ */
void console_write(const char *s, size_t n);  /* whole buffer, under the console lock */
void putchar_raw(char c);                      /* one byte, no lock */
void puts(const char *s);                      /* s plus "\n" */
/* Claim the console for the final report: true for the first CPU to ask (and
 * again for it); every other CPU is parked on its next console write. */
bool console_claim_final(void);

/* ---- printf.c ------------------------------------------------------------- */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) XK_PRINTF(3, 4);
int printf(const char *fmt, ...) XK_PRINTF(1, 2);
int vprintf(const char *fmt, va_list ap);
void hexdump(const void *p, size_t len, uint64_t base_addr);

/* ---- harness.c ------------------------------------------------------------ */
void pass(const char *name);
void fail(const char *name, const char *fmt, ...) XK_PRINTF(2, 3);
/* PASS when cond holds, else FAIL with the formatted reason; returns cond. */
bool check(bool cond, const char *name, const char *fmt, ...) XK_PRINTF(3, 4);
/* Informational "SKIP <name>: <reason>" line; not counted in the summary. */
void skip(const char *name, const char *fmt, ...) XK_PRINTF(2, 3);
unsigned harness_passed(void);
unsigned harness_failed(void);
XK_NORETURN void xk_finish(void);           /* SUMMARY line, then power off */
#define CHECK(cond, name) check((cond), (name), "%s", #cond)

/* ---- cpu.c ---------------------------------------------------------------- */
XK_NORETURN void xk_poweroff(void);
XK_NORETURN void xk_reset(void);
XK_NORETURN void xk_halt_forever(void);
/* cmdline helpers: the boot command line (or "" if none) */
const char *xk_cmdline(void);
bool xk_cmdline_has(const char *word);        /* whitespace-separated token */
/* Value of a "key=value" token, copied (NUL-terminated) into buf. */
bool xk_cmdline_value(const char *key, char *buf, size_t size);
/* Raise a deliberate exception: "ud", "pf", "gp", "de" or "df" (#DF via an
 * unusable stack). Returns false for an unknown kind. */
bool xk_inject_fault(const char *kind);
extern const struct hvm_start_info *xk_start_info;
/* A bounded busy wait: about `iterations` pause loops; no clocks involved. */
void xk_spin(uint32_t iterations);
/* Interrupt handlers: vectors 32..255 with a handler run it (with IF clear)
 * and return to the interrupted code; any other vector is reported as a
 * FAIL exception. The handler must EOI its LAPIC itself where needed. */
typedef void (*xk_irq_fn)(unsigned vector);
void xk_set_irq_handler(unsigned vector, xk_irq_fn fn);
/* The frame xk_isr_common builds (start.S): saved GPRs, vector, error code,
 * then what the CPU pushed. */
struct xk_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;
};
/* Outer rings (user.c): every exception or interrupt taken at CPL > 0 goes
 * to this hook, which must not return; TSS.RSP0 for the way in. */
typedef XK_NORETURN void (*xk_user_trap_fn)(struct xk_frame *f);
void xk_set_user_trap(xk_user_trap_fn fn);
void xk_set_rsp0(unsigned cpu, uint64_t rsp0);
/* Exception handlers (vectors 0..31): return true to resume at f->rip (change
 * it to skip the faulting instruction; registers are restored from f), false
 * to report the exception as a FAIL as without a handler. */
typedef bool (*xk_exc_fn)(struct xk_frame *f);
void xk_set_exception_handler(unsigned vector, xk_exc_fn fn);
static inline void xk_irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void xk_irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }

/* ---- acpi.c --------------------------------------------------------------- */
struct acpi_rsdp {
    char signature[8];          /* "RSD PTR " */
    uint8_t checksum;           /* over the first 20 bytes */
    char oem_id[6];
    uint8_t revision;           /* 0 = ACPI 1.0 (RSDT only), 2 = ACPI 2.0+ */
    uint32_t rsdt_address;
    /* revision >= 2 */
    uint32_t length;
    uint64_t xsdt_address;
    uint8_t extended_checksum;  /* over `length` bytes */
    uint8_t reserved[3];
} __attribute__((packed));

struct acpi_sdt_header {
    char signature[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem_id[6];
    char oem_table_id[8];
    uint32_t oem_revision;
    uint32_t creator_id;
    uint32_t creator_revision;
} __attribute__((packed));

struct acpi_madt {
    struct acpi_sdt_header hdr;
    uint32_t lapic_address;
    uint32_t flags;
    uint8_t entries[];
} __attribute__((packed));

#define MADT_TYPE_LAPIC     0
#define MADT_TYPE_IOAPIC    1
#define MADT_TYPE_X2APIC    9
#define MADT_LAPIC_ENABLED  1u

uint8_t acpi_checksum(const void *p, size_t len);      /* 0 when valid */
const struct acpi_rsdp *acpi_rsdp(const struct hvm_start_info *si);
/* Root table in use: the XSDT when the RSDP has one (revision >= 2), else the
 * RSDT unless allow_rsdt is false. *is_xsdt reports which. NULL if none. */
const struct acpi_sdt_header *acpi_root(const struct acpi_rsdp *rsdp, bool allow_rsdt, bool *is_xsdt);
/* Find a table by signature through the root table (XSDT or RSDT). */
const struct acpi_sdt_header *acpi_find(const struct acpi_rsdp *rsdp, const char sig[4], bool allow_rsdt);
/* Enabled processor-local APICs in the MADT: fills ids[] (up to max), returns the count. */
int acpi_madt_cpus(const struct acpi_madt *madt, uint32_t *ids, int max);

/* ---- lapic.c -------------------------------------------------------------- */
#define LAPIC_ID        0x020
#define LAPIC_VERSION   0x030
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310

uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
void lapic_enable(void);                   /* SVR bit 8, spurious vector 0xFF */
uint32_t lapic_id(void);                   /* LAPIC ID register [31:24] */
static inline void lapic_eoi(void) { *(volatile uint32_t *)(uintptr_t)(XK_LAPIC_BASE + LAPIC_EOI) = 0; }
uint32_t cpuid_apic_id(void);              /* CPUID.1:EBX[31:24] */
/* Send an IPI; returns false when the delivery-status bit never cleared. */
bool lapic_send_ipi(uint32_t dest_apic_id, uint32_t icr_low);

typedef void (*xk_ap_fn)(unsigned cpu_index, uint32_t apic_id);

struct xk_cpu {
    volatile uint32_t online;       /* set by the AP once in 64-bit C code */
    volatile uint32_t done;         /* set by the AP after its callback returned */
    uint32_t apic_id;               /* LAPIC ID register */
    uint32_t cpuid_apic_id;         /* CPUID.1:EBX[31:24] */
};
extern struct xk_cpu xk_cpus[XK_MAX_CPUS];
extern volatile uint32_t xk_cpus_online;   /* BSP included */

/* Start the AP with this APIC ID as CPU `cpu_index` (1..XK_MAX_CPUS-1) and
 * wait (bounded) for it to announce itself. It then runs fn and halts. */
bool smp_start_ap(uint32_t apic_id, unsigned cpu_index, xk_ap_fn fn);
/* Wait (bounded) until every started AP returned from its callback. */
bool smp_wait_done(unsigned ncpus, uint32_t max_iterations);

#endif /* XK_H */
