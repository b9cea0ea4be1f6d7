/*
 * xen_bounds - asks for far more than a domU may have, gets Xen's errors,
 * and still works afterwards:
 *   grant frames: setup_table past max_nr_frames is GNTST_general_error,
 *   add_to_physmap of a frame index past it is -EINVAL; every frame walked
 *   over thousands of hole gfns (add_to_physmap_batch, 1024 a call, and
 *   single calls) - the host checks its memslot count stays bounded;
 *   event channels: alloc_unbound until -ENOSPC (Xen's default limit for a
 *   domU is port 1023), then close them;
 *   timers: the single-shot and periodic timers re-armed many thousand times
 *   with far deadlines (each vCPU has one of each: re-arming replaces);
 * then a normal grant (the test backend copies a granted page through a
 * frame at a fresh hole gfn), a loopback event and a timer event all work.
 *
 * Command line: xk.trap=page|direct, xk.rounds=N (batches of 1024 moves,
 * default 8).
 */
#include "xen_guest.h"
#include "xen_testdev.h"

#define WALK_GPFN       0xF0000ULL      /* hole gfns walked: WALK_GPFN .. + rounds * 1024 */
#define FINAL_GPFN      0xF8000ULL      /* where frame 0 ends up for the final grant */
#define BATCH           1024
#define REF             10
#define MS              1000000ULL

static uint64_t idxs[BATCH], gpfns[BATCH];
static int errs[BATCH];
static uint8_t page[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t buffer[XEN_PAGE] XEN_PAGE_ALIGNED;
static struct xk_testdev_cmd cmd;
static uint16_t self_domid;
static evtchn_port_t ports[XEN_MAX_PORTS];

static uint32_t arg_u32(const char *key, uint32_t dflt)
{
    char buf[16];
    if (!xk_cmdline_value(key, buf, sizeof(buf)))
        return dflt;
    uint32_t n = 0;
    for (const char *p = buf; *p >= '0' && *p <= '9'; p++)
        n = n * 10 + (uint32_t)(*p - '0');
    return n;
}

static uint32_t max_frames(void)
{
    struct gnttab_query_size q = { .dom = DOMID_SELF };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q, 1);
    return rc == 0 && q.status == GNTST_okay ? q.max_nr_frames : 0;
}

static void test_too_many_frames(uint32_t max)
{
    static uint64_t frames[2048];
    struct gnttab_setup_table st = { .dom = DOMID_SELF, .nr_frames = max + 1 };
    set_xen_guest_handle(st.frame_list, frames);
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    check(rc == 0 && st.status == GNTST_general_error, "bounds.setup_table_past_max",
          "rc %ld status %d (max %u)", rc, st.status, max);
    st.nr_frames = 2000;
    st.status = 0;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &st, 1);
    check(rc == 0 && st.status == GNTST_general_error, "bounds.setup_table_2000", "rc %ld status %d", rc, st.status);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, max, WALK_GPFN);
    check(rc == -XEN_EINVAL, "bounds.map_frame_past_max", "rc %ld", rc);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 100000, WALK_GPFN);
    check(rc == -XEN_EINVAL, "bounds.map_frame_100000", "rc %ld", rc);
}

static void test_walk_frames(uint32_t max, uint32_t rounds)
{
    struct xen_add_to_physmap_batch b = { .domid = DOMID_SELF, .space = XENMAPSPACE_grant_table, .size = BATCH };
    set_xen_guest_handle(b.idxs, idxs);
    set_xen_guest_handle(b.gpfns, gpfns);
    set_xen_guest_handle(b.errs, errs);
    uint32_t bad = 0;
    long rc = 0;
    for (uint32_t r = 0; r < rounds && rc == 0; r++) {
        for (uint32_t i = 0; i < BATCH; i++) {
            idxs[i] = i % max;
            gpfns[i] = WALK_GPFN + (uint64_t)r * BATCH + i;
            errs[i] = 1;
        }
        rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap_batch, &b);
        for (uint32_t i = 0; i < BATCH; i++)
            bad += errs[i] != 0;
    }
    check(rc == 0 && bad == 0, "bounds.batch_walk", "%u batches of %u: rc %ld, %u entries failed",
          rounds, BATCH, rc, bad);
    /* one frame, single calls, back and forth over the same gfns */
    for (uint32_t i = 0; i < 2000 && rc == 0; i++)
        rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, WALK_GPFN + (i % 1500));
    check(rc == 0, "bounds.single_walk", "rc %ld", rc);
    printf("walked %u grant frames over %u hole gfns\n", max, rounds * BATCH);
}

