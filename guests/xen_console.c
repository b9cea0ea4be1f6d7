/*
 * xen_console - the two Xen console paths:
 *   console_io(CONSOLEIO_write) (the hypervisor console, as earlyprintk=xen);
 *   the primary console ring (HVM_PARAM_CONSOLE_PFN / CONSOLE_EVTCHN, struct
 *   xencons_interface): the guest writes out[], bumps out_prod and notifies;
 *   the VMM must consume it (out_cons catches up) and print it.
 * The host-side test checks that the ring's marker lines appear once on the
 * host's stdout (the guest console) and the console_io ones in the
 * hypervisor log (stderr, "(XEN) " lines), never the other way round.
 *
 * With xk.input the guest also reads host keystrokes, twice: first through
 * CONSOLEIO_read before its ring is in use (after printing IO_WAIT on
 * console_io), then through the ring's in[] (after printing RING_WAIT on the
 * ring).  The host types one byte after each marker; each must arrive on that
 * console only: not on the other one, not on the UART.
 *
 * Command line: xk.trap=page|direct [xk.input].
 */
#include "xen_guest.h"

#define RING_MARKER   "XENKVM-CONSOLE-RING-OK"
#define IO_MARKER     "XENKVM-CONSOLE-IO-OK"
#define IO_WAIT       "XENKVM-CONSOLE-WAIT-IO"      /* host: type 'i' now */
#define RING_WAIT     "XENKVM-CONSOLE-WAIT-RING"    /* host: type 'r' now */
#define INPUT_POLLS   2000u                         /* x 5 ms of guest time */
#define UART_LSR      (0x3F8 + 5)

static bool uart_has_data(void)
{
    return inb(UART_LSR) & 1;
}

static long console_io_read_wait(char *c)
{
    for (uint32_t i = 0; i < INPUT_POLLS; i++) {
        long rc = HYPERVISOR_console_io(CONSOLEIO_read, 1, c);
        if (rc)
            return rc;
        xen_delay_ns(5000000ULL);
    }
    return 0;
}

/* Before the ring is used: the guest has read console_io, so input comes there. */
static void test_input_console_io(volatile struct xencons_interface *ring)
{
    static const char wait[] = IO_WAIT " (type a byte)\n";
    long rc = HYPERVISOR_console_io(CONSOLEIO_write, sizeof(wait) - 1, wait);
    check(rc == 0, "console.input_io_prompt", "rc %ld", rc);
    char c = 0;
    rc = console_io_read_wait(&c);
    check(rc == 1 && c == 'i', "console.input_console_io", "rc %ld byte %#x", rc, (unsigned)c);
    char more[8];
    rc = HYPERVISOR_console_io(CONSOLEIO_read, sizeof(more), more);
    check(rc == 0, "console.input_console_io_once", "%ld more bytes", rc);
    check(ring->in_prod == ring->in_cons, "console.input_io_not_in_ring", "in_cons %u in_prod %u",
          ring->in_cons, ring->in_prod);
    check(!uart_has_data(), "console.input_io_not_on_uart", "the UART has data");
}

/* Once the ring is in use, input comes through its in[]. */
static void test_input_ring(volatile struct xencons_interface *ring, evtchn_port_t port)
{
    static const char wait[] = "\n" RING_WAIT " (type a byte)\n";
    long rc = xen_console_ring_write(wait, sizeof(wait) - 1);
    check(rc == (long)(sizeof(wait) - 1), "console.input_ring_prompt", "rc %ld", rc);
    for (uint32_t i = 0; i < INPUT_POLLS && ring->in_prod == ring->in_cons; i++)
        xen_delay_ns(5000000ULL);
    XENCONS_RING_IDX cons = ring->in_cons, prod = ring->in_prod;
    __asm__ volatile("" ::: "memory");      /* index before data (x86: loads are ordered) */
    char c = ring->in[MASK_XENCONS_IDX(cons, ring->in)];
    ring->in_cons = prod;
    xen_evtchn_send(port);
    check(prod - cons == 1 && c == 'r', "console.input_ring", "%u bytes, first %#x", prod - cons, (unsigned)c);
    char more[8];
    rc = HYPERVISOR_console_io(CONSOLEIO_read, sizeof(more), more);
    check(rc == 0, "console.input_ring_not_on_console_io", "%ld bytes", rc);
    check(!uart_has_data(), "console.input_ring_not_on_uart", "the UART has data");
}

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

static void test_ring(bool input)
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
    if (input)
        test_input_console_io(ring);
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
    if (input)
        test_input_ring(ring, (evtchn_port_t)port);
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
    test_ring(xk_cmdline_has("xk.input"));
    return 0;
}
