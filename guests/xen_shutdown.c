/*
 * xen_shutdown - the guest side of a toolstack shutdown request: watch
 * control/shutdown over the xenstore ring and, on "poweroff"/"halt" or
 * "reboot", acknowledge it (write "" back, as Linux's xenbus handler does)
 * and call SCHEDOP_shutdown with the matching reason.  The SUMMARY line is
 * printed before the call, which never returns when it works.
 *
 * Command line: xk.trap=page|direct, and one of
 *   (none)            write control/shutdown = "poweroff" ourselves (a self-test)
 *   xk.self=VALUE     write control/shutdown = VALUE ourselves
 *   xk.host_shutdown  print XS-SHUTDOWN-READY and wait (~60 s of pvclock time)
 *                     for the host (`xenkvm shutdown`) to write it
 *   xk.crash          print XENKVM-LAST-WORDS and SCHEDOP_shutdown(crash)
 */
#include "xen_guest.h"

#define SEC 1000000000ULL

static struct xs_reply r;

static XK_NORETURN void shutdown_now(unsigned reason, const char *why)
{
    struct sched_shutdown sd = { .reason = reason };
    printf("SUMMARY: %u passed, %u failed\n", harness_passed(), harness_failed());
    printf("calling SCHEDOP_shutdown(%s)\n", why);
    long rc = HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    fail("sched.shutdown_returned", "SCHEDOP_shutdown(%s) returned %ld", why, rc);
    xk_finish();
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_shutdown guest");
    if (!xen_init())
        return 1;
    if (xk_cmdline_has("xk.crash")) {
        puts("XENKVM-LAST-WORDS before the crash");
        shutdown_now(SHUTDOWN_crash, "crash");
    }
    check(xen_map_shared_info() == 0, "shinfo.map", "failed");
    long rc = xs_init();
    if (!check(rc == 0, "xs.ring", "rc %ld", rc))
        return 1;

    rc = xs_read(0, "control/shutdown", &r);
    check(rc == 0 && r.body[0] == 0, "control.shutdown_empty", "rc %ld \"%s\"", rc, rc == 0 ? r.body : "");
    rc = xs_write(0, "control/feature-poweroff", "1");
    check(rc == 0, "control.feature_written", "rc %ld", rc);
    rc = xs_watch("control/shutdown", "shutdown");
    char path[128], token[32];
    bool ev = xs_next_watch_event(path, sizeof(path), token, sizeof(token));
    check(rc == 0 && ev && !strcmp(token, "shutdown"), "control.watch", "rc %ld, %s", rc, ev ? token : "no event");

    char self[32] = "poweroff";
    bool host = xk_cmdline_has("xk.host_shutdown");
    if (!host) {
        xk_cmdline_value("xk.self", self, sizeof(self));
        rc = xs_write(0, "control/shutdown", self);
        check(rc == 0, "control.self_request", "rc %ld", rc);
    } else {
        puts("XS-SHUTDOWN-READY");
    }

    uint64_t end = xen_system_time() + (host ? 60 : 5) * SEC;
    char request[32] = "";
    while (!request[0] && xen_system_time() < end) {
        if (!xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
            continue;
        if (xs_read(0, "control/shutdown", &r) == 0 && r.body[0])
            snprintf(request, sizeof(request), "%s", r.body);
    }
    if (!check(request[0] != 0, "control.request_seen", "nothing written to control/shutdown"))
        return 1;
    printf("shutdown request: \"%s\"\n", request);
    rc = xs_write(0, "control/shutdown", "");          /* the acknowledgement */
    check(rc == 0, "control.acknowledged", "rc %ld", rc);
    if (!strcmp(request, "poweroff") || !strcmp(request, "halt"))
        shutdown_now(SHUTDOWN_poweroff, "poweroff");
    if (!strcmp(request, "reboot"))
        shutdown_now(SHUTDOWN_reboot, "reboot");
    fail("control.unknown_request", "\"%s\" is not poweroff, halt or reboot", request);
    return 1;
}
