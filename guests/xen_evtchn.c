/*
 * xen_evtchn - event channels and timers, first with the 2-level ABI, then
 * with FIFO (EVTCHNOP_init_control + expand_array):
 *   loopback (alloc_unbound to self + bind_interdomain), send with the
 *   upcall delivered (counted in the IDT handler), mask / unmask
 *   redelivery, EVTCHNOP_status / close, VIRQ_TIMER with the singleshot
 *   timer (past deadline fires at once; VCPU_SSHOTTMR_future in the past is
 *   -ETIME; stop), the periodic timer and set_timer_op; with two or more
 *   vCPUs (xen_evtchn_smp.yaml): EVTCHNOP_bind_ipi on each vCPU, sent from
 *   the other, delivered on the right vCPU (and VIRQ_TIMER on the AP).
 *
 * Command line: xk.trap=page|direct, xk.upcall=percpu|global (default
 * percpu: HVMOP_set_evtchn_upcall_vector; global: HVM_PARAM_CALLBACK_IRQ
 * vector type), xk.fifo=0 to stop after the 2-level part.
 */
#include "xen_guest.h"

#define MS              1000000ULL
#define EVENT_WAIT_NS   (200 * MS)      /* an event that should come at once */

static bool percpu = true;
static uint16_t self_domid;
static const char *abi = "2l";

static char *tname(const char *what)
{
    static char name[96];
    snprintf(name, sizeof(name), "%s.%s", abi, what);
    return name;
}

/* ---- status helpers --------------------------------------------------------------- */
static long port_status(evtchn_port_t port, struct evtchn_status *st)
{
    memset(st, 0, sizeof(*st));
    st->dom = DOMID_SELF;
    st->port = port;
    return HYPERVISOR_event_channel_op(EVTCHNOP_status, st);
}

