/*
 * xen_hostile - throws garbage at the hypercall layer and checks that the
 * VMM keeps answering: every hypercall number 0..63 (0..127 with the
 * hypercall page) with sub-ops 0..24, 99 and 0xFFFFFFFF and the first
 * garbage pointers (0, unmapped, non-canonical, kernel-half), then random
 * numbers (plus a few huge ones
 * with the direct trap), random sub-ops and random arguments.
 *
 * Excluded, because they would legitimately end, stop or redirect this
 * guest (not a VMM bug if they did): sched_op shutdown / remote_shutdown /
 * shutdown_code / watchdog / block / poll, vcpu_op initialise / up / down /
 * send_nmi, hvm_op set_evtchn_upcall_vector and set_param (interrupt
 * routing onto vectors without handlers), kexec_op. Page 0 is zeroed first,
 * so a struct read from address 0 is all zeros (counts 0, pointers 0).
 *
 * Survival: after every batch, XENVER_version must still answer; at the
 * end the console_io path must still work and PASS lines are printed.
 *
 * Command line: xk.trap=page|direct, xk.seed=N (PRNG seed, reproducible),
 * xk.calls=N (random calls, default 3000).
 */
#include "xen_guest.h"

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static const uint64_t garbage_ptrs[] = {
    0,                              /* NULL: page 0 (zeroed) */
    0x0000100000000000ULL,          /* canonical, unmapped */
    0x8000000000000000ULL,          /* non-canonical */
    0x0000800000000000ULL,          /* first non-canonical above the lower half */
    0xFFFF800000000000ULL,          /* kernel half, unmapped */
    0xFFFFFFFFFFFFF000ULL,          /* top page */
    0x00000000FFFFFFF9ULL,          /* last bytes of the identity map: structs straddle 4 GiB */
    0x0000000100000000ULL,          /* just above 4 GiB (no RAM, not mapped) */
    0x00000000FEC00000ULL,          /* IOAPIC MMIO */
    0xDEADBEEFDEADBEEFULL,
};

#define SWEEP_PTRS 5        /* the first five kinds; the random phase uses all */

static uint64_t garbage(void)
{
    uint64_t r = rnd();
    switch (r & 3) {
    case 0:
    case 1:
        return garbage_ptrs[(r >> 8) % XK_ARRAY_SIZE(garbage_ptrs)];
    case 2:
        return rnd() | (1ULL << 47);            /* never a low identity-mapped address */
    default:
        return (rnd() & 0xFFFF) << 32 | 0x100000000ULL;     /* above 4 GiB: unmapped */
    }
}

/* huge numbers (direct trap only); the ABI uses EAX, so each low half is unknown too */
static const uint64_t huge_nrs[] = {
    0xFFFFFFFFu, 0x80000000u, 0x12345678u, 0xFFFFFFFFFFFFFFFFULL, 0xDEADBEEF00001000ULL, 0x100000040ULL,
};

static bool excluded(uint64_t nr64, uint64_t cmd64)
{
    uint32_t nr = (uint32_t)nr64, cmd = (uint32_t)cmd64;   /* the ABI takes EAX and 32-bit cmds */
    switch (nr) {
    case __HYPERVISOR_sched_op:
        return cmd == SCHEDOP_shutdown || cmd == SCHEDOP_remote_shutdown || cmd == SCHEDOP_shutdown_code
            || cmd == SCHEDOP_watchdog || cmd == SCHEDOP_block || cmd == SCHEDOP_poll;
    case __HYPERVISOR_sched_op_compat:
        return true;                            /* old shutdown/block interface */
    case __HYPERVISOR_vcpu_op:
        /* cmd is args[0]; the vcpu id is args[1]: none of these on any vCPU */
        return cmd == VCPUOP_initialise || cmd == VCPUOP_up || cmd == VCPUOP_down || cmd == VCPUOP_send_nmi;
    case __HYPERVISOR_hvm_op:
        return cmd == HVMOP_set_evtchn_upcall_vector || cmd == HVMOP_set_param;
    case __HYPERVISOR_kexec_op:
        return true;
    default:
        return false;
    }
}

struct tally {
    uint32_t calls, zero, enosys, efault, einval, other_err, positive, skipped;
};
static struct tally t;

static void account(long rc)
{
    t.calls++;
    if (rc == 0)
        t.zero++;
    else if (rc == -XEN_ENOSYS)
        t.enosys++;
    else if (rc == -XEN_EFAULT)
        t.efault++;
    else if (rc == -XEN_EINVAL)
        t.einval++;
    else if (rc < 0)
        t.other_err++;
    else
        t.positive++;
}

static long expected_version;

static bool alive(void)
{
    return HYPERVISOR_xen_version(XENVER_version, NULL) == expected_version;
}

static void call(uint64_t nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5)
{
    if (excluded(nr, a1)) {
        t.skipped++;
        return;
    }
    /* vcpu_op's cmd is a1 but a sched_op-style number could hide in a2 for others: fine */
    account(xen_hypercall(nr, a1, a2, a3, a4, a5));
}

