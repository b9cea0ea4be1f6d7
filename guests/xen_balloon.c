/*
 * xen_balloon - memory reservation calls as a balloon driver makes them:
 * XENMEM_decrease_reservation of frames of our own RAM, populate_physmap to
 * get them back, current/maximum_reservation, and the bad-input cases (the
 * extent calls return the number of extents done, never an error).
 *
 * The check that needs a real vCPU: a frame given back and populated again
 * reads as zero here, through our own (2 MiB identity) page tables, i.e.
 * the host's release reached the guest's mappings.
 *
 * Command line: xk.trap=page|direct, plus
 *   xk.host_balloon  after the self-test, touch a 32 MiB pool of RAM, print
 *                    XS-BALLOON-READY and follow memory/target (written by
 *                    `xenkvm mem-set`) like Linux's balloon driver: give pool
 *                    frames back while above the target, populate them again
 *                    while below; print "balloon: current_kb=N" after each
 *                    change; stop once back at the start after a change.
 */
#include "xen_guest.h"

#define SEC 1000000000ULL
#define AREA_GFN   0x2000u          /* 32 MiB: the self-test's 4 MiB */
#define AREA_PAGES 1024u
#define POOL_GFN   0x1000u          /* 16 MiB..48 MiB: the host test's pool */
#define POOL_PAGES 8192u
#define BATCH      512u             /* frames per call, as Linux's frame_list */

static xen_pfn_t list[AREA_PAGES];
static bool out_of_pool[POOL_PAGES];
static struct xs_reply r;

static long reserve(unsigned op, xen_pfn_t *extents, unsigned long nr, unsigned order, domid_t domid)
{
    struct xen_memory_reservation res = { .nr_extents = nr, .extent_order = order, .domid = domid };
    set_xen_guest_handle(res.extent_start, extents);
    return HYPERVISOR_memory_op(op, &res);
}

static long count(unsigned op, domid_t domid)
{
    return HYPERVISOR_memory_op(op, &domid);
}

static volatile uint64_t *page(uint64_t gfn) { return (volatile uint64_t *)(uintptr_t)(gfn << 12); }

static void mark(uint64_t gfn) { page(gfn)[0] = 0xB0A1B0A1u ^ gfn; page(gfn)[511] = gfn; }

static bool page_zero(uint64_t gfn)
{
    for (unsigned i = 0; i < 512; i++)
        if (page(gfn)[i])
            return false;
    return true;
}

static void self_test(void)
{
    long cur = count(XENMEM_current_reservation, DOMID_SELF);
    long max = count(XENMEM_maximum_reservation, DOMID_SELF);
    check(cur > 0 && cur == max, "reservation.counts", "current %ld maximum %ld", cur, max);
    long rc = count(XENMEM_current_reservation, 0);
    check(rc == -XEN_EPERM, "reservation.dom0_eperm", "rc %ld", rc);

    for (unsigned i = 0; i < AREA_PAGES; i++) {
        mark(AREA_GFN + i);
        list[i] = AREA_GFN + i;
    }
    rc = reserve(XENMEM_decrease_reservation, list, AREA_PAGES, 0, DOMID_SELF);
    check(rc == AREA_PAGES, "decrease.all", "%ld of %u", rc, AREA_PAGES);
    rc = count(XENMEM_current_reservation, DOMID_SELF);
    check(rc == cur - AREA_PAGES, "decrease.accounted", "current %ld, expected %ld", rc, cur - AREA_PAGES);
    list[0] = AREA_GFN;
    list[1] = AREA_GFN + 512;
    rc = reserve(XENMEM_populate_physmap, list, 2, 9, DOMID_SELF);
    check(rc == 2, "populate.order9", "%ld of 2", rc);
    check(count(XENMEM_current_reservation, DOMID_SELF) == cur, "populate.accounted", "not back to %ld", cur);
    unsigned dirty = 0;
    for (unsigned i = 0; i < AREA_PAGES; i++)
        dirty += page(AREA_GFN + i)[0] != 0 || page(AREA_GFN + i)[511] != 0;
    check(dirty == 0 && page_zero(AREA_GFN) && page_zero(AREA_GFN + AREA_PAGES - 1), "populate.reads_zero",
          "%u of %u frames kept old data", dirty, AREA_PAGES);

    /* partial progress: the second extent is outside RAM */
    list[0] = AREA_GFN; list[1] = 0xFFFFFFFull; list[2] = AREA_GFN + 1;
    rc = reserve(XENMEM_decrease_reservation, list, 3, 0, DOMID_SELF);
    check(rc == 1, "decrease.partial", "%ld done, expected 1", rc);
    rc = reserve(XENMEM_decrease_reservation, list, 1, 0, DOMID_SELF);
    check(rc == 0, "decrease.not_populated", "%ld done, expected 0", rc);
    rc = reserve(XENMEM_populate_physmap, list, 1, 0, DOMID_SELF);
    check(rc == 1, "populate.one", "%ld done", rc);

    /* bad input: nothing done */
    list[0] = AREA_GFN + 2;
    rc = reserve(XENMEM_decrease_reservation, list, 1, 10, DOMID_SELF);
    check(rc == 0, "decrease.order_too_big", "%ld done", rc);
    rc = reserve(XENMEM_decrease_reservation, list, 1, 0, 0);
    check(rc == 0, "decrease.other_domain", "%ld done", rc);
    rc = reserve(XENMEM_decrease_reservation, list, 1ul << 27, 0, DOMID_SELF);
    check(rc == 0, "decrease.too_many_extents", "%ld done", rc);
    rc = reserve(XENMEM_decrease_reservation, (xen_pfn_t *)(uintptr_t)0x100000000000ull, 1, 0, DOMID_SELF);
    check(rc == 0, "decrease.bad_list", "%ld done", rc);
    rc = reserve(XENMEM_populate_physmap, list, 1, 0, DOMID_SELF);
    check(rc == 0, "populate.over_max", "%ld done (the frame is populated: no room under max)", rc);

    /* shared_info's frame stays, and keeps working */
    list[0] = (uint64_t)(uintptr_t)xen_shinfo >> 12;
    rc = reserve(XENMEM_decrease_reservation, list, 1, 0, DOMID_SELF);
    uint64_t t0 = xen_system_time();
    xen_delay_ns(1000000);
    check(rc == 0 && xen_system_time() > t0, "decrease.shared_info_refused", "rc %ld", rc);
    check(count(XENMEM_current_reservation, DOMID_SELF) == cur, "reservation.restored", "not %ld", cur);
}