/* ---- loopback, mask/unmask, status/close ------------------------------------------ */
static void test_loopback(void)
{
    evtchn_port_t a = 0, b = 0;
    long rc = xen_evtchn_alloc_unbound(DOMID_SELF, &a);
    if (!check(rc == 0 && a > 0 && a < XEN_MAX_PORTS, tname("alloc_unbound"), "rc %ld port %u", rc, a))
        return;
    struct evtchn_status st;
    rc = port_status(a, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_unbound && (st.u.unbound.dom == self_domid),
          tname("status.unbound"), "rc %ld status %u dom %u (self %u)", rc, st.status, st.u.unbound.dom, self_domid);

    rc = xen_evtchn_bind_interdomain(DOMID_SELF, a, &b);
    if (!check(rc == 0 && b > 0 && b < XEN_MAX_PORTS && b != a, tname("bind_interdomain"),
               "rc %ld port %u", rc, b))
        return;
    printf("%s loopback: ports %u <-> %u\n", abi, a, b);
    rc = port_status(a, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_interdomain && st.u.interdomain.dom == self_domid
          && st.u.interdomain.port == b, tname("status.interdomain"), "rc %ld status %u dom %u port %u",
          rc, st.status, st.u.interdomain.dom, st.u.interdomain.port);

    /* Xen raises the new local port once at bind time (notifications the unbound
     * remote end may have lost) */
    uint32_t cb = xen_ports[b].count;
    xen_wait_port(b, cb + 1, EVENT_WAIT_NS);
    xen_delay_ns(2 * MS);
    check(xen_ports[b].count == cb + 1, tname("bind_interdomain.notifies_local"),
          "port %u got %u events at bind time, Xen sends 1", b, xen_ports[b].count - cb);
    uint32_t up0 = xen_upcalls[0], ca = xen_ports[a].count;
    cb = xen_ports[b].count;
    rc = xen_evtchn_send(b);
    bool got = xen_wait_port(a, ca + 1, EVENT_WAIT_NS);
    check(rc == 0 && got, tname("send.delivered"), "send rc %ld, port %u count %u -> %u", rc, a, ca,
          xen_ports[a].count);
    check(xen_upcalls[0] > up0, tname("send.upcall"), "no upcall interrupt (count %u)", xen_upcalls[0]);
    check(xen_ports[b].count == cb, tname("send.only_remote_end"), "the sending end %u got %u event(s) too",
          b, xen_ports[b].count - cb);
    rc = xen_evtchn_send(a);
    check(rc == 0 && xen_wait_port(b, cb + 1, EVENT_WAIT_NS), tname("send.reverse"),
          "rc %ld, port %u count %u", rc, b, xen_ports[b].count);

    /* mask: the event stays pending and is not delivered; unmask redelivers */
    xen_evtchn_mask(a);
    ca = xen_ports[a].count;
    up0 = xen_upcalls[0];
    rc = xen_evtchn_send(b);
    xen_delay_ns(5 * MS);
    check(rc == 0 && xen_ports[a].count == ca, tname("mask.no_delivery"), "rc %ld, delivered while masked", rc);
    check(xen_evtchn_is_pending(a), tname("mask.pending"), "pending bit not set for the masked port %u", a);
    rc = xen_evtchn_unmask(a);
    got = xen_wait_port(a, ca + 1, EVENT_WAIT_NS);
    check(rc == 0 && got, tname("unmask.redelivers"), "unmask rc %ld, count %u (was %u), upcalls %u -> %u",
          rc, xen_ports[a].count, ca, up0, xen_upcalls[0]);
    check(!xen_evtchn_is_masked(a), tname("unmask.clears_mask"), "mask bit still set");
    check(!xen_evtchn_is_pending(a), tname("unmask.pending_consumed"), "pending still set after delivery");

    /* close one end: the other becomes unbound; sends on it are dropped */
    rc = xen_evtchn_close(b);
    check(rc == 0, tname("close"), "rc %ld", rc);
    rc = port_status(a, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_unbound, tname("close.peer_unbound"), "rc %ld status %u", rc, st.status);
    rc = port_status(b, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_closed, tname("status.closed"), "rc %ld status %u", rc, st.status);
    ca = xen_ports[a].count;
    rc = xen_evtchn_send(a);
    check(rc == 0, tname("send.unbound_dropped"), "send on an unbound port: %ld (Xen drops it: 0)", rc);
    rc = xen_evtchn_send(b);
    check(rc == -XEN_EINVAL, tname("send.closed"), "send on a closed port: %ld", rc);
    rc = xen_evtchn_close(a);
    check(rc == 0, tname("close.second"), "rc %ld", rc);
    rc = xen_evtchn_close(a);
    check(rc == -XEN_EINVAL, tname("close.twice"), "closing a closed port: %ld", rc);
    rc = port_status(100000, &st);
    check(rc == -XEN_EINVAL, tname("status.bad_port"), "rc %ld", rc);
    rc = xen_evtchn_send(100000);
    check(rc == -XEN_EINVAL, tname("send.bad_port"), "rc %ld", rc);
    struct evtchn_bind_interdomain bi = { .remote_dom = DOMID_SELF, .remote_port = 100000 };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &bi);
    check(rc == -XEN_EINVAL, tname("bind_interdomain.bad_port"), "rc %ld", rc);
    struct evtchn_alloc_unbound au = { .dom = DOMID_SELF, .remote_dom = 0x7000 };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &au);
    check(rc == -XEN_ESRCH || rc == 0, tname("alloc_unbound.unknown_remote"),
          "rc %ld (Xen allows any remote domid until bind)", rc);
    if (rc == 0)
        xen_evtchn_close(au.port);
}

/* ---- timers ------------------------------------------------------------------------ */
static long singleshot(uint64_t deadline, uint32_t flags)
{
    struct vcpu_set_singleshot_timer t = { .timeout_abs_ns = deadline, .flags = flags };
    return HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, xen_vcpu_id(xen_cpu()), &t);
}