static bool sweep(void)
{
    static const uint64_t cmds_extra[] = { 99, 0xFFFFFFFFu, 0x80000000u, 0x100000000ULL };
    uint32_t max_nr = xen.trap == XEN_TRAP_PAGE ? 128 : 64;
    for (uint32_t nr = 0; nr < max_nr; nr++) {
        for (uint32_t pi = 0; pi < SWEEP_PTRS; pi++) {
            uint64_t p = garbage_ptrs[pi];
            for (uint64_t cmd = 0; cmd < 25; cmd++)
                call(nr, cmd, p, p, p, p);
            for (uint32_t k = 0; k < XK_ARRAY_SIZE(cmds_extra); k++)
                call(nr, cmds_extra[k], p, p, p, p);
            /* pointer first (hypercalls that take one argument) */
            call(nr, p, 0, 0, 0, 0);
        }
        if (!alive()) {
            fail("hostile.sweep", "XENVER_version stopped answering after hypercall %u", nr);
            return false;
        }
    }
    return true;
}

static bool random_calls(uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint64_t r = rnd();
        uint64_t nr;
        if ((r & 7) < 6)
            nr = (r >> 8) % 64;
        else if ((r & 7) == 6 || xen.trap == XEN_TRAP_PAGE)
            nr = 64 + (r >> 8) % 64;
        else
            nr = huge_nrs[(r >> 8) % XK_ARRAY_SIZE(huge_nrs)];
        uint64_t cmd = (r & 0x30) ? (r >> 16) % 26 : (uint32_t)rnd();
        uint64_t a2 = garbage(), a3 = (r & 0x40) ? garbage() : rnd() % 4096;
        call(nr, cmd, a2, a3, garbage(), rnd());
        if ((i & 255) == 255 && !alive()) {
            fail("hostile.random", "XENVER_version stopped answering after random call %u (seed state %#lx)",
                 i, rng_state);
            return false;
        }
    }
    return true;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_hostile guest");
    char buf[24];
    uint64_t seed = 1;
    if (xk_cmdline_value("xk.seed", buf, sizeof(buf))) {
        seed = 0;
        for (const char *p = buf; *p >= '0' && *p <= '9'; p++)
            seed = seed * 10 + (uint64_t)(*p - '0');
    }
    uint32_t n = 3000;
    if (xk_cmdline_value("xk.calls", buf, sizeof(buf))) {
        n = 0;
        for (const char *p = buf; *p >= '0' && *p <= '9'; p++)
            n = n * 10 + (uint32_t)(*p - '0');
    }
    rng_state = seed ? seed : 0x9E3779B97F4A7C15ULL;
    printf("seed %lu, %u random calls\n", seed, n);

    /* page 0 all zeros: a struct read through NULL is harmless */
    uint8_t *page0;
    __asm__("" : "=r"(page0) : "0"((uintptr_t)0));
    memset(page0, 0, 4096);

    if (!xen_init())
        return 1;
    expected_version = HYPERVISOR_xen_version(XENVER_version, NULL);
    check(xen_map_shared_info() == 0, "hostile.setup_shinfo", "failed");
    check(xen_register_vcpu_info(0) == 0, "hostile.setup_vcpu_info", "failed");
    /* catch-all: any stray upcall lands on our handler (interrupts stay off anyway) */
    check(xen_setup_upcall(0, true) == 0, "hostile.setup_upcall", "failed");

    bool ok = sweep();
    printf("sweep: %u calls (%u skipped): 0=%u ENOSYS=%u EFAULT=%u EINVAL=%u other-errors=%u positive=%u\n",
           t.calls, t.skipped, t.zero, t.enosys, t.efault, t.einval, t.other_err, t.positive);
    check(ok, "hostile.sweep_survived", "see above");
    memset(&t, 0, sizeof(t));
    ok = ok && random_calls(n);
    printf("random: %u calls (%u skipped): 0=%u ENOSYS=%u EFAULT=%u EINVAL=%u other-errors=%u positive=%u\n",
           t.calls, t.skipped, t.zero, t.enosys, t.efault, t.einval, t.other_err, t.positive);
    check(ok, "hostile.random_survived", "see above");

    /* quiesce timers the garbage may have armed, then prove we are still served */
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    HYPERVISOR_vcpu_op(VCPUOP_stop_singleshot_timer, 0, NULL);
    HYPERVISOR_set_timer_op(0);
    xen_irq_window(20000);
    check(alive(), "hostile.xen_version_answers", "XENVER_version no longer %#lx", expected_version);
    static const char msg[] = "XENKVM-HOSTILE-ALIVE (console_io after the garbage)\n";
    long rc = HYPERVISOR_console_io(CONSOLEIO_write, sizeof(msg) - 1, msg);
    check(rc >= 0, "hostile.console_io_works", "rc %ld", rc);
    pass("hostile.survived");
    return 0;
}