/* Give back or take again pool frames until `target` pages are populated. */
static long follow(long target)
{
    long cur = count(XENMEM_current_reservation, DOMID_SELF);
    while (cur != target) {
        unsigned n = 0;
        bool down = cur > target;
        long want = down ? cur - target : target - cur;
        for (unsigned i = 0; i < POOL_PAGES && n < BATCH && n < want; i++)
            if (out_of_pool[i] != down)
                list[n++] = POOL_GFN + i;
        if (!n)
            break;                                  /* the pool is exhausted */
        long rc = reserve(down ? XENMEM_decrease_reservation : XENMEM_populate_physmap, list, n, 0, DOMID_SELF);
        if (!check(rc == (long)n, down ? "balloon.decrease" : "balloon.populate", "%ld of %u", rc, n))
            break;
        for (unsigned i = 0; i < n; i++)
            out_of_pool[list[i] - POOL_GFN] = down;
        cur = count(XENMEM_current_reservation, DOMID_SELF);
    }
    return cur;
}

static void host_balloon(void)
{
    long start = count(XENMEM_current_reservation, DOMID_SELF);
    for (unsigned i = 0; i < POOL_PAGES; i++)
        mark(POOL_GFN + i);                         /* resident on the host now */
    long rc = xs_watch("memory/target", "target");
    char path[128], token[32];
    check(rc == 0 && xs_next_watch_event(path, sizeof(path), token, sizeof(token)), "balloon.watch", "rc %ld", rc);
    puts("XS-BALLOON-READY");
    bool moved = false;
    uint64_t end = xen_system_time() + 120 * SEC;
    while (xen_system_time() < end) {
        if (!xs_next_watch_event(path, sizeof(path), token, sizeof(token)))
            continue;
        if (xs_read(0, "memory/target", &r) != 0)
            continue;
        long kib = 0;
        for (const char *p = r.body; *p >= '0' && *p <= '9'; p++)
            kib = kib * 10 + (*p - '0');
        long cur = follow(kib / 4);
        printf("balloon: current_kb=%ld\n", cur * 4);
        moved |= cur != start;
        if (moved && cur == start)
            break;
    }
    check(moved && count(XENMEM_current_reservation, DOMID_SELF) == start, "balloon.round_trip",
          "never went down and back to %ld pages", start);
    unsigned dirty = 0;
    for (unsigned i = 0; i < POOL_PAGES; i++) {
        volatile uint64_t *p = page(POOL_GFN + i);
        dirty += !(p[0] == 0 && p[511] == 0) && !(p[0] == (0xB0A1B0A1u ^ (POOL_GFN + i)) && p[511] == POOL_GFN + i);
    }
    check(dirty == 0, "balloon.pool_consistent", "%u frames neither zero (returned) nor ours (kept)", dirty);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_balloon guest");
    if (!xen_init())
        return 1;
    if (!check(xen_map_shared_info() == 0, "shinfo.map", "failed"))
        return 1;
    self_test();
    if (xk_cmdline_has("xk.host_balloon")) {
        long rc = xs_init();
        if (check(rc == 0, "xs.ring", "rc %ld", rc))
            host_balloon();
    }
    return 0;
}
