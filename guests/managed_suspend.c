/*
 * managed_suspend - cooperative save and restore (`xenkvm save`, as `xl save`) the way Linux
 * does it (drivers/xen/manage.c, arch/x86/xen/suspend_hvm.c): it announces
 * control/feature-suspend, watches control/shutdown, and on "suspend" acknowledges it and calls
 * SCHEDOP_shutdown(SHUTDOWN_suspend) with interrupts off.  The result says where it runs on:
 *
 *   0  a new domain (restored): shared_info, vcpu_info, the upcall vector, the FIFO control
 *      block (xk.fifo), VIRQ_TIMER and its timer, the loopback channel, the grant frame, the
 *      store's event channel (HVM_PARAM_STORE_EVTCHN again) and both xenstore watches are set
 *      up again, and the grant table is the new domain's (only the toolstack's reserved
 *      entries: Linux frontends grant their pages again);
 *   1  the suspend was cancelled (the save failed): everything is still in place.
 *
 * Prints "SUSPEND-READY" when the save may start, "SUSPEND returned <rc>" after it, then
 * checks pvclock, the timer, the loopback channel, and, after "WAITING-PING", that the host's
 * write of data/ping reaches its watch; then SUMMARY and power-off.
 */
#include "xen_guest.h"

#define GRANT_GPFN      0xF0000ULL      /* MMIO hole, as xen_gnttab uses */
#define REF             10
#define MARK_FRAME      0x12345
#define MS              1000000ULL

static volatile grant_entry_v1_t *gnt = (volatile grant_entry_v1_t *)(uintptr_t)(GRANT_GPFN << 12);
static evtchn_port_t timer_port, lo_a, lo_b;
static struct xs_reply r;
static char path[128], token[32];

static bool watch(const char *node, const char *tok)
{
    /* registering a watch fires it once at once: consume that event (and any older one queued
     * for another watch, e.g. the event of our own acknowledging write of control/shutdown) */
    if (xs_watch(node, tok) != 0)
        return false;
    while (xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
        if (!strcmp(token, tok))
            return true;
    return false;
}

/* What a new domain lacks until its guest sets it up (Linux: xen_hvm_post_suspend,
 * xen_irq_resume, gnttab_resume, xs_resume). */
static long connect(bool fifo)
{
    long rc = xen_map_shared_info();
    rc = rc ? rc : xen_register_vcpu_info(0);
    rc = rc ? rc : xen_setup_upcall(0, true);
    if (!rc && fifo)
        rc = xen_fifo_init_cpu(0) ? -1 : xen_fifo_expand();
    rc = rc ? rc : xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(0), &timer_port);
    struct vcpu_set_periodic_timer per = { .period_ns = 20 * MS };
    rc = rc ? rc : HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(0), &per);
    rc = rc ? rc : xen_evtchn_alloc_unbound(DOMID_SELF, &lo_a);
    rc = rc ? rc : xen_evtchn_bind_interdomain(DOMID_SELF, lo_a, &lo_b);
    /* a new domain's ports start masked (libxc's restore masks every 2-level port): Linux
     * unmasks each IRQ it enables again (resume_irqs); at boot this changes nothing */
    rc = rc ? rc : xen_evtchn_unmask(timer_port);
    rc = rc ? rc : xen_evtchn_unmask(lo_a);
    rc = rc ? rc : xen_evtchn_unmask(lo_b);
    rc = rc ? rc : xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN);
    rc = rc ? rc : xs_init();
    if (!rc && !(watch("control/shutdown", "ctl") && watch("data/ping", "ping")))
        rc = -2;
    return rc;
}

static void grant_mark(void)
{
    gnt[REF].domid = 0;
    gnt[REF].frame = MARK_FRAME;
    __asm__ volatile("sfence" ::: "memory");
    gnt[REF].flags = GTF_permit_access | GTF_readonly;
}

/* Wait for a watch event with `tok` (others are dropped), at most `max_ns` of system time. */
static bool wait_event(const char *tok, uint64_t max_ns)
{
    uint64_t end = xen_system_time() + max_ns;
    while (xen_system_time() < end) {
        if (xs_watch_event_ready() && xs_next_watch_event(path, sizeof(path), token, sizeof(token))
            && !strcmp(token, tok))
            return true;
        cpu_relax();
    }
    return false;
}

static void wait_for_suspend_request(void)
{
    for (;;) {
        while (!wait_event("ctl", 1000 * MS))
            ;
        if (xs_read(0, "control/shutdown", &r) == 0 && !strcmp(r.body, "suspend"))
            break;
    }
    xs_write(0, "control/shutdown", "");         /* acknowledged, as Linux's handler does */
}

static void after_resume(long cancelled, bool fifo)
{
    if (cancelled == 0) {
        long rc = connect(fifo);
        check(rc == 0, "resume.reconnect", "rc %ld", rc);
        if (fifo)
            check(xen_fifo, "fifo", "the FIFO ABI is not in use");
        uint64_t store_pfn = 0;
        xen_get_param(HVM_PARAM_STORE_PFN, &store_pfn);
        check(gnt[GNTTAB_RESERVED_XENSTORE].frame == store_pfn && gnt[REF].flags == 0,
              "resume.new_grant_table", "xenstore entry frame %x, ref %d flags %x",
              gnt[GNTTAB_RESERVED_XENSTORE].frame, REF, gnt[REF].flags);
        grant_mark();                             /* a frontend grants its pages again */
    } else {
        check(gnt[REF].frame == MARK_FRAME && (gnt[REF].flags & GTF_permit_access), "cancel.grant_kept",
              "ref %d frame %x flags %x", REF, gnt[REF].frame, gnt[REF].flags);
    }
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    bool fifo = xk_cmdline_has("xk.fifo");
    if (!xen_init() || !check(connect(fifo) == 0, "connect", "Xen setup refused"))
        return 1;
    xs_write(0, "control/feature-suspend", "1");
    grant_mark();
    check(xen_wait_port(timer_port, xen_ports[timer_port].count + 3, 2000 * MS), "timer.before", "no ticks");
    puts("SUSPEND-READY");
    wait_for_suspend_request();
    uint64_t t0 = xen_system_time();
    struct sched_shutdown sd = { .reason = SHUTDOWN_suspend };
    xk_irq_disable();
    long cancelled = HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    printf("SUSPEND returned %ld\n", cancelled);
    check(cancelled == 0 || cancelled == 1, "suspend.result", "%ld", cancelled);
    after_resume(cancelled, fifo);
    check(xen_system_time() >= t0, "pvclock", "system time went back: %lu -> %lu",
          (unsigned long)t0, (unsigned long)xen_system_time());
    uint32_t ticks = xen_ports[timer_port].count;
    check(xen_wait_port(timer_port, ticks + 10, 5000 * MS), "timer", "%u ticks",
          xen_ports[timer_port].count - ticks);
    uint32_t got = xen_ports[lo_a].count;
    xen_evtchn_send(lo_b);
    check(xen_wait_port(lo_a, got + 1, 1000 * MS), "evtchn.loopback", "count %u", xen_ports[lo_a].count);
    puts("WAITING-PING");
    bool ping = wait_event("ping", 120000 * MS);
    check(ping && xs_read(0, "data/ping", &r) == 0 && !strcmp(r.body, "1"), "xs.watch_fires",
          "event %d", ping);
    check(xen_stray_events == 0, "events.no_stray", "%u", xen_stray_events);
    return 0;
}