/* Arm the single-shot timer for `deadline` (VCPUOP_set_singleshot_timer, or set_timer_op), then
 * stop it (VCPUOP_stop_singleshot_timer, or set_timer_op(0)); *at is the system time when the stop
 * returned, *before whether VIRQ_TIMER was pending then. */
enum stop_kind { STOP_SINGLESHOT, STOP_TIMER_OP };

static bool arm_and_stop(enum stop_kind kind, uint64_t deadline, bool *before, uint64_t *at, evtchn_port_t tp)
{
    long rc, rc2;
    if (kind == STOP_SINGLESHOT) {
        rc = singleshot(deadline, 0);
        rc2 = HYPERVISOR_vcpu_op(VCPUOP_stop_singleshot_timer, xen_vcpu_id(0), NULL);
    } else {
        rc = HYPERVISOR_set_timer_op(deadline);
        rc2 = HYPERVISOR_set_timer_op(0);
    }
    *at = xen_system_time();
    *before = xen_evtchn_is_pending(tp);
    return rc == 0 && rc2 == 0;
}

/* Xen's rule (common/sched/core.c: set_timer_op(0) and VCPUOP_stop_singleshot_timer are
 * stop_timer() on the vCPU's single-shot timer; common/timer.c: a stopped timer's handler does
 * not run): once the stop returns, the timer does not fire.  A VIRQ_TIMER it raised before (its
 * deadline passed while the hypercalls ran) stays pending and is delivered.  Interrupts are off
 * here (outside the waits), so what is pending when the stop returns is all that may come: that
 * is checked, whatever the hypercalls took.  The margin grows until one stop beats its deadline,
 * so the "stopped before it fired" case is the one exercised. */
static void check_stop(evtchn_port_t tp, enum stop_kind kind, const char *what)
{
    char name[64];
    snprintf(name, sizeof(name), "%s", tname(what));
    for (uint64_t margin = 10 * MS; margin <= 640 * MS; margin *= 8) {
        xk_irq_disable();
        uint32_t c = xen_ports[tp].count;
        uint64_t deadline = xen_system_time() + margin, at;
        bool before;
        bool ok = arm_and_stop(kind, deadline, &before, &at, tp);
        bool early = before && at < deadline;
        xen_wait_port(tp, c + before, EVENT_WAIT_NS);
        xen_delay_ns(deadline > at ? deadline - at + margin : margin);
        uint32_t got = xen_ports[tp].count - c;
        if (!check(ok && !early && got == (uint32_t)before, name,
                   "%s; %u event(s), %u pending when the stop returned %ld ns before the deadline%s",
                   ok ? "rc 0" : "arming or stopping failed", got, (unsigned)before,
                   (long)(deadline - at), early ? ": it fired early" : "") || !before)
            return;
        printf("%s %s: the stop returned %lu ns after a %lu ns deadline, again\n", abi, what,
               (unsigned long)(at - deadline), (unsigned long)margin);
    }
    skip(name, "each stop returned after its deadline (up to 640 ms): the stopped-in-time case was not reached");
}

