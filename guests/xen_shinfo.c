/*
 * xen_shinfo - shared_info and time: XENMEM_add_to_physmap(shared_info),
 * vcpu_time_info (pvclock) consistency, monotonic system time advancing at
 * the rate of an independent clock (the ACPI PM timer), the wallclock,
 * VCPUOP_register_vcpu_info, the vcpu time area and the runstate area.
 *
 * Command line: xk.trap=page|direct.
 */
#include "xen_guest.h"

#define PM_TIMER_HZ     3579545u
#define SPIN_PM_TICKS   (PM_TIMER_HZ / 50)     /* ~20 ms measured against the PM timer */
#define MIN_WALLCLOCK   1577836800u             /* 2020-01-01T00:00:00Z */

static struct vcpu_runstate_info runstate __attribute__((aligned(64)));
static struct vcpu_time_info time_area __attribute__((aligned(32)));

static void print_time(const char *what, const volatile struct vcpu_time_info *t)
{
    printf("%s: version %u tsc_timestamp %lu system_time %lu mul %u shift %d flags %#x\n", what,
           t->version, t->tsc_timestamp, t->system_time, t->tsc_to_system_mul, t->tsc_shift, t->flags);
}

static void check_time_info(const char *prefix, const volatile struct vcpu_time_info *t)
{
    char name[64];
    print_time(prefix, t);
    snprintf(name, sizeof(name), "%s.version_even", prefix);
    check(!(t->version & 1) && t->version != 0, name, "version %u (odd or never written)", t->version);
    snprintf(name, sizeof(name), "%s.tsc_to_system_mul", prefix);
    check(t->tsc_to_system_mul != 0, name, "mul is 0 (Linux divides by it)");
    snprintf(name, sizeof(name), "%s.tsc_stable", prefix);
    check(t->flags & XEN_PVCLOCK_TSC_STABLE_BIT, name, "flags %#x lack PVCLOCK_TSC_STABLE", t->flags);
    snprintf(name, sizeof(name), "%s.tsc_shift", prefix);
    check(t->tsc_shift >= -8 && t->tsc_shift <= 8, name, "shift %d implausible", t->tsc_shift);
}

static uint32_t pm_timer(void) { return inl(XK_PM_TMR) & 0xFFFFFFu; }

static void test_monotonic(const volatile struct vcpu_time_info *t)
{
    uint64_t prev = xen_pvclock_read(t), first = prev;
    uint32_t backwards = 0;
    for (int i = 0; i < 2000; i++) {
        uint64_t now = xen_pvclock_read(t);
        if (now < prev)
            backwards++;
        prev = now;
    }
    check(backwards == 0, "pvclock.monotonic", "went backwards %u times in 2000 reads", backwards);
    check(prev > first, "pvclock.advances", "system time stuck at %lu", first);
    check(first > 0 && first < 3600ULL * 1000000000ULL, "pvclock.since_boot",
          "system time %lu ns: not time since the domain started", first);
}

static void test_rate(const volatile struct vcpu_time_info *t)
{
    uint32_t p0 = pm_timer();
    xk_spin(1000);
    if (pm_timer() == p0) {
        skip("pvclock.rate", "the ACPI PM timer does not count; no independent clock");
        return;
    }
    p0 = pm_timer();
    uint64_t ns0 = xen_pvclock_read(t), tsc0 = rdtsc();
    uint32_t elapsed = 0;
    for (uint32_t i = 0; i < XEN_WAIT_POLLS && elapsed < SPIN_PM_TICKS; i++) {
        elapsed = (pm_timer() - p0) & 0xFFFFFFu;
        cpu_relax();
    }
    uint64_t ns1 = xen_pvclock_read(t), tsc1 = rdtsc();
    uint64_t pm_ns = (uint64_t)elapsed * 1000000000ULL / PM_TIMER_HZ;
    uint64_t pv_ns = ns1 - ns0;
    printf("over %lu ns of PM timer: pvclock %lu ns, %lu TSC ticks\n", pm_ns, pv_ns, tsc1 - tsc0);
    /* generous bounds: a loaded or emulated host adds jitter, not a factor of 1.5 */
    check(pm_ns > 0 && pv_ns * 3 > pm_ns * 2 && pv_ns * 2 < pm_ns * 3, "pvclock.rate",
          "pvclock advanced %lu ns while the PM timer advanced %lu ns", pv_ns, pm_ns);
}

static void test_wallclock(void)
{
    volatile struct shared_info *s = xen_shinfo;
    uint32_t v, sec, nsec;
    int tries = 0;
    do {
        v = s->wc_version;
        __asm__ volatile("" ::: "memory");
        sec = s->wc_sec;
        nsec = s->wc_nsec;
        __asm__ volatile("" ::: "memory");
    } while ((v & 1 || v != s->wc_version) && ++tries < 1000);
    printf("wallclock: version %u sec %u nsec %u (sec_hi %u)\n", v, sec, nsec, s->wc_sec_hi);
    check(!(v & 1), "wallclock.version_even", "version %u", v);
    check(sec > MIN_WALLCLOCK, "wallclock.after_2020", "wc_sec %u", sec);
    check(nsec < 1000000000u, "wallclock.nsec", "wc_nsec %u", nsec);
}

