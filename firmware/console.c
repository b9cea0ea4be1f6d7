/*
 * console.c - polled output on the 16550 UART at XK_COM1.
 *
 * Each byte waits for LSR.THRE (bit 5) before going to THR. The wait is
 * bounded so a missing or wedged UART cannot hang a test. Whole writes are
 * serialised across CPUs by a spinlock whose wait is also bounded (a CPU
 * that faults while holding it must still be able to report).
 */
#include "xk.h"

#define UART_THR  (XK_COM1 + 0)
#define UART_LSR  (XK_COM1 + 5)
#define LSR_THRE  0x20

static volatile uint32_t console_lock;

/* Once a CPU starts the final report (exception or SUMMARY), it owns the
 * console: any other CPU that tries to print is parked, so nothing appears
 * after the SUMMARY line while the power-off takes effect. */
#define NO_OWNER 0xFFFFFFFFu
static volatile uint32_t final_owner = NO_OWNER;

bool console_claim_final(void)
{
    uint32_t me = cpuid_apic_id();
    uint32_t expected = NO_OWNER;
    if (__atomic_compare_exchange_n(&final_owner, &expected, me, false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return true;
    return expected == me;
}

static void park_if_not_owner(void)
{
    if (__atomic_load_n(&final_owner, __ATOMIC_ACQUIRE) != NO_OWNER
        && final_owner != cpuid_apic_id())
        xk_halt_forever();
}

void putchar_raw(char c)
{
    for (unsigned i = 0; i < 100000; i++)
        if (inb(UART_LSR) & LSR_THRE)
            break;
    outb(UART_THR, (uint8_t)c);
}

/* Plain '\n' line ends (no CR): the harness lines are parsed byte-exact. */
static void emit(char c)
{
    putchar_raw(c);
}

static bool lock_console(void)
{
    for (unsigned i = 0; i < 1000000; i++) {
        if (!console_lock && !__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
            return true;
        cpu_relax();
    }
    return false;   /* give up waiting; write anyway */
}

static void unlock_console(bool held)
{
    if (held)
        __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void console_write(const char *s, size_t n)
{
    park_if_not_owner();
    bool held = lock_console();
    for (size_t i = 0; i < n; i++)
        emit(s[i]);
    unlock_console(held);
}

void puts(const char *s)
{
    park_if_not_owner();
    bool held = lock_console();
    while (*s)
        emit(*s++);
    emit('\n');
    unlock_console(held);
}