static void test_timers(void)
{
    evtchn_port_t tp = 0;
    long rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(0), &tp);
    if (!check(rc == 0 && tp > 0 && tp < XEN_MAX_PORTS, tname("bind_virq.timer"), "rc %ld port %u", rc, tp))
        return;
    evtchn_port_t dup = 0;
    rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(0), &dup);
    check(rc == -XEN_EEXIST, tname("bind_virq.twice"), "rc %ld", rc);
    struct evtchn_status st;
    rc = port_status(tp, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_virq && st.u.virq == VIRQ_TIMER && st.vcpu == xen_vcpu_id(0),
          tname("status.virq"), "rc %ld status %u virq %u vcpu %u", rc, st.status, st.u.virq, st.vcpu);

    /* Linux's clockevent stops the periodic timer first (BUG if that fails) */
    rc = HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, xen_vcpu_id(0), NULL);
    check(rc == 0, tname("stop_periodic_timer"), "rc %ld", rc);

    uint32_t c = xen_ports[tp].count;
    uint64_t now = xen_system_time();
    rc = singleshot(now - 1 * MS, 0);
    check(rc == 0 && xen_wait_port(tp, c + 1, EVENT_WAIT_NS), tname("singleshot.past_fires"),
          "rc %ld, count %u", rc, xen_ports[tp].count);

    c = xen_ports[tp].count;
    rc = singleshot(xen_system_time() - 1 * MS, VCPU_SSHOTTMR_future);
    check(rc == -XEN_ETIME, tname("singleshot.future_flag_past"), "rc %ld, expected -ETIME", rc);
    xen_delay_ns(2 * MS);
    check(xen_ports[tp].count == c, tname("singleshot.etime_not_armed"), "the refused timer fired");

    /* VCPU_SSHOTTMR_future is -ETIME when the deadline has passed by the time Xen looks: a
     * call that took longer than the margin gets it rightly, and is made again with a wider one */
    c = xen_ports[tp].count;
    uint64_t deadline = 0, after = 0;
    for (uint64_t margin = 3 * MS; margin <= 192 * MS; margin *= 8) {
        deadline = xen_system_time() + margin;
        rc = singleshot(deadline, VCPU_SSHOTTMR_future);
        after = xen_system_time();
        if (rc != -XEN_ETIME || after < deadline)
            break;
        printf("%s singleshot: -ETIME, the call returned %lu ns after a %lu ns deadline, again\n", abi,
               (unsigned long)(after - deadline), (unsigned long)margin);
    }
    bool fired = rc == 0 && xen_wait_port(tp, c + 1, EVENT_WAIT_NS + (deadline > after ? deadline - after : 0));
    uint64_t at = xen_ports[tp].last_ns;
    printf("%s singleshot: deadline %lu fired at %lu (%ld ns late)\n", abi, deadline, at, (long)(at - deadline));
    check(rc == 0 && fired, tname("singleshot.fires"), "rc %ld, count %u, the call returned %ld ns before the deadline",
          rc, xen_ports[tp].count, (long)(deadline - after));
    check(!fired || at >= deadline, tname("singleshot.not_early"), "fired %lu ns early", deadline - at);

    check_stop(tp, STOP_SINGLESHOT, "singleshot.stop");

    /* periodic: 2 ms period, at least 3 ticks, then silence after stop */
    c = xen_ports[tp].count;
    struct vcpu_set_periodic_timer per = { .period_ns = 2 * MS };
    rc = HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(0), &per);
    fired = xen_wait_port(tp, c + 3, 500 * MS);
    long rc2 = HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, xen_vcpu_id(0), NULL);
    check(rc == 0 && fired, tname("periodic.ticks"), "rc %ld, %u ticks", rc, xen_ports[tp].count - c);
    /* interrupts are off: a tick raised before the stop returned is still pending here, and
     * is the only event that may come */
    c = xen_ports[tp].count;
    uint32_t before = xen_evtchn_is_pending(tp);
    xen_wait_port(tp, c + before, EVENT_WAIT_NS);
    xen_delay_ns(20 * MS);
    check(rc2 == 0 && xen_ports[tp].count == c + before, tname("periodic.stop"),
          "rc %ld, %u ticks after stop (%u raised before it)", rc2, xen_ports[tp].count - c, before);
    struct vcpu_set_periodic_timer tiny = { .period_ns = 1000 };
    rc = HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, xen_vcpu_id(0), &tiny);
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, xen_vcpu_id(0), NULL);
    check(rc == -XEN_EINVAL || rc == 0, tname("periodic.tiny_period"), "rc %ld", rc);
    xen_delay_ns(1 * MS);

    /* set_timer_op: absolute deadline; 0 cancels */
    c = xen_ports[tp].count;
    rc = HYPERVISOR_set_timer_op(xen_system_time() + 2 * MS);
    check(rc == 0 && xen_wait_port(tp, c + 1, EVENT_WAIT_NS), tname("set_timer_op.fires"),
          "rc %ld, count %u", rc, xen_ports[tp].count - c);
    check_stop(tp, STOP_TIMER_OP, "set_timer_op.cancel");

    evtchn_port_t dbg = 0;
    rc = xen_evtchn_bind_virq(VIRQ_DEBUG, xen_vcpu_id(0), &dbg);
    check(rc == 0, tname("bind_virq.debug"), "rc %ld (Linux's 2-level IPI setup needs it)", rc);
    rc = xen_evtchn_bind_virq(1000, xen_vcpu_id(0), &dup);
    check(rc == -XEN_EINVAL, tname("bind_virq.bad_virq"), "rc %ld", rc);
    rc = xen_evtchn_bind_virq(VIRQ_TIMER, 1000, &dup);
    check(rc == -XEN_ENOENT || rc == -XEN_EINVAL, tname("bind_virq.bad_vcpu"), "rc %ld", rc);
    check(xen_evtchn_close(tp) == 0 && (!dbg || xen_evtchn_close(dbg) == 0), tname("close.virqs"), "close failed");
}

