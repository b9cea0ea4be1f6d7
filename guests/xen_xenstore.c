/*
 * xen_xenstore - a xenstore client on the ring (HVM_PARAM_STORE_PFN /
 * STORE_EVTCHN, xs_wire.h framing): XS_READ of domid/name (relative and
 * absolute), XS_WRITE + read back, XS_DIRECTORY, XS_WATCH (one event on
 * registration, one per write), XS_UNWATCH, transactions committed and
 * aborted, XS_RM, and error replies (ENOENT, EINVAL).
 *
 * Command line: xk.trap=page|direct, xk.xs_marker=VALUE (written to
 * data/host-check for the host to read), xk.xs_host_ack (then wait, at
 * most ~30 s of pvclock time, for the host to write data/host-ack = VALUE:
 * proves the host sees the guest's store over the xenstored socket).
 */
#include "xen_guest.h"

#define SEC 1000000000ULL

static struct xs_reply r;
static char home[64];

static bool is_error(long rc, const char *err)
{
    return rc == -5 && xs_last && xs_last->type == XS_ERROR && !strcmp(xs_last->body, err);
}

static void test_reads(void)
{
    uint32_t a, b, c, d;
    cpuid(xen.base + 4, 0, &a, &b, &c, &d);
    unsigned domid = (a & XEN_HVM_CPUID_DOMID_PRESENT) ? c : 1;
    snprintf(home, sizeof(home), "/local/domain/%u", domid);

    long rc = xs_read(0, "domid", &r);
    char want[16];
    snprintf(want, sizeof(want), "%u", domid);
    check(rc == 0 && !strcmp(r.body, want), "xs.read_domid_relative", "rc %ld \"%s\", expected \"%s\"",
          rc, rc == 0 ? r.body : "", want);
    char path[128];
    snprintf(path, sizeof(path), "%s/domid", home);
    rc = xs_read(0, path, &r);
    check(rc == 0 && !strcmp(r.body, want), "xs.read_domid_absolute", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_read(0, "name", &r);
    if (rc == 0)
        printf("name = \"%s\"\n", r.body);
    check(rc == 0 && !strncmp(r.body, "xen-xenstore", 12), "xs.read_name",
          "rc %ld \"%s\" (the YAML name is xen-xenstore[-direct])", rc, r.body);
    rc = xs_read(0, "data/does-not-exist", &r);
    check(is_error(rc, "ENOENT"), "xs.read_enoent", "rc %ld type %u \"%s\"", rc, r.type, r.body);
    rc = xs_read(0, "/local/domain/0/name", &r);
    check(is_error(rc, "EACCES") || is_error(rc, "ENOENT"), "xs.read_dom0_denied", "rc %ld type %u \"%s\"",
          rc, r.type, r.body);
    rc = xs_request(XS_READ, 0, "data/no-nul", 11, &r);
    check(is_error(rc, "EINVAL"), "xs.read_without_nul", "rc %ld type %u \"%s\"", rc, r.type, r.body);
    rc = xs_request(9999, 0, "x", 2, &r);
    check(rc == -5 && r.type == XS_ERROR, "xs.unknown_type", "rc %ld type %u \"%s\"", rc, r.type, r.body);
}

static bool dir_has(const char *name)
{
    for (uint32_t off = 0; off < r.len;) {
        const char *e = r.body + off;
        if (!strcmp(e, name))
            return true;
        off += (uint32_t)strlen(e) + 1;
    }
    return false;
}

static void test_write_dir(void)
{
    long rc = xs_write(0, "data/test", "hello xenstore");
    check(rc == 0, "xs.write", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_read(0, "data/test", &r);
    check(rc == 0 && !strcmp(r.body, "hello xenstore"), "xs.read_back", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_write(0, "data/sub/deep/key", "1");
    check(rc == 0, "xs.write_creates_parents", "rc %ld", rc);
    rc = xs_directory(0, "data", &r);
    check(rc == 0 && dir_has("test") && dir_has("sub"), "xs.directory", "rc %ld (%u bytes)", rc, r.len);
    rc = xs_directory(0, "data/nothing-here", &r);
    check(is_error(rc, "ENOENT"), "xs.directory_enoent", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_rm(0, "data/sub");
    check(rc == 0, "xs.rm", "rc %ld", rc);
    rc = xs_read(0, "data/sub/deep/key", &r);
    check(is_error(rc, "ENOENT"), "xs.rm_recursive", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
}

static void test_watch(void)
{
    char path[128], token[64];
    long rc = xs_watch("data/watched", "tok1");
    check(rc == 0, "xs.watch", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    bool ev = xs_next_watch_event(path, sizeof(path), token, sizeof(token));
    check(ev && !strcmp(path, "data/watched") && !strcmp(token, "tok1"), "xs.watch_fires_on_register",
          "%s: path \"%s\" token \"%s\"", ev ? "event" : "no event", ev ? path : "", ev ? token : "");
    rc = xs_write(0, "data/watched", "v1");
    ev = xs_next_watch_event(path, sizeof(path), token, sizeof(token));
    check(rc == 0 && ev && !strcmp(path, "data/watched") && !strcmp(token, "tok1"), "xs.watch_fires_on_write",
          "rc %ld, %s: path \"%s\" token \"%s\"", rc, ev ? "event" : "no event", ev ? path : "", ev ? token : "");
    rc = xs_write(0, "data/watched/child", "v2");
    ev = xs_next_watch_event(path, sizeof(path), token, sizeof(token));
    check(rc == 0 && ev && !strcmp(path, "data/watched/child"), "xs.watch_fires_on_child",
          "rc %ld, %s: path \"%s\"", rc, ev ? "event" : "no event", ev ? path : "");
    rc = xs_unwatch("data/watched", "tok1");
    check(rc == 0, "xs.unwatch", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_write(0, "data/watched", "v3");
    /* a reply round trip after the write: any event would have come first, so
     * nothing queued and nothing on the ring now means none was sent (no
     * bounded wait for an event that must not come) */
    xs_read(0, "domid", &r);
    check(!xs_watch_event_ready(), "xs.unwatch_silences", "an event after unwatch");
    rc = xs_unwatch("data/watched", "tok1");
    check(is_error(rc, "ENOENT"), "xs.unwatch_unknown", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
}

static void test_transactions(void)
{
    uint32_t tx = 0;
    long rc = xs_transaction_start(&tx);
    if (!check(rc == 0 && tx != 0, "xs.transaction_start", "rc %ld tx %u", rc, tx))
        return;
    rc = xs_write(tx, "data/tx-key", "in-tx");
    check(rc == 0, "xs.transaction_write", "rc %ld", rc);
    rc = xs_read(0, "data/tx-key", &r);
    check(is_error(rc, "ENOENT"), "xs.transaction_isolated", "outside the transaction: rc %ld \"%s\"", rc, r.body);
    rc = xs_read(tx, "data/tx-key", &r);
    check(rc == 0 && !strcmp(r.body, "in-tx"), "xs.transaction_read_own", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_transaction_end(tx, true);
    check(rc == 0, "xs.transaction_commit", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_read(0, "data/tx-key", &r);
    check(rc == 0 && !strcmp(r.body, "in-tx"), "xs.transaction_committed", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");

    rc = xs_transaction_start(&tx);
    rc = rc ? rc : xs_write(tx, "data/aborted", "x");
    long rc2 = xs_transaction_end(tx, false);
    long rc3 = xs_read(0, "data/aborted", &r);
    check(rc == 0 && rc2 == 0 && is_error(rc3, "ENOENT"), "xs.transaction_abort", "rc %ld/%ld/%ld \"%s\"",
          rc, rc2, rc3, r.body);
    rc = xs_transaction_end(tx, true);
    check(is_error(rc, "ENOENT"), "xs.transaction_end_twice", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
    rc = xs_read(0x7777, "domid", &r);
    check(is_error(rc, "ENOENT"), "xs.transaction_unknown_id", "rc %ld \"%s\"", rc, xs_last ? xs_last->body : "");
}

static void test_host(void)
{
    char marker[64];
    if (!xk_cmdline_value("xk.xs_marker", marker, sizeof(marker)))
        return;
    long rc = xs_write(0, "data/host-check", marker);
    check(rc == 0, "xs.host_marker_written", "rc %ld", rc);
    if (!xk_cmdline_has("xk.xs_host_ack"))
        return;
    puts("XS-WAITING-FOR-HOST");
    rc = xs_watch("data/host-ack", "host");
    uint64_t end = xen_system_time() + 30 * SEC;
    bool acked = false;
    char path[128], token[32];
    while (rc == 0 && !acked && xen_system_time() < end) {
        if (!xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
            continue;
        acked = xs_read(0, "data/host-ack", &r) == 0 && !strcmp(r.body, marker);
    }
    check(acked, "xs.host_ack", "the host did not write data/host-ack = %s (rc %ld)", marker, rc);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_xenstore guest");
    if (!xen_init())
        return 1;
    check(xen_map_shared_info() == 0, "shinfo.map", "failed");
    long rc = xs_init();
    uint64_t pfn = 0, port = 0;
    xen_get_param(HVM_PARAM_STORE_PFN, &pfn);
    xen_get_param(HVM_PARAM_STORE_EVTCHN, &port);
    printf("xenstore ring: pfn %#lx evtchn %lu\n", pfn, port);
    if (!check(rc == 0, "xs.ring", "STORE_PFN %#lx STORE_EVTCHN %lu (rc %ld)", pfn, port, rc))
        return 1;
    check(xs_ring->connection == XENSTORE_CONNECTED, "xs.ring_connected", "connection %u", xs_ring->connection);
    test_reads();
    test_write_dir();
    test_watch();
    test_transactions();
    test_host();
    return 0;
}
