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
 * Everything is polled: the loop spins on pvclock, the UART's LSR and the
 * xenstore ring, so no interrupt setup is needed.
 */
#include "xen_guest.h"

#define TICK_NS (20ULL * 1000000ULL)
#define UART_RBR (XK_COM1 + 0)
#define UART_LSR (XK_COM1 + 5)

static struct xs_reply r;

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
    (void)si;
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
        if (inb(UART_LSR) & 1)
            printf("KEY %02x\n", (unsigned)inb(UART_RBR));
        if (xs_watch_event_ready())
            on_control_event();
        cpu_relax();
    }
}