/* ---- SMP: IPIs between vCPUs ---------------------------------------------------------- */
enum ap_cmd { AP_IDLE, AP_SEND, AP_TIMER, AP_BIND_IPI, AP_QUIT };
static volatile uint32_t ap_cmd, ap_arg, ap_ack, ap_result, ap_ready, ap_setup_rc;

static void ap_main(unsigned cpu, uint32_t apic_id)
{
    (void)apic_id;
    xen_cpu_online(cpu);
    long rc = xen_register_vcpu_info(cpu);
    if (!rc)
        rc = xen_setup_upcall(cpu, percpu);
    ap_setup_rc = (uint32_t)rc;
    __atomic_store_n(&ap_ready, 1, __ATOMIC_RELEASE);
    xk_irq_enable();
    for (;;) {
        uint32_t c = __atomic_load_n(&ap_cmd, __ATOMIC_ACQUIRE);
        if (c == AP_IDLE) {
            cpu_relax();
            continue;
        }
        long r = 0;
        if (c == AP_SEND) {
            r = xen_evtchn_send(ap_arg);
        } else if (c == AP_TIMER) {
            r = singleshot(xen_system_time() + 1 * MS, 0);
        } else if (c == AP_BIND_IPI) {
            evtchn_port_t p = 0;
            r = xen_evtchn_bind_ipi(xen_vcpu_id(cpu), &p);
            if (!r)
                r = p;
        } else if (c == AP_QUIT) {
            xk_irq_disable();
            __atomic_store_n(&ap_ack, ap_ack + 1, __ATOMIC_RELEASE);
            return;
        }
        ap_result = (uint32_t)r;
        __atomic_store_n(&ap_cmd, AP_IDLE, __ATOMIC_RELEASE);
        __atomic_store_n(&ap_ack, ap_ack + 1, __ATOMIC_RELEASE);
    }
}

static bool ap_do(uint32_t cmd, uint32_t arg, long *result)
{
    uint32_t ack = ap_ack;
    ap_arg = arg;
    __atomic_store_n(&ap_cmd, cmd, __ATOMIC_RELEASE);
    bool ok = xen_wait_count(&ap_ack, ack + 1, XEN_WAIT_POLLS);
    if (result)
        *result = (int32_t)ap_result;
    return ok;
}

