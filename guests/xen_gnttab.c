/*
 * xen_gnttab - grant tables, checked from both sides with the test backend
 * (xen.test_device: true, firmware/include/xen_testdev.h):
 *   query_size / get_version / set_version 1 and 2; grant frames mapped with
 *   XENMEM_add_to_physmap(space grant_table) in the MMIO hole; the reserved
 *   xenstore entry; v1 entries granting pages to domid 0 read-only and
 *   writable; the backend copies from / to them and maps them (checksum,
 *   write through a writable mapping); bad ref, an entry for another domid,
 *   writes through a read-only grant and an unknown granting domain fail
 *   with Xen's GNTST codes; ended grants are refused; GTF_reading/writing
 *   are clear after each access; v2 entries and v2 status frames (mapped
 *   with XENMAPIDX_grant_table_status and listed by get_status_frames);
 *   event channels to the backend (a port it binds itself, and the guest's
 *   alloc_unbound(remote 0) bound by it), echoing notifies both ways.
 *
 * Command line: xk.trap=page|direct.
 */
#include "xen_guest.h"
#include "xen_testdev.h"

#define GRANT_GPFN      0xF0000ULL      /* MMIO hole (>= 3 GiB, below the special pages) */
#define STATUS_GPFN     0xF0010ULL
#define REF_RO          10
#define REF_RW          11
#define REF_UNUSED      12
#define REF_OTHER_DOM   13
#define BACKEND_DOMID   0
#define MS              1000000ULL

static uint8_t page_ro[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t page_rw[XEN_PAGE] XEN_PAGE_ALIGNED;
static uint8_t buffer[XEN_PAGE] XEN_PAGE_ALIGNED;
static struct xk_testdev_cmd cmd;
static uint16_t self_domid;
static const char *ver = "v1";

static char *tname(const char *what)
{
    static char name[96];
    snprintf(name, sizeof(name), "gnttab.%s.%s", ver, what);
    return name;
}

static volatile grant_entry_v1_t *v1 = (volatile grant_entry_v1_t *)(uintptr_t)(GRANT_GPFN << 12);
static volatile grant_entry_v2_t *v2 = (volatile grant_entry_v2_t *)(uintptr_t)(GRANT_GPFN << 12);
static volatile uint16_t *v2_status = (volatile uint16_t *)(uintptr_t)(STATUS_GPFN << 12);
static int version = 1;

static void grant(unsigned ref, domid_t domid, const void *page, bool readonly)
{
    uint64_t gfn = (uint64_t)(uintptr_t)page >> 12;
    uint16_t flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
    if (version == 1) {
        v1[ref].domid = domid;
        v1[ref].frame = (uint32_t)gfn;
        __asm__ volatile("sfence" ::: "memory");
        v1[ref].flags = flags;
    } else {
        v2[ref].full_page.hdr.domid = domid;
        v2[ref].full_page.frame = gfn;
        __asm__ volatile("sfence" ::: "memory");
        v2[ref].hdr.flags = flags;
    }
}

static void end_grant(unsigned ref)
{
    if (version == 1)
        v1[ref].flags = 0;
    else
        v2[ref].hdr.flags = 0;
}

static uint16_t busy_flags(unsigned ref)
{
    return version == 1 ? v1[ref].flags & (GTF_reading | GTF_writing) : v2_status[ref];
}

static int32_t backend(uint32_t op, uint32_t ref, uint32_t offset, uint32_t length, uint16_t flags)
{
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = op;
    cmd.domid = self_domid;
    cmd.flags = flags;
    cmd.ref = ref;
    cmd.offset = offset;
    cmd.length = length;
    cmd.buffer = (uint64_t)(uintptr_t)buffer;
    return xk_testdev_run(&cmd);
}

static void fill(uint8_t *p, uint8_t seed)
{
    for (unsigned i = 0; i < XEN_PAGE; i++)
        p[i] = (uint8_t)(i * 7 + seed);
}

static void test_setup(void)
{
    struct gnttab_query_size q = { .dom = DOMID_SELF };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q, 1);
    printf("query_size: rc %ld status %d nr_frames %u max %u\n", rc, q.status, q.nr_frames, q.max_nr_frames);
    check(rc == 0 && q.status == GNTST_okay && q.nr_frames >= 1 && q.max_nr_frames >= q.nr_frames,
          "gnttab.query_size", "rc %ld status %d frames %u/%u", rc, q.status, q.nr_frames, q.max_nr_frames);
    struct gnttab_query_size q0 = { .dom = 0 };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q0, 1);
    check(rc == 0 && q0.status == GNTST_permission_denied, "gnttab.query_size_dom0", "rc %ld status %d", rc, q0.status);
    struct gnttab_query_size qx = { .dom = 0x1234 };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &qx, 1);
    check(rc == 0 && qx.status == GNTST_bad_domain, "gnttab.query_size_unknown_dom", "rc %ld status %d", rc, qx.status);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_query_size, &q, 2);
    check(rc == -XEN_EINVAL, "gnttab.query_size_count2", "rc %ld", rc);

    struct gnttab_get_version gv = { .dom = DOMID_SELF };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_get_version, &gv, 1);
    check(rc == 0 && gv.version == 1, "gnttab.get_version", "rc %ld version %u", rc, gv.version);
    struct gnttab_set_version sv = { .version = 1 };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1);
    check(rc == 0 && sv.version == 1, "gnttab.set_version1", "rc %ld version %u", rc, sv.version);
    sv.version = 3;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1);
    check(rc == -XEN_EINVAL, "gnttab.set_version3", "rc %ld", rc);

    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN);
    check(rc == 0, "gnttab.map_frame0", "add_to_physmap(grant_table, 0, %#llx): %ld", GRANT_GPFN, rc);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 1, GRANT_GPFN + 1);
    check(rc == 0, "gnttab.map_frame1", "rc %ld", rc);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 100000, GRANT_GPFN + 2);
    check(rc == -XEN_EINVAL, "gnttab.map_frame_beyond_max", "rc %ld", rc);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, XENMAPIDX_grant_table_status, STATUS_GPFN);
    check(rc == -XEN_EINVAL, "gnttab.v1_has_no_status_frames", "rc %ld", rc);

    uint64_t store_pfn = 0;
    xen_get_param(HVM_PARAM_STORE_PFN, &store_pfn);
    printf("reserved entry 1 (xenstore): flags %#x domid %u frame %#x (store pfn %#lx)\n",
           v1[GNTTAB_RESERVED_XENSTORE].flags, v1[GNTTAB_RESERVED_XENSTORE].domid,
           v1[GNTTAB_RESERVED_XENSTORE].frame, store_pfn);
    check((v1[GNTTAB_RESERVED_XENSTORE].flags & GTF_type_mask) == GTF_permit_access
          && v1[GNTTAB_RESERVED_XENSTORE].frame == store_pfn, "gnttab.reserved_xenstore",
          "entry 1 does not grant the store page");
}