static void test_ports(void)
{
    evtchn_port_t p = 0;
    uint32_t n = 0;
    long rc = 0;
    while (n < XEN_MAX_PORTS) {
        rc = xen_evtchn_alloc_unbound(DOMID_SELF, &p);
        if (rc)
            break;
        ports[n++] = p;
    }
    check(rc == -XEN_ENOSPC && n > 1000 && n < XEN_MAX_PORTS, "bounds.ports_until_enospc",
          "rc %ld after %u ports (last %u)", rc, n, n ? ports[n - 1] : 0);
    check(p <= 1023, "bounds.ports_within_limit", "port %u", p);
    uint32_t closed = 0;
    for (uint32_t i = 0; i < n; i++)
        closed += xen_evtchn_close(ports[i]) == 0;
    check(closed == n, "bounds.ports_closed", "%u of %u", closed, n);
    printf("allocated %u event channels before -ENOSPC\n", n);
}

static long singleshot(uint64_t deadline)
{
    struct vcpu_set_singleshot_timer t = { .timeout_abs_ns = deadline, .flags = 0 };
    return HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, xen_vcpu_id(0), &t);
}

static void test_timers(void)
{
    long rc = 0;
    uint64_t now = xen_system_time();
    for (uint32_t i = 0; i < 20000 && rc == 0; i++) {
        rc = singleshot(now + 3600000 * MS + i);
        if (rc == 0 && (i & 3) == 0) {
            struct vcpu_set_periodic_timer per = { .period_ns = 3600000 * MS + i };
            rc = HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(0), &per);
        }
        if (rc == 0 && (i & 7) == 0)
            rc = HYPERVISOR_set_timer_op(now + 7200000 * MS + i);
    }
    check(rc == 0, "bounds.timers_rearmed", "rc %ld", rc);
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, xen_vcpu_id(0), NULL);
}

static int32_t backend_copy(uint32_t ref)
{
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_COPY_FROM;
    cmd.domid = self_domid;
    cmd.ref = ref;
    cmd.length = 64;
    cmd.buffer = (uint64_t)(uintptr_t)buffer;
    return xk_testdev_run(&cmd);
}

static void test_still_works(void)
{
    /* a grant through frame 0 at a fresh hole gfn, copied by the backend */
    long rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, FINAL_GPFN);
    check(rc == 0, "bounds.after.map_frame", "rc %ld", rc);
    volatile grant_entry_v1_t *v1 = (volatile grant_entry_v1_t *)(uintptr_t)(FINAL_GPFN << 12);
    for (unsigned i = 0; i < 64; i++)
        page[i] = (uint8_t)(i ^ 0x5A);
    v1[REF].domid = 0;
    v1[REF].frame = (uint32_t)((uintptr_t)page >> 12);
    __asm__ volatile("sfence" ::: "memory");
    v1[REF].flags = GTF_permit_access | GTF_readonly;
    memset(buffer, 0, 64);
    int32_t r = backend_copy(REF);
    check(r == 0 && !memcmp(buffer, page, 64), "bounds.after.grant_copy", "result %d", r);
    v1[REF].flags = 0;

    /* a loopback event */
    evtchn_port_t a = 0, b = 0;
    rc = xen_evtchn_alloc_unbound(DOMID_SELF, &a);
    if (!check(rc == 0 && a > 0 && a < XEN_MAX_PORTS, "bounds.after.alloc_unbound", "rc %ld port %u", rc, a))
        return;
    rc = xen_evtchn_bind_interdomain(DOMID_SELF, a, &b);
    if (!check(rc == 0 && b > 0 && b < XEN_MAX_PORTS, "bounds.after.bind_interdomain", "rc %ld", rc))
        return;
    xen_delay_ns(2 * MS);
    uint32_t c = xen_ports[b].count;
    rc = xen_evtchn_send(a);
    check(rc == 0 && xen_wait_port(b, c + 1, 200 * MS), "bounds.after.event", "send rc %ld, events %u",
          rc, xen_ports[b].count - c);

    /* a timer event */
    evtchn_port_t tp = 0;
    rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(0), &tp);
    if (!check(rc == 0 && tp < XEN_MAX_PORTS, "bounds.after.bind_virq_timer", "rc %ld", rc))
        return;
    c = xen_ports[tp].count;
    rc = singleshot(xen_system_time() + 2 * MS);
    check(rc == 0 && xen_wait_port(tp, c + 1, 500 * MS), "bounds.after.timer_fires", "rc %ld", rc);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_bounds guest");
    if (!xen_init())
        return 1;
    uint32_t a, b, c, d;
    cpuid(xen.base + 4, 0, &a, &b, &c, &d);
    self_domid = (a & XEN_HVM_CPUID_DOMID_PRESENT) ? (uint16_t)c : 1;
    if (!check(xen_map_shared_info() == 0, "bounds.shinfo", "failed"))
        return 1;
    xen_register_vcpu_info(0);
    check(xen_setup_upcall(0, true) == 0, "bounds.upcall", "failed");
    uint32_t max = max_frames();
    if (!check(max >= 1 && max <= 1024, "bounds.query_size", "max_nr_frames %u", max))
        return 1;
    printf("max_nr_frames %u\n", max);
    test_too_many_frames(max);
    test_walk_frames(max, arg_u32("xk.rounds", 8));
    test_ports();
    test_timers();
    test_still_works();
    return 0;
}