static bool start_ap(const struct hvm_start_info *si)
{
    const struct acpi_rsdp *rsdp = acpi_rsdp(si);
    const struct acpi_madt *madt = rsdp ? (const struct acpi_madt *)acpi_find(rsdp, "APIC", true) : NULL;
    uint32_t ids[XK_MAX_CPUS];
    int n = madt ? acpi_madt_cpus(madt, ids, XK_MAX_CPUS) : 0;
    if (n < 2) {
        skip("smp", "%d CPU(s): the IPI tests need vcpus >= 2 (xen_evtchn_smp.yaml)", n);
        return false;
    }
    uint32_t bsp = lapic_id();
    for (int i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        bool up = smp_start_ap(ids[i], 1, ap_main);
        if (!check(up, "smp.ap_started", "APIC ID %u did not come up", ids[i]))
            return false;
        if (!check(xen_wait_count(&ap_ready, 1, XEN_WAIT_POLLS) && ap_setup_rc == 0, "smp.ap_xen_setup",
                   "vcpu_info/upcall setup on the AP: %d", (int)ap_setup_rc))
            return false;
        printf("AP: cpu 1, APIC ID %u, Xen vcpu id %u\n", ids[i], xen_vcpu_id(1));
        return true;
    }
    return false;
}

static void test_ipis(void)
{
    evtchn_port_t ipi0 = 0;
    long rc = xen_evtchn_bind_ipi(xen_vcpu_id(0), &ipi0);
    long ipi1 = -1;
    bool ok = ap_do(AP_BIND_IPI, 0, &ipi1);
    if (!check(rc == 0 && ok && ipi1 > 0 && ipi1 < XEN_MAX_PORTS, tname("bind_ipi"),
               "BSP rc %ld port %u; AP %s port %ld", rc, ipi0, ok ? "ok" : "timeout", ipi1))
        return;
    struct evtchn_status st;
    rc = port_status((evtchn_port_t)ipi1, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_ipi && st.vcpu == xen_vcpu_id(1), tname("status.ipi"),
          "rc %ld status %u vcpu %u", rc, st.status, st.vcpu);

    /* BSP -> AP */
    uint32_t c1 = xen_ports[ipi1].count, up1 = xen_upcalls[1];
    rc = xen_evtchn_send((evtchn_port_t)ipi1);
    bool got = xen_wait_count(&xen_ports[ipi1].count, c1 + 1, XEN_WAIT_POLLS);
    check(rc == 0 && got && xen_ports[ipi1].cpu == 1, tname("ipi.bsp_to_ap"),
          "rc %ld, delivered %u times, on cpu %u, AP upcalls %u -> %u", rc, xen_ports[ipi1].count - c1,
          xen_ports[ipi1].cpu, up1, xen_upcalls[1]);
    /* AP -> BSP */
    uint32_t c0 = xen_ports[ipi0].count;
    long arc = -1;
    ok = ap_do(AP_SEND, ipi0, &arc);
    got = xen_wait_port(ipi0, c0 + 1, EVENT_WAIT_NS);
    check(ok && arc == 0 && got && xen_ports[ipi0].cpu == 0, tname("ipi.ap_to_bsp"),
          "AP send %s rc %ld, delivered %u times, on cpu %u", ok ? "ran" : "timed out", arc,
          xen_ports[ipi0].count - c0, xen_ports[ipi0].cpu);
    /* the AP's own timer VIRQ */
    evtchn_port_t tp1 = 0;
    rc = xen_evtchn_bind_virq(VIRQ_TIMER, xen_vcpu_id(1), &tp1);
    if (check(rc == 0, tname("bind_virq.timer_ap"), "rc %ld", rc)) {
        uint32_t c = xen_ports[tp1].count;
        ok = ap_do(AP_TIMER, 0, &arc);
        got = xen_wait_count(&xen_ports[tp1].count, c + 1, XEN_WAIT_POLLS);
        check(ok && arc == 0 && got && xen_ports[tp1].cpu == 1, tname("timer.on_ap"),
              "AP singleshot rc %ld, fired %u times, on cpu %u", arc, xen_ports[tp1].count - c, xen_ports[tp1].cpu);
        xen_evtchn_close(tp1);
    }
    xen_evtchn_close(ipi0);
    xen_evtchn_close((evtchn_port_t)ipi1);
}

