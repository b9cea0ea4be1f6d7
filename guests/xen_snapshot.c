/*
 * xen_snapshot - a Xen guest with live timers, event channels, a grant and a pending
 * xenstore watch asks for a snapshot mid-run (port XK_SNAPSHOT_PORT, `xenkvm run
 * --snapshot-on-port FILE`), then checks that all of it still works.  A restored run
 * (`xenkvm run --restore FILE`) resumes right after the request and runs the same checks.
 *
 * Before the request: shared_info and vcpu_info registered, the per-vCPU upcall vector,
 * VIRQ_TIMER bound with a 20 ms periodic timer and a single-shot timer armed 300 ms ahead,
 * a loopback channel pair (alloc_unbound to self + bind_interdomain) with one event sent
 * while the receiving port is masked (pending across the snapshot), grant ref 10 on a
 * filled page (checked through the test device's MAP_SUM), and a xenstore watch on
 * data/snap.  After it: the pvclock moved forward, the periodic timer still ticks, the
 * single-shot one fires once, unmasking delivers the saved pending event and a new send
 * arrives, the grant still maps to the same bytes, and a write of data/snap fires the
 * watch with its token.
 *
 * Command line: xk.fifo switches to the FIFO event-channel ABI first.
 */
#include "xen_guest.h"
#include "xen_testdev.h"

#define GRANT_GPFN      0xF0000ULL      /* MMIO hole, as xen_gnttab uses */
#define REF             10
#define MS              1000000ULL

static uint8_t granted[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t buffer[XEN_PAGE] XEN_PAGE_ALIGNED;
static struct xk_testdev_cmd cmd;
static volatile grant_entry_v1_t *gnt = (volatile grant_entry_v1_t *)(uintptr_t)(GRANT_GPFN << 12);
static evtchn_port_t timer_port, sshot_port_unused, lo_a, lo_b;

static int32_t map_sum(uint32_t *sum)
{
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_MAP_SUM;
    cmd.domid = 1;
    cmd.ref = REF;
    cmd.offset = 0;
    cmd.length = XEN_PAGE;
    cmd.buffer = (uint64_t)(uintptr_t)buffer;
    int32_t rc = xk_testdev_run(&cmd);
    *sum = (uint32_t)cmd.value;
    return rc;
}

static bool setup(void)
{
    if (xk_cmdline_has("xk.fifo")) {
        if (!check(xen_fifo_init_cpu(0) == 0 && xen_fifo_expand() == 0, "fifo", "FIFO ABI refused"))
            return false;
    }
    long rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(0), &timer_port);
    if (!check(rc == 0, "bind_virq.timer", "rc %ld", rc))
        return false;
    struct vcpu_set_periodic_timer per = { .period_ns = 20 * MS };
    rc = HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(0), &per);
    if (!check(rc == 0, "periodic", "rc %ld", rc))
        return false;
    rc = xen_evtchn_alloc_unbound(DOMID_SELF, &lo_a);
    rc = rc ? rc : xen_evtchn_bind_interdomain(DOMID_SELF, lo_a, &lo_b);
    if (!check(rc == 0, "loopback", "rc %ld", rc))
        return false;
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN);
    if (!check(rc == 0, "gnttab.frame", "rc %ld", rc))
        return false;
    for (unsigned i = 0; i < XEN_PAGE; i++)
        granted[i] = (uint8_t)(i * 13 + 5);
    gnt[REF].domid = 0;
    gnt[REF].frame = (uint32_t)((uintptr_t)granted >> 12);
    __asm__ volatile("sfence" ::: "memory");
    gnt[REF].flags = GTF_permit_access | GTF_readonly;
    rc = xs_init();
    rc = rc ? rc : xs_write(0, "data/snap", "0");
    rc = rc ? rc : xs_watch("data/snap", "snaptok");
    char path[64], token[32];
    if (!check(rc == 0 && xs_next_watch_event(path, sizeof(path), token, sizeof(token)), "xs.watch",
               "rc %ld, no initial event", rc))
        return false;
    return true;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    (void)sshot_port_unused;
    if (!xen_init())
        return 1;
    if (!check(xen_map_shared_info() == 0 && xen_register_vcpu_info(0) == 0 && xen_setup_upcall(0, true) == 0,
               "init", "shared_info, vcpu_info or the upcall vector refused"))
        return 1;
    puts("before snapshot");
    if (!setup())
        return 1;
    uint32_t sum0 = 0;
    check(map_sum(&sum0) == 0 && sum0 == xk_fnv1a(granted, XEN_PAGE), "grant.before", "sum %x", sum0);
    xen_wait_port(timer_port, xen_ports[timer_port].count + 3, 2000 * MS);
    xen_evtchn_mask(lo_a);
    xen_evtchn_send(lo_b);                          /* pending, masked, across the snapshot */
    struct vcpu_set_singleshot_timer ss = { .timeout_abs_ns = xen_system_time() + 300 * MS };
    HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, xen_vcpu_id(0), &ss);
    uint32_t ticks = xen_ports[timer_port].count;
    uint64_t t0 = xen_system_time();

    outb(XK_SNAPSHOT_PORT, 1);

    puts("after snapshot");
    check(xen_system_time() >= t0, "pvclock", "system time went back: %lu -> %lu", t0, xen_system_time());
    check(xen_wait_port(timer_port, ticks + 20, 5000 * MS), "timer", "%u ticks after the snapshot",
          xen_ports[timer_port].count - ticks);
    check(xen_evtchn_is_pending(lo_a) && xen_ports[lo_a].count == 0, "evtchn.pending_kept",
          "pending %d count %u", xen_evtchn_is_pending(lo_a), xen_ports[lo_a].count);
    xen_evtchn_unmask(lo_a);
    check(xen_wait_port(lo_a, 1, 1000 * MS), "evtchn.unmask_delivers", "count %u", xen_ports[lo_a].count);
    xen_evtchn_send(lo_b);
    check(xen_wait_port(lo_a, 2, 1000 * MS), "evtchn.send", "count %u", xen_ports[lo_a].count);
    uint32_t sum1 = 0;
    check(map_sum(&sum1) == 0 && sum1 == sum0, "grant.after", "sum %x, was %x", sum1, sum0);
    check(xs_write(0, "data/snap", "1") == 0, "xs.write", "refused");
    char path[64], token[32];
    bool ev = xs_next_watch_event(path, sizeof(path), token, sizeof(token));
    check(ev && !strcmp(token, "snaptok") && strstr(path, "data/snap"), "xs.watch_fires",
          "event %d path %s token %s", ev, ev ? path : "-", ev ? token : "-");
    check(xen_stray_events == 0, "events.no_stray", "%u", xen_stray_events);
    return 0;
}
