/*
 * xen_pvconsoles - a freestanding frontend for extra PV consoles
 * (device/console/N, xenkvm/backends/console.py), as Linux hvc_xen drives
 * consoles past the first: a granted page (struct xencons_interface) and an
 * event channel, written as ring-ref and port, then Initialised.
 *
 * Console 1 (a host pty): writes "hello from console 1", waits for a line
 * typed on the pty (the host test types "ping") and answers "pong: <line>".
 * (xk.cons_noinput, for guests/xen_pvconsoles*.yaml run without anyone on
 * the pty: no input is waited for.)
 * xk.cons_snapshot: after connecting, "before" on console 2, then a snapshot (port
 * XK_SNAPSHOT_PORT); "after snapshot" a line on console 1 (the restore's new pty), a line read
 * from it and answered, and "after" on console 2 (tests/backends/test_snapshot_backends.py).
 * Console 2 (a log file): writes 500 numbered lines (5000 bytes: the 2 KiB
 * out ring wraps, waiting for the backend to drain it), then publishes an
 * impossible out_prod: the backend ignores that ring, console 1 and the
 * primary console keep working.
 */
#include "xen_front.h"
#include <xen/io/console.h>

#define NCONS 2
#define REF_CONS(n) (16 + (n))

static uint8_t pages[NCONS + 1][XEN_PAGE] XEN_PAGE_ALIGNED;

struct pvcons {
    char fe[64], be[96];
    evtchn_port_t port;
    volatile struct xencons_interface *intf;
};
static struct pvcons C[NCONS + 1];

static bool wait_be(struct pvcons *c, long want)
{
    uint64_t end = xen_system_time() + 20 * SEC;
    while (xen_system_time() < end) {
        if (read_num(c->be, "state") == want)
            return true;
        xen_delay_ns(MS);
    }
    printf("%s: state %ld, expected %ld\n", c->be, read_num(c->be, "state"), want);
    return false;
}

static bool key_is(const char *dir, const char *key, const char *want, bool prefix)
{
    if (xs_readf(dir, key, &r))
        return false;
    return prefix ? !strncmp(r.body, want, strlen(want)) : !strcmp(r.body, want);
}

static bool connect(unsigned n)
{
    struct pvcons *c = &C[n];
    snprintf(c->fe, sizeof(c->fe), "device/console/%u", n);
    if (xs_readf(c->fe, "backend", &r))
        return false;
    snprintf(c->be, sizeof(c->be), "%s", r.body);
    c->intf = (volatile struct xencons_interface *)pages[n];
    memset(pages[n], 0, XEN_PAGE);
    grant(REF_CONS(n), pages[n], false);
    if (xen_evtchn_alloc_unbound(0, &c->port))
        return false;
    xs_writef(c->fe, "ring-ref", "%lu", REF_CONS(n));
    xs_writef(c->fe, "port", "%lu", c->port);
    xs_writef(c->fe, "state", "%lu", XenbusStateInitialised);
    if (!wait_be(c, XenbusStateConnected))
        return false;
    xs_writef(c->fe, "state", "%lu", XenbusStateConnected);
    return true;
}

/* Write all of `s`, waiting (bounded) for room in out[]. */
static bool cons_write(struct pvcons *c, const char *s, unsigned len)
{
    uint64_t end = xen_system_time() + 10 * SEC;
    while (len && xen_system_time() < end) {
        XENCONS_RING_IDX cons = c->intf->out_cons, prod = c->intf->out_prod;
        xen_mb();
        unsigned room = sizeof(c->intf->out) - (prod - cons), n = 0;
        for (; n < room && n < len; n++)
            c->intf->out[MASK_XENCONS_IDX(prod + n, c->intf->out)] = s[n];
        xen_wmb();
        c->intf->out_prod = prod + n;
        xen_evtchn_send(c->port);
        s += n;
        len -= n;
        if (len)
            xen_delay_ns(MS);
    }
    return len == 0;
}