/* ---- FIFO ---------------------------------------------------------------------------- */
static bool switch_to_fifo(bool smp)
{
    long rc = xen_fifo_init_cpu(0);
    if (rc == -XEN_ENOSYS) {
        skip("fifo", "EVTCHNOP_init_control not implemented (Linux falls back to 2-level)");
        return false;
    }
    if (!check(rc == 0, "fifo.init_control", "rc %ld", rc))
        return false;
    rc = xen_fifo_expand();
    if (!check(rc == 0, "fifo.expand_array", "rc %ld", rc))
        return false;
    if (smp) {
        rc = xen_fifo_init_cpu(1);
        if (!check(rc == 0, "fifo.init_control_ap", "rc %ld", rc))
            return false;
    }
    struct evtchn_init_control again = { .control_gfn = 0x300, .vcpu = xen_vcpu_id(0) };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_init_control, &again);
    check(rc == -XEN_EINVAL, "fifo.init_control_twice", "rc %ld", rc);
    struct evtchn_init_control badvcpu = { .control_gfn = 0x300, .vcpu = 1000 };
    rc = HYPERVISOR_event_channel_op(EVTCHNOP_init_control, &badvcpu);
    check(rc == -XEN_ENOENT || rc == -XEN_EINVAL, "fifo.init_control_bad_vcpu", "rc %ld", rc);
    abi = "fifo";
    return true;
}

int main(const struct hvm_start_info *si)
{
    puts("xenkvm xen_evtchn guest");
    char mode[16] = "percpu";
    xk_cmdline_value("xk.upcall", mode, sizeof(mode));
    percpu = strcmp(mode, "global") != 0;
    if (!xen_init())
        return 1;
    uint32_t a, b, c, d;
    cpuid(xen.base + 4, 0, &a, &b, &c, &d);
    self_domid = (a & XEN_HVM_CPUID_DOMID_PRESENT) ? (uint16_t)c : 0;
    printf("domid %u, upcall mode %s\n", self_domid, percpu ? "per-vCPU vector" : "global callback vector");

    long rc = xen_map_shared_info();
    if (!check(rc == 0, "shinfo.map", "rc %ld", rc))
        return 1;
    rc = xen_register_vcpu_info(0);
    check(rc == 0, "vcpu_info.register", "rc %ld", rc);
    rc = xen_setup_upcall(0, percpu);
    if (!check(rc == 0, percpu ? "upcall.set_evtchn_upcall_vector" : "upcall.callback_irq", "rc %ld", rc))
        return 1;
    if (percpu) {
        /* Linux then sets CALLBACK_IRQ=1 to "trick the toolstack"; it must succeed */
        rc = xen_set_param(HVM_PARAM_CALLBACK_IRQ, 1);
        check(rc == 0, "upcall.callback_irq_trick", "rc %ld", rc);
        struct xen_hvm_evtchn_upcall_vector bad = { .vcpu = 1000, .vector = XEN_UPCALL_VECTOR };
        rc = HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &bad);
        check(rc == -XEN_ENOENT || rc == -XEN_EINVAL, "upcall.bad_vcpu", "rc %ld", rc);
        struct xen_hvm_evtchn_upcall_vector lowvec = { .vcpu = 0, .vector = 0x0F };
        rc = HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &lowvec);
        check(rc == -XEN_EINVAL, "upcall.vector_below_0x10", "rc %ld", rc);
        struct xen_hvm_evtchn_upcall_vector back = { .vcpu = 0, .vector = XEN_UPCALL_VECTOR };
        HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &back);
    }

    bool smp = start_ap(si);
    test_loopback();
    test_timers();
    if (smp)
        test_ipis();

    if (!xk_cmdline_has("xk.fifo=0") && switch_to_fifo(smp)) {
        test_loopback();
        test_timers();
        if (smp)
            test_ipis();
    }
    if (smp)
        ap_do(AP_QUIT, 0, NULL);
    check(xen_stray_events == 0, "events.no_stray", "%u events on untracked ports", xen_stray_events);
    return 0;
}