static void test_vcpu_info(void)
{
    long rc = xen_register_vcpu_info(0);
    if (!check(rc == 0, "vcpu_info.register", "VCPUOP_register_vcpu_info: %ld", rc))
        return;
    struct vcpu_info *vi = xen_vcpu_info(0);
    check_time_info("vcpu_info.time", &vi->time);
    uint64_t a = xen_pvclock_read(&xen_shinfo->vcpu_info[0].time);
    uint64_t b = xen_pvclock_read(&vi->time);
    /* after registration Xen stops updating the shared_info slot, but both stay close */
    printf("registered vcpu_info time %lu, shared_info slot %lu\n", b, a);
    check(b >= a || a - b < 1000000ULL, "vcpu_info.time_consistent", "registered %lu, slot %lu", b, a);
    rc = xen_register_vcpu_info(0);
    check(rc != 0, "vcpu_info.register_twice", "a second registration returned 0 (Xen: -EINVAL)");
    struct vcpu_register_vcpu_info bad = { .mfn = 0x100000000000ULL >> 12, .offset = 0 };
    rc = HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_info, 0, &bad);
    check(rc < 0, "vcpu_info.bad_mfn", "returned %ld", rc);
    struct vcpu_register_vcpu_info cross = { .mfn = 0x200, .offset = 4096 - 32 };
    rc = HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_info, 0, &cross);
    check(rc < 0, "vcpu_info.crossing_page", "returned %ld", rc);
}

static void test_time_area(void)
{
    struct vcpu_register_time_memory_area r = { .addr.v = &time_area };
    long rc = HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_time_memory_area, 0, &r);
    if (rc == -XEN_ENOSYS) {
        skip("time_area", "VCPUOP_register_vcpu_time_memory_area not implemented (Linux tolerates it)");
        return;
    }
    if (!check(rc == 0, "time_area.register", "returned %ld", rc))
        return;
    xen_system_time();
    check_time_info("time_area", &time_area);
}

static void test_runstate(void)
{
    memset(&runstate, 0xFF, sizeof(runstate));
    struct vcpu_register_runstate_memory_area r = { .addr.v = &runstate };
    long rc = HYPERVISOR_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &r);
    if (!check(rc == 0, "runstate.register", "returned %ld (Linux BUGs on failure)", rc))
        return;
    HYPERVISOR_xen_version(XENVER_version, NULL);
    uint64_t now = xen_system_time();
    volatile struct vcpu_runstate_info *rs = &runstate;
    uint64_t entry = rs->state_entry_time & ~XEN_RUNSTATE_UPDATE;
    printf("runstate: state %d entry %lu times %lu %lu %lu %lu (now %lu)\n", rs->state, entry,
           rs->time[0], rs->time[1], rs->time[2], rs->time[3], now);
    check(rs->state == RUNSTATE_running, "runstate.running", "state %d", rs->state);
    check(entry <= now + 1000000ULL, "runstate.entry_time", "entry %lu after now %lu", entry, now);
    check(rs->time[0] != ~0ULL && rs->time[1] != ~0ULL && rs->time[2] != ~0ULL && rs->time[3] != ~0ULL,
          "runstate.times_written", "time[] still holds the 0xff fill");

    struct vcpu_runstate_info info;
    memset(&info, 0xFF, sizeof(info));
    rc = HYPERVISOR_vcpu_op(VCPUOP_get_runstate_info, 0, &info);
    check(rc == 0 && info.state == RUNSTATE_running, "runstate.get_runstate_info",
          "rc %ld state %d", rc, info.state);

    rc = HYPERVISOR_vm_assist(VMASST_CMD_enable, VMASST_TYPE_runstate_update_flag);
    check(rc == 0, "vm_assist.runstate_update_flag", "returned %ld", rc);
    struct vcpu_register_runstate_memory_area bad = { .addr.p = 0x0000100000000000ULL };
    rc = HYPERVISOR_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &bad);
    /* Xen accepts any address here and only writes on updates; either answer is fine, but
     * the VMM must survive the later updates of an unmapped area */
    printf("runstate at an unmapped address: rc %ld\n", rc);
    HYPERVISOR_xen_version(XENVER_version, NULL);
    check(HYPERVISOR_xen_version(XENVER_version, NULL) > 0, "runstate.unmapped_area_survives", "no answer");
    r.addr.v = &runstate;
    HYPERVISOR_vcpu_op(VCPUOP_register_runstate_memory_area, 0, &r);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_shinfo guest");
    if (!xen_init())
        return 1;
    long rc = xen_map_shared_info();
    if (!check(rc == 0, "shinfo.map", "XENMEM_add_to_physmap(shared_info): %ld", rc))
        return 1;
    const volatile struct vcpu_time_info *t = &xen_shinfo->vcpu_info[0].time;
    check_time_info("shinfo.time", t);
    if (!t->tsc_to_system_mul)
        return 1;
    test_monotonic(t);
    test_rate(t);
    test_wallclock();
    test_vcpu_info();
    test_time_area();
    test_runstate();
    return 0;
}