/* A line typed on the host (up to '\n' or '\r'), or -1 after 30 s. */
static int cons_readline(struct pvcons *c, char *buf, unsigned size)
{
    unsigned got = 0;
    uint64_t end = xen_system_time() + 30 * SEC;
    while (xen_system_time() < end) {
        XENCONS_RING_IDX cons = c->intf->in_cons, prod = c->intf->in_prod;
        xen_rmb();
        for (; cons != prod; cons++) {
            char ch = c->intf->in[MASK_XENCONS_IDX(cons, c->intf->in)];
            if (ch == '\n' || ch == '\r') {
                c->intf->in_cons = cons + 1;
                xen_evtchn_send(c->port);
                buf[got] = 0;
                return (int)got;
            }
            if (got + 1 < size)
                buf[got++] = ch;
        }
        xen_mb();
        c->intf->in_cons = cons;
        xen_evtchn_send(c->port);
        xen_delay_ns(2 * MS);
    }
    return -1;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_pvconsoles guest");
    if (!xen_init())
        return 1;
    check(xen_map_shared_info() == 0, "shinfo.map", "failed");
    check(xen_setup_upcall(0, true) == 0, "cons.upcall", "failed");
    if (!check(xs_init() == 0, "xs.ring", "failed"))
        return 1;
    if (!check(xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN) == 0, "cons.grant_frame", "failed"))
        return 1;
    check(xs_read(0, "device/console/0/backend", &r) != 0, "cons.no_device_console_0", "the primary is not a device");
    for (unsigned n = 1; n <= NCONS; n++) {
        char name[32];
        snprintf(name, sizeof(name), "cons.%u.connected", n);
        if (!check(connect(n), name, "handshake failed"))
            return 1;
    }
    check(key_is(C[1].fe, "type", "xenconsoled", false) && key_is(C[1].be, "protocol", "vt100", false) &&
          key_is(C[1].be, "tty", "/dev/pts/", true) && key_is(C[1].fe, "output", "pty", false),
          "cons.libxl_keys", "%s", r.body);
    check(key_is(C[2].fe, "output", "file:", true), "cons.2.output_file", "%s", r.body);
    if (xk_cmdline_has("xk.cons_snapshot")) {   /* tests/backends/test_snapshot_backends.py */
        check(cons_write(&C[2], "before\n", 7), "cons.2.before", "ring stayed full");
        xen_delay_ns(50 * MS);
        puts("before snapshot");
        outb(XK_SNAPSHOT_PORT, 1);
        puts("after snapshot");
        const char *after = "console 1 after the snapshot\r\n";
        check(cons_write(&C[1], after, (unsigned)strlen(after)), "snap.cons.1.write", "ring stayed full");
        char line[64], reply[96];
        int n = cons_readline(&C[1], line, sizeof(line));
        check(n == 4 && !strcmp(line, "ping"), "snap.cons.1.read_line", "got %d '%s'", n, n >= 0 ? line : "");
        snprintf(reply, sizeof(reply), "pong: %s\r\n", line);
        check(cons_write(&C[1], reply, (unsigned)strlen(reply)), "snap.cons.1.reply", "ring stayed full");
        check(cons_write(&C[2], "after\n", 6), "snap.cons.2.write", "ring stayed full");
        xen_delay_ns(50 * MS);
        puts("CONS-DONE");
        return 0;
    }
    const char *hello = "hello from console 1\r\n";
    check(cons_write(&C[1], hello, (unsigned)strlen(hello)), "cons.1.write", "ring stayed full");
    if (!xk_cmdline_has("xk.cons_noinput")) {      /* a host test types on the pty */
        char line[64], reply[96];
        int n = cons_readline(&C[1], line, sizeof(line));
        check(n == 4 && !strcmp(line, "ping"), "cons.1.read_line", "got %d '%s'", n, n >= 0 ? line : "");
        snprintf(reply, sizeof(reply), "pong: %s\r\n", line);
        check(cons_write(&C[1], reply, (unsigned)strlen(reply)), "cons.1.reply", "ring stayed full");
    }
    bool ok = true;
    for (unsigned i = 0; i < 500 && ok; i++) {
        char l[16];
        snprintf(l, sizeof(l), "line %04u\n", i);
        ok = cons_write(&C[2], l, 10);
    }
    check(ok, "cons.2.wrapped_5000_bytes", "ring stayed full");
    xen_delay_ns(100 * MS);
    C[2].intf->out_prod = C[2].intf->out_cons + 100000;    /* hostile: more than the ring holds */
    xen_evtchn_send(C[2].port);
    xen_delay_ns(50 * MS);
    check(cons_write(&C[1], "still here\r\n", 12), "cons.1.after_broken_ring", "ring stayed full");
    puts("CONS-DONE");
    return 0;
}
