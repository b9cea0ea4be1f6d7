/*
 * xen_console - the two Xen console paths:
 *   console_io(CONSOLEIO_write) (the hypervisor console, as earlyprintk=xen);
 *   the primary console ring (HVM_PARAM_CONSOLE_PFN / CONSOLE_EVTCHN, struct
 *   xencons_interface): the guest writes out[], bumps out_prod and notifies;
 *   the VMM must consume it (out_cons catches up) and print it.
 * The host-side test checks that the marker lines, written only through
 * those paths (never the UART), appear on the host's stdout.
 *
 * Command line: xk.trap=page|direct.
 */
#include "xen_guest.h"

#define RING_MARKER   "XENKVM-CONSOLE-RING-OK"
#define IO_MARKER     "XENKVM-CONSOLE-IO-OK"

static void test_console_io(void)
{
    static const char msg[] = IO_MARKER " written with console_io\n";
    long rc = HYPERVISOR_console_io(CONSOLEIO_write, sizeof(msg) - 1, msg);
    check(rc == 0 || rc == (long)(sizeof(msg) - 1), "console_io.write", "rc %ld", rc);
    rc = HYPERVISOR_console_io(CONSOLEIO_write, 0, msg);
    check(rc == 0, "console_io.write_empty", "rc %ld", rc);
    char in[16];
    rc = HYPERVISOR_console_io(CONSOLEIO_read, sizeof(in), in);
    check(rc >= 0 || rc == -XEN_EPERM || rc == -XEN_ENOSYS, "console_io.read", "rc %ld", rc);
    rc = HYPERVISOR_console_io(77, 1, msg);
    check(rc == -XEN_ENOSYS || rc == -XEN_EINVAL, "console_io.bad_cmd", "rc %ld", rc);
}

static bool wait_drained(volatile struct xencons_interface *ring)
{
    bool drained = false;
    for (uint32_t i = 0; i < XEN_WAIT_POLLS && !drained; i++) {
        drained = ring->out_cons == ring->out_prod;
        cpu_relax();
    }
    xen_delay_ns(20000000ULL);
    return drained;
}

static void test_ring(void)
{
    uint64_t pfn = 0, port = 0;
    long rc = xen_get_param(HVM_PARAM_CONSOLE_PFN, &pfn);
    long rc2 = xen_get_param(HVM_PARAM_CONSOLE_EVTCHN, &port);
    printf("console ring: pfn %#lx (rc %ld), evtchn %lu (rc %ld)\n", pfn, rc, port, rc2);
    check(rc == 0 && pfn != 0, "console.pfn", "rc %ld pfn %#lx", rc, pfn);
    check(rc2 == 0 && port != 0, "console.evtchn", "rc %ld port %lu", rc2, port);
    check(!(pfn >= 0x100 && pfn < (64ULL << 20) >> 12), "console.pfn_outside_ram",
          "ring page %#lx inside guest RAM", pfn);
    if (xen_console_ring_init())
        return;
    volatile struct xencons_interface *ring = (volatile struct xencons_interface *)(uintptr_t)(pfn << 12);
    printf("  out_cons %u out_prod %u in_cons %u in_prod %u\n", ring->out_cons, ring->out_prod,
           ring->in_cons, ring->in_prod);
    check(ring->out_prod - ring->out_cons <= sizeof(ring->out), "console.ring_sane", "indexes %u/%u",
          ring->out_cons, ring->out_prod);

    static const char line[] = "\n" RING_MARKER " written through the console ring\n";
    rc = xen_console_ring_write(line, sizeof(line) - 1);
    /* the VMM prints ring output from its I/O thread: let it drain before the
     * next UART line so the two streams do not interleave mid-line on stdout */
    wait_drained(ring);
    check(rc == (long)(sizeof(line) - 1), "console.ring_write", "rc %ld", rc);
    /* more than the ring holds: the writer must wait for the VMM to consume */
    static char big[5000];
    for (unsigned i = 0; i < sizeof(big); i++)
        big[i] = (i % 100 == 99) ? '\n' : (char)('a' + i % 26);
    memcpy(big, "ring-bulk:", 10);
    rc = xen_console_ring_write(big, sizeof(big));
    check(rc == (long)sizeof(big), "console.ring_wraps", "rc %ld (VMM stopped consuming?)", rc);
    static const char tail[] = "\n" RING_MARKER "-AFTER-WRAP\n";
    rc = xen_console_ring_write(tail, sizeof(tail) - 1);
    check(rc == (long)(sizeof(tail) - 1), "console.ring_write_after_wrap", "rc %ld", rc);
    bool drained = wait_drained(ring);
    check(drained, "console.ring_consumed", "out_cons %u out_prod %u", ring->out_cons, ring->out_prod);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_console guest");
    if (!xen_init())
        return 1;
    long rc = xen_map_shared_info();
    check(rc == 0, "shinfo.map", "rc %ld", rc);
    test_console_io();
    test_ring();
    return 0;
}
