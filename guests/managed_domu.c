/*
 * managed_domu - a domain for the managed-domain tests (tests/toolstack/):
 * it runs until the toolstack tells it to stop, and reports what it sees.
 *
 *   "TOOLSTACK-UP"            once per boot, when the xenstore watch is set; also
 *                             "managed_domu up" on Xen's console (console_io:
 *                             what `xenkvm dmesg` shows)
 *   "TICK <n> <ns>"           every TICK_NS of Xen system time (pvclock), so a
 *                             host test can read guest time off the console
 *                             (a pause must not move it)
 *   "KEY <hex>"               each byte typed on the console (the UART)
 *   "shutdown request: ..."   a write to control/shutdown (poweroff, halt,
 *                             reboot, crash), acknowledged ("" written back,
 *                             as Linux's xenbus handler does) and acted on
 *                             with SCHEDOP_shutdown and the matching reason
 *
 * With "xk.vcpudown" on its command line (managed_vcpudown.yaml, 2 vCPUs) it
 * also starts vCPU 1, which counts in a loop, and takes it down with
 * VCPUOP_down, as CPU hot-unplug does, keeping it down (Linux keeps fewer
 * vCPUs online than configured after `xl vcpu-set`):
 *   "VCPU1 DOWN <count>"      vCPU 1 is down (VCPUOP_is_up says 0) and its
 *                             counter stopped at <count>
 *   key 'u'                   "VCPU1 UP was_up=<0|1> count=<then>/<before>":
 *                             whether it was down and had not counted since
 *                             it went down, then VCPUOP_up, and then
 *                             "VCPU1 RUNNING" once it counts again (or
 *                             "VCPU1 STILL-STOPPED" after 5 s of Xen time)
 *   "VCPU1-FAILED: ..."       something above went wrong
 *
 * Everything is polled: the loop spins on pvclock, the UART's LSR and the
 * xenstore ring, so no interrupt setup is needed.
 */
#include "xen_guest.h"

#define MS_NS   1000000ULL
#define TICK_NS (20ULL * MS_NS)
#define UART_RBR (XK_COM1 + 0)
#define UART_LSR (XK_COM1 + 5)

static struct xs_reply r;

/* -- xk.vcpudown: vCPU 1 counts while it runs; the BSP takes it down and up --------- */
static volatile uint64_t ap_count;
static uint64_t down_count;
static bool vcpudown;

static void ap_counter(unsigned cpu, uint32_t apic_id)
{
    (void)apic_id;
    xen_cpu_online(cpu);                              /* its Xen vCPU id, for xen_vcpu_id(1) */
    HYPERVISOR_xen_version(XENVER_version, NULL);     /* Xen sees the vCPU as started */
    for (;;) {
        __atomic_add_fetch(&ap_count, 1, __ATOMIC_RELAXED);
        cpu_relax();
    }
}

/* The AP's count once it has not moved for 50 ms of Xen time (at most 5 s). */
static bool ap_count_settled(uint64_t *count)
{
    uint64_t deadline = xen_system_time() + 5000ULL * MS_NS;
    uint64_t last = ap_count;
    while (xen_system_time() < deadline) {
        uint64_t until = xen_system_time() + 50ULL * MS_NS;
        while (xen_system_time() < until)
            cpu_relax();
        uint64_t now = ap_count;
        if (now == last) {
            *count = now;
            return true;
        }
        last = now;
    }
    return false;
}

static bool ap_counts_past(uint64_t count)
{
    uint64_t deadline = xen_system_time() + 5000ULL * MS_NS;
    while (xen_system_time() < deadline)
        if (ap_count > count)
            return true;
    return false;
}