static void test_access(void)
{
    fill(page_ro, 1);
    fill(page_rw, 2);
    grant(REF_RO, BACKEND_DOMID, page_ro, true);
    grant(REF_RW, BACKEND_DOMID, page_rw, false);
    grant(REF_OTHER_DOM, 5, page_rw, false);
    end_grant(REF_UNUSED);

    memset(buffer, 0, sizeof(buffer));
    int32_t r = backend(XK_TESTDEV_OP_COPY_FROM, REF_RO, 0, XEN_PAGE, 0);
    check(r == 0 && !memcmp(buffer, page_ro, XEN_PAGE), tname("copy_from_readonly"), "result %d, data %s", r,
          memcmp(buffer, page_ro, XEN_PAGE) ? "differs" : "same");
    check(busy_flags(REF_RO) == 0, tname("copy_from.flags_clear"), "busy flags %#x", busy_flags(REF_RO));
    memset(buffer, 0, sizeof(buffer));
    r = backend(XK_TESTDEV_OP_COPY_FROM, REF_RW, 100, 50, 0);
    check(r == 0 && !memcmp(buffer, page_rw + 100, 50), tname("copy_from_offset"), "result %d", r);

    for (unsigned i = 0; i < 64; i++)
        buffer[i] = (uint8_t)(0xA0 ^ i);
    r = backend(XK_TESTDEV_OP_COPY_TO, REF_RW, 4000, 64, 0);
    check(r == 0 && !memcmp(page_rw + 4000, buffer, 64) && page_rw[3999] == (uint8_t)(3999 * 7 + 2),
          tname("copy_to_writable"), "result %d", r);
    check(busy_flags(REF_RW) == 0, tname("copy_to.flags_clear"), "busy flags %#x", busy_flags(REF_RW));

    r = backend(XK_TESTDEV_OP_MAP_SUM, REF_RO, 0, XEN_PAGE, 0);
    check(r == 0 && (uint32_t)cmd.value == xk_fnv1a(page_ro, XEN_PAGE), tname("map_readonly_checksum"),
          "result %d sum %#lx expected %#x", r, cmd.value, xk_fnv1a(page_ro, XEN_PAGE));
    check(busy_flags(REF_RO) == 0, tname("unmap.flags_clear"), "busy flags %#x", busy_flags(REF_RO));
    memcpy(buffer, "written through a mapping", 26);
    r = backend(XK_TESTDEV_OP_MAP_SUM, REF_RW, 8, 26, XK_TESTDEV_FLAG_WRITE);
    check(r == 0 && !memcmp(page_rw + 8, "written through a mapping", 26)
          && (uint32_t)cmd.value == xk_fnv1a(page_rw + 8, 26), tname("map_writable"), "result %d", r);

    /* refusals, with Xen's codes */
    uint8_t before[64];
    memcpy(before, page_ro, sizeof(before));
    r = backend(XK_TESTDEV_OP_COPY_TO, REF_RO, 0, 64, 0);
    check(r == GNTST_general_error && !memcmp(before, page_ro, 64), tname("readonly_write_refused"),
          "result %d (expected GNTST_general_error %d)", r, GNTST_general_error);
    r = backend(XK_TESTDEV_OP_MAP_SUM, REF_RO, 0, 16, XK_TESTDEV_FLAG_WRITE);
    check(r == GNTST_general_error, tname("readonly_map_writable_refused"), "result %d", r);
    r = backend(XK_TESTDEV_OP_COPY_FROM, 50000, 0, 16, 0);
    check(r == GNTST_bad_gntref, tname("bad_ref"), "result %d (expected GNTST_bad_gntref %d)", r, GNTST_bad_gntref);
    r = backend(XK_TESTDEV_OP_COPY_FROM, REF_UNUSED, 0, 16, 0);
    check(r == GNTST_general_error, tname("unused_ref"), "result %d", r);
    r = backend(XK_TESTDEV_OP_COPY_FROM, REF_OTHER_DOM, 0, 16, 0);
    check(r == GNTST_general_error, tname("granted_to_other_domid"), "result %d", r);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_COPY_FROM;
    cmd.domid = 7;
    cmd.ref = REF_RO;
    cmd.length = 16;
    cmd.buffer = (uint64_t)(uintptr_t)buffer;
    r = xk_testdev_run(&cmd);
    check(r == GNTST_bad_domain, tname("unknown_granter"), "result %d (expected GNTST_bad_domain)", r);
    r = backend(XK_TESTDEV_OP_COPY_FROM, REF_RO, 4090, 16, 0);
    check(r == XK_TESTDEV_ERANGE, tname("testdev.range"), "result %d", r);

    end_grant(REF_RW);
    r = backend(XK_TESTDEV_OP_COPY_FROM, REF_RW, 0, 16, 0);
    check(r == GNTST_general_error, tname("ended_grant_refused"), "result %d", r);
    end_grant(REF_RO);
    end_grant(REF_OTHER_DOM);
}

