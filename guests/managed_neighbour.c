/*
 * managed_neighbour - a domain for the shared-xenstored tests (tests/toolstack/test_xenstored_shared.py):
 * two of them run at once on one store, each tries the other's subtree.
 *
 *   "NEIGHBOUR-UP <domid>"         once data/secret holds "secret-of-<domid>" and the
 *                                  watch on data/probe is set
 *   "PROBE <path> READ <result>"   for each write of a path to data/probe (by the host):
 *   "PROBE <path> WRITE <result>"  the guest reads that path and tries to write it;
 *                                  <result> is "OK <value>" or the xenstore error name
 *   "OWN <value>"                  then its own data/secret, read again
 *   "VCPU <path> <value>"          each change of a cpu/N/availability (xenkvm vcpu-set),
 *                                  as Linux's xen cpu_hotplug watches them
 *
 * Polled like managed_domu (no interrupts); runs until destroyed.
 */
#include "xen_guest.h"

static struct xs_reply r;

static void say_result(const char *path, const char *op, long rc)
{
    if (rc == 0)
        printf("PROBE %s %s OK %s\n", path, op, r.body);
    else
        printf("PROBE %s %s %s\n", path, op, xs_last && xs_last->type == XS_ERROR ? xs_last->body : "EIO?");
}

static void on_cpu(const char *path)
{
    if (strstr(path, "/availability") && xs_read(0, path, &r) == 0)
        printf("VCPU %s %s\n", path, r.body);
}

static void on_event(void)
{
    char path[128], token[32], target[128];
    if (!xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
        return;
    if (!strcmp(token, "cpu")) {
        on_cpu(path);
        return;
    }
    if (xs_read(0, "data/probe", &r) != 0 || !r.body[0])
        return;
    snprintf(target, sizeof(target), "%s", r.body);
    say_result(target, "READ", xs_read(0, target, &r));
    long rc = xs_write(0, target, "overwritten-by-neighbour");
    r.body[0] = 0;
    say_result(target, "WRITE", rc);
    if (xs_read(0, "data/secret", &r) == 0)
        printf("OWN %s\n", r.body);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm managed_neighbour guest");
    if (!xen_init() || xen_map_shared_info() != 0 || xs_init() != 0) {
        puts("NEIGHBOUR-FAILED: no Xen, shared_info or xenstore");
        return 1;
    }
    char path[128], token[32], secret[64], domid[16];
    if (xs_read(0, "domid", &r) != 0) {
        puts("NEIGHBOUR-FAILED: cannot read domid");
        return 1;
    }
    snprintf(domid, sizeof(domid), "%s", r.body);
    snprintf(secret, sizeof(secret), "secret-of-%s", domid);
    if (xs_write(0, "data/secret", secret) != 0 || xs_watch("data/probe", "probe") != 0
        || !xs_next_watch_event(path, sizeof(path), token, sizeof(token))   /* the initial event */
        || xs_watch("cpu", "cpu") != 0 || !xs_next_watch_event(path, sizeof(path), token, sizeof(token))) {
        puts("NEIGHBOUR-FAILED: cannot write data/secret or watch data/probe and cpu");
        return 1;
    }
    printf("NEIGHBOUR-UP %s\n", domid);
    for (;;) {
        if (xs_watch_event_ready())
            on_event();
        cpu_relax();
    }
}