static bool start_and_down_vcpu1(const struct hvm_start_info *si)
{
    const struct acpi_rsdp *rsdp = acpi_rsdp(si);
    const struct acpi_madt *madt = rsdp ? (const struct acpi_madt *)acpi_find(rsdp, "APIC", true) : NULL;
    uint32_t ids[XK_MAX_CPUS];
    int n = madt ? acpi_madt_cpus(madt, ids, XK_MAX_CPUS) : 0;
    uint32_t bsp = lapic_id();
    int ap = -1;
    for (int i = 0; i < n && ap < 0; i++)
        if (ids[i] != bsp)
            ap = i;
    lapic_enable();
    if (ap < 0 || !smp_start_ap(ids[ap], 1, ap_counter)) {
        printf("VCPU1-FAILED: %d CPU(s), no AP started\n", n);
        return false;
    }
    if (!ap_counts_past(0)) {
        puts("VCPU1-FAILED: the AP does not count");
        return false;
    }
    long rc = HYPERVISOR_vcpu_op(VCPUOP_down, xen_vcpu_id(1), NULL);
    long is_up = HYPERVISOR_vcpu_op(VCPUOP_is_up, xen_vcpu_id(1), NULL);
    if (rc != 0 || is_up != 0 || !ap_count_settled(&down_count)) {
        printf("VCPU1-FAILED: VCPUOP_down %ld, is_up %ld, count %lu\n", rc, is_up, (unsigned long)ap_count);
        return false;
    }
    printf("VCPU1 DOWN %lu\n", (unsigned long)down_count);
    return true;
}

static void vcpu1_up(void)
{
    long was_up = HYPERVISOR_vcpu_op(VCPUOP_is_up, xen_vcpu_id(1), NULL);
    uint64_t before = ap_count;
    long rc = HYPERVISOR_vcpu_op(VCPUOP_up, xen_vcpu_id(1), NULL);
    printf("VCPU1 UP was_up=%ld count=%lu/%lu rc=%ld\n", was_up, (unsigned long)before,
           (unsigned long)down_count, rc);
    puts(ap_counts_past(before) ? "VCPU1 RUNNING" : "VCPU1 STILL-STOPPED");
}

static void shutdown_now(unsigned reason, const char *why)
{
    struct sched_shutdown sd = { .reason = reason };
    printf("calling SCHEDOP_shutdown(%s)\n", why);
    long rc = HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    printf("SCHEDOP_shutdown(%s) returned %ld\n", why, rc);
}

/* A control/shutdown event: read the request, acknowledge it, act on it. */
static void on_control_event(void)
{
    char path[128], token[32];
    if (!xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
        return;
    if (xs_read(0, "control/shutdown", &r) != 0 || !r.body[0])
        return;
    char request[32];
    snprintf(request, sizeof(request), "%s", r.body);
    printf("shutdown request: \"%s\"\n", request);
    xs_write(0, "control/shutdown", "");
    if (!strcmp(request, "poweroff") || !strcmp(request, "halt"))
        shutdown_now(SHUTDOWN_poweroff, "poweroff");
    else if (!strcmp(request, "reboot"))
        shutdown_now(SHUTDOWN_reboot, "reboot");
    else if (!strcmp(request, "crash"))
        shutdown_now(SHUTDOWN_crash, "crash");
    else
        printf("ignoring unknown request \"%s\"\n", request);
}

int main(const struct hvm_start_info *si)
{
    puts("xenkvm managed_domu guest");
    if (!xen_init() || xen_map_shared_info() != 0 || xs_init() != 0) {
        puts("TOOLSTACK-FAILED: no Xen, shared_info or xenstore");
        return 1;
    }
    char path[128], token[32];
    xs_write(0, "control/feature-poweroff", "1");
    xs_write(0, "control/feature-reboot", "1");
    if (xs_watch("control/shutdown", "shutdown") != 0
        || !xs_next_watch_event(path, sizeof(path), token, sizeof(token))) {   /* the initial event */
        puts("TOOLSTACK-FAILED: cannot watch control/shutdown");
        return 1;
    }
    vcpudown = xk_cmdline_has("xk.vcpudown");
    if (vcpudown && !start_and_down_vcpu1(si))
        return 1;
    puts("TOOLSTACK-UP");
    static const char up[] = "managed_domu up\n";
    HYPERVISOR_console_io(CONSOLEIO_write, sizeof(up) - 1, up);
    uint64_t n = 0, next = xen_system_time();
    for (;;) {
        uint64_t now = xen_system_time();
        if (now >= next) {
            printf("TICK %lu %lu\n", (unsigned long)n++, (unsigned long)now);
            next = now + TICK_NS;
        }
        if (inb(UART_LSR) & 1) {
            unsigned key = inb(UART_RBR);
            printf("KEY %02x\n", key);
            if (vcpudown && key == 'u')
                vcpu1_up();
        }
        if (xs_watch_event_ready())
            on_control_event();
        cpu_relax();
    }
}