static void test_testdev_errors(void)
{
    struct xk_testdev_cmd *bad = (struct xk_testdev_cmd *)(uintptr_t)0x100000000ULL; /* 4 GiB: not RAM */
    (void)bad;
    outl(XK_XEN_TESTDEV_PORT, 0xFFFFFFF8u);
    check(xk_testdev_status() == XK_TESTDEV_EBLOCK, "testdev.block_outside_ram", "status %d", xk_testdev_status());
    outl(XK_XEN_TESTDEV_PORT, (uint32_t)(uintptr_t)&cmd + 4);
    check(xk_testdev_status() == XK_TESTDEV_EBLOCK, "testdev.block_unaligned", "status %d", xk_testdev_status());
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = 99;
    check(xk_testdev_run(&cmd) == XK_TESTDEV_EOP, "testdev.bad_op", "result %d", cmd.result);
    cmd.op = XK_TESTDEV_OP_COPY_FROM;
    cmd.length = 16;
    cmd.buffer = 0x100000000000ULL;
    cmd.domid = self_domid;
    cmd.ref = REF_RO;
    check(xk_testdev_run(&cmd) == XK_TESTDEV_EBUFFER, "testdev.bad_buffer", "result %d", cmd.result);
}

static void test_v2(void)
{
    struct gnttab_set_version sv = { .version = 2 };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1);
    if (rc == -XEN_ENOSYS) {
        skip("gnttab.v2", "grant table v2 not offered");
        return;
    }
    if (!check(rc == 0 && sv.version == 2, "gnttab.set_version2", "rc %ld version %u", rc, sv.version))
        return;
    version = 2;
    ver = "v2";
    struct gnttab_get_version gv = { .dom = DOMID_SELF };
    rc = HYPERVISOR_grant_table_op(GNTTABOP_get_version, &gv, 1);
    check(rc == 0 && gv.version == 2, "gnttab.get_version2", "rc %ld version %u", rc, gv.version);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN);
    check(rc == 0, tname("map_frame0"), "rc %ld", rc);
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, XENMAPIDX_grant_table_status, STATUS_GPFN);
    check(rc == 0, tname("map_status_frame"), "rc %ld", rc);
    uint64_t frames[2] = { 0, 0 };
    struct gnttab_get_status_frames gs = { .nr_frames = 1, .dom = DOMID_SELF };
    set_xen_guest_handle(gs.frame_list, frames);
    rc = HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 1);
    check(rc == 0 && gs.status == GNTST_okay && frames[0] == STATUS_GPFN, tname("get_status_frames"),
          "rc %ld status %d frame %#lx (mapped at %#llx)", rc, gs.status, frames[0], STATUS_GPFN);
    gs.nr_frames = 1000;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 1);
    check(rc == 0 && gs.status == GNTST_general_error, tname("get_status_frames_too_many"),
          "rc %ld status %d", rc, gs.status);
    test_access();
    check(v2_status[REF_RO] == 0 && v2_status[REF_RW] == 0, tname("status_words_clear"),
          "status %#x %#x", v2_status[REF_RO], v2_status[REF_RW]);

    sv.version = 1;
    rc = HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1);
    check(rc == 0 && sv.version == 1, "gnttab.back_to_v1", "rc %ld version %u", rc, sv.version);
    version = 1;
    ver = "v1again";
    rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, GRANT_GPFN);
    check(rc == 0, tname("map_frame0"), "rc %ld", rc);
    grant(REF_RO, BACKEND_DOMID, page_ro, true);
    memset(buffer, 0, 64);
    int32_t r = backend(XK_TESTDEV_OP_COPY_FROM, REF_RO, 0, 64, 0);
    check(r == 0 && !memcmp(buffer, page_ro, 64), tname("copy_from"), "result %d", r);
    end_grant(REF_RO);
}

static void test_backend_evtchn(void)
{
    /* the backend allocates a guest port bound to itself (as the toolstack does for
     * the store and console ports) */
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_ALLOC_ECHO;
    int32_t r = xk_testdev_run(&cmd);
    evtchn_port_t local = (evtchn_port_t)cmd.value;
    if (!check(r == 0 && local > 0 && local < XEN_MAX_PORTS, "evtchn.backend.alloc", "result %d port %u", r, local))
        return;
    struct evtchn_status st = { .dom = DOMID_SELF, .port = local };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_status, &st);
    check(rc == 0 && st.status == EVTCHNSTAT_interdomain && st.u.interdomain.dom == BACKEND_DOMID,
          "evtchn.backend.status", "rc %ld status %u dom %u", rc, st.status, st.u.interdomain.dom);
    xen_delay_ns(2 * MS);
    uint32_t c = xen_ports[local].count;
    rc = xen_evtchn_send(local);
    check(rc == 0 && xen_wait_port(local, c + 1, 200 * MS), "evtchn.backend.echo",
          "send rc %ld, echoes %u", rc, xen_ports[local].count - c);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_ECHO_COUNT;
    cmd.port = local;
    r = xk_testdev_run(&cmd);
    check(r == 0 && cmd.value >= 1, "evtchn.backend.received", "result %d count %lu", r, cmd.value);
    c = xen_ports[local].count;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_NOTIFY;
    cmd.port = local;
    r = xk_testdev_run(&cmd);
    check(r == 0 && xen_wait_port(local, c + 1, 200 * MS), "evtchn.backend.notify", "result %d", r);
    xen_evtchn_close(local);

    /* the guest allocates (remote dom0), the backend binds */
    evtchn_port_t unbound = 0;
    rc = xen_evtchn_alloc_unbound(BACKEND_DOMID, &unbound);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_BIND_ECHO;
    cmd.port = unbound;
    r = rc ? -1 : xk_testdev_run(&cmd);
    if (!check(rc == 0 && r == 0, "evtchn.backend.bind_unbound", "alloc rc %ld, bind result %d", rc, r))
        return;
    xen_delay_ns(2 * MS);
    c = xen_ports[unbound].count;
    rc = xen_evtchn_send(unbound);
    check(rc == 0 && xen_wait_port(unbound, c + 1, 200 * MS), "evtchn.backend.echo_bound",
          "send rc %ld, echoes %u", rc, xen_ports[unbound].count - c);
    xen_evtchn_close(unbound);
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = XK_TESTDEV_OP_BIND_ECHO;
    cmd.port = 999;
    check(xk_testdev_run(&cmd) == XK_TESTDEV_EEVTCHN, "evtchn.backend.bind_bad_port", "result %d", cmd.result);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_gnttab guest");
    if (!xen_init())
        return 1;
    uint32_t a, b, c, d;
    cpuid(xen.base + 4, 0, &a, &b, &c, &d);
    self_domid = (a & XEN_HVM_CPUID_DOMID_PRESENT) ? (uint16_t)c : 1;
    long rc = xen_map_shared_info();
    if (!check(rc == 0, "shinfo.map", "rc %ld", rc))
        return 1;
    xen_register_vcpu_info(0);
    rc = xen_setup_upcall(0, true);
    check(rc == 0, "upcall.setup", "rc %ld", rc);
    test_setup();
    test_access();
    test_testdev_errors();
    test_v2();
    test_backend_evtchn();
    return 0;
}
