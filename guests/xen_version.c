/*
 * xen_version - the Xen identity a guest sees: CPUID leaves, XENVER_* and
 * how the hypercall layer answers unknown numbers, unknown sub-ops and bad
 * pointers.
 *
 * Command line: xk.trap=page|direct (see xen_guest.h), xk.xen=MAJOR.MINOR
 * (expected version, default 4.17).
 */
#include "xen_guest.h"

#define UNMAPPED_PTR    ((void *)(uintptr_t)0x0000100000000000ULL)  /* canonical, not mapped */
#define NONCANON_PTR    ((void *)(uintptr_t)0x8000000000000000ULL)

static uint32_t expected_version(void)
{
    char v[16];
    uint32_t major = 4, minor = 17;
    if (xk_cmdline_value("xk.xen", v, sizeof(v))) {
        major = minor = 0;
        const char *p = v;
        while (*p >= '0' && *p <= '9')
            major = major * 10 + (uint32_t)(*p++ - '0');
        if (*p == '.')
            p++;
        while (*p >= '0' && *p <= '9')
            minor = minor * 10 + (uint32_t)(*p++ - '0');
    }
    return major << 16 | minor;
}

static void test_cpuid(void)
{
    uint32_t a, b, c, d;
    check(xen.base == 0x40000000u, "cpuid.base", "Xen leaves at %#x, expected 0x40000000", xen.base);
    /* no other hypervisor signature (KVMKVMKVM) at any base */
    bool other = false;
    for (uint32_t base = 0x40000000u; base < 0x40010000u; base += 0x100) {
        cpuid(base, 0, &a, &b, &c, &d);
        if (b == 0x4b4d564bu && c == 0x564b4d56u && d == 0x4du) {
            printf("  KVM signature at %#x\n", base);
            other = true;
        }
    }
    check(!other, "cpuid.no_kvm_leaves", "KVMKVMKVM leaves still visible");
    check(xen.max_leaf >= xen.base + 4, "cpuid.max_leaf", "max leaf %#x < base+4", xen.max_leaf);
    cpuid(xen.base + 1, 0, &a, &b, &c, &d);
    check(a == expected_version(), "cpuid.version", "base+1 EAX %#x, expected %#x", a, expected_version());
    cpuid(xen.base + 2, 0, &a, &b, &c, &d);
    check(a == 1 && b == 0x40000000u, "cpuid.hypercall_msr", "base+2: %u pages, MSR %#x", a, b);
    cpuid(xen.base + 4, 0, &a, &b, &c, &d);
    printf("CPUID base+4: eax=%#x ebx=%#x ecx=%#x\n", a, b, c);
    check(a & XEN_HVM_CPUID_VCPU_ID_PRESENT, "cpuid.vcpu_id_present", "flags %#x", a);
    check(!(a & XEN_HVM_CPUID_VCPU_ID_PRESENT) || b == 0, "cpuid.vcpu_id", "BSP vcpu id %u", b);
    check(a & XEN_HVM_CPUID_UPCALL_VECTOR, "cpuid.upcall_vector", "flags %#x lack bit 6", a);
}

static void test_xenver(void)
{
    long v = HYPERVISOR_xen_version(XENVER_version, NULL);
    printf("XENVER_version = %#lx (%ld.%ld)\n", v, v >> 16, v & 0xFFFF);
    check(v == (long)expected_version(), "xenver.version", "%#lx, expected %#x", v, expected_version());

    char extra[XEN_EXTRAVERSION_LEN + 16];
    memset(extra, 0x5A, sizeof(extra));
    long rc = HYPERVISOR_xen_version(XENVER_extraversion, extra);
    size_t n = strnlen(extra, XEN_EXTRAVERSION_LEN);
    bool printable = true;
    for (size_t i = 0; i < n; i++)
        if (extra[i] < 0x20 || extra[i] > 0x7e)
            printable = false;
    if (rc == 0 && n < XEN_EXTRAVERSION_LEN)
        printf("XENVER_extraversion = \"%s\"\n", extra);
    check(rc == 0 && n < XEN_EXTRAVERSION_LEN && printable, "xenver.extraversion",
          "rc %ld, %s", rc, n < XEN_EXTRAVERSION_LEN ? "unprintable" : "not NUL-terminated in 16 bytes");
    check((uint8_t)extra[XEN_EXTRAVERSION_LEN] == 0x5A, "xenver.extraversion_bounds",
          "wrote past the 16-byte buffer");

    struct xen_feature_info fi = { .submap_idx = 0, .submap = 0 };
    rc = HYPERVISOR_xen_version(XENVER_get_features, &fi);
    printf("XENVER_get_features[0] = %#x (rc %ld)\n", fi.submap, rc);
    check(rc == 0, "xenver.get_features", "rc %ld", rc);
    check(fi.submap & (1u << XENFEAT_auto_translated_physmap), "xenfeat.auto_translated_physmap", "%#x", fi.submap);
    check(fi.submap & (1u << XENFEAT_hvm_callback_vector), "xenfeat.hvm_callback_vector", "%#x", fi.submap);
    check(fi.submap & (1u << XENFEAT_hvm_safe_pvclock), "xenfeat.hvm_safe_pvclock", "%#x", fi.submap);
    check(!(fi.submap & (1u << XENFEAT_hvm_pirqs)), "xenfeat.no_hvm_pirqs", "%#x", fi.submap);
    struct xen_feature_info fi1 = { .submap_idx = 1, .submap = 0xFFFFFFFF };
    rc = HYPERVISOR_xen_version(XENVER_get_features, &fi1);
    check(rc == -XEN_EINVAL || (rc == 0 && fi1.submap == 0), "xenver.get_features_submap1",
          "rc %ld submap %#x (expected -EINVAL as Xen, or 0 with no bits)", rc, fi1.submap);

    static char caps[XEN_CAPABILITIES_INFO_LEN];
    memset(caps, 0, sizeof(caps));
    rc = HYPERVISOR_xen_version(XENVER_capabilities, caps);
    caps[sizeof(caps) - 1] = '\0';
    printf("XENVER_capabilities = \"%s\"\n", caps);
    check(rc == 0 && strstr(caps, "hvm-3.0-x86_64"), "xenver.capabilities", "rc %ld \"%s\"", rc, caps);

    rc = HYPERVISOR_xen_version(XENVER_pagesize, NULL);
    check(rc == 4096, "xenver.pagesize", "%ld", rc);

    xen_domain_handle_t h;
    memset(h, 0xEE, sizeof(h));
    rc = HYPERVISOR_xen_version(XENVER_guest_handle, h);
    check(rc == 0 || rc == -XEN_ENOSYS, "xenver.guest_handle", "rc %ld", rc);
}

static void test_errors(void)
{
    long rc;
    /* unknown hypercall numbers */
    static const uint64_t unknown_nrs[] = { 56, 63, 100, 127 };
    for (unsigned i = 0; i < XK_ARRAY_SIZE(unknown_nrs); i++) {
        char name[48];
        snprintf(name, sizeof(name), "hypercall.unknown.%lu", unknown_nrs[i]);
        rc = xen_hypercall(unknown_nrs[i], 0, 0, 0, 0, 0);
        check(rc == -XEN_ENOSYS, name, "returned %ld, expected -ENOSYS", rc);
    }
    if (xen.trap == XEN_TRAP_DIRECT) {
        rc = xen_hypercall(0xFFFFFFFFu, 0, 0, 0, 0, 0);
        check(rc == -XEN_ENOSYS, "hypercall.unknown.0xffffffff", "returned %ld", rc);
        rc = xen_hypercall(0x12345678u, 0, 0, 0, 0, 0);
        check(rc == -XEN_ENOSYS, "hypercall.unknown.0x12345678", "returned %ld", rc);
    }

    /* unknown sub-ops */
    rc = HYPERVISOR_xen_version(99, NULL);
    check(rc == -XEN_ENOSYS, "subop.xen_version.99", "returned %ld", rc);
    rc = HYPERVISOR_memory_op(99, NULL);
    check(rc == -XEN_ENOSYS, "subop.memory_op.99", "returned %ld", rc);
    rc = HYPERVISOR_hvm_op(99, NULL);
    check(rc == -XEN_ENOSYS, "subop.hvm_op.99", "returned %ld", rc);
    rc = HYPERVISOR_event_channel_op(99, NULL);
    check(rc == -XEN_ENOSYS, "subop.event_channel_op.99", "returned %ld", rc);
    rc = HYPERVISOR_vcpu_op(99, 0, NULL);
    check(rc == -XEN_ENOSYS, "subop.vcpu_op.99", "returned %ld", rc);
    rc = HYPERVISOR_grant_table_op(99, NULL, 1);
    check(rc == -XEN_ENOSYS, "subop.grant_table_op.99", "returned %ld", rc);
    rc = HYPERVISOR_sched_op(99, NULL);
    check(rc == -XEN_ENOSYS, "subop.sched_op.99", "returned %ld", rc);

    /* bad pointers */
    void *const bad[] = { UNMAPPED_PTR, NONCANON_PTR };
    const char *const badname[] = { "unmapped", "noncanonical" };
    for (unsigned i = 0; i < 2; i++) {
        char name[64];
        snprintf(name, sizeof(name), "efault.%s.extraversion", badname[i]);
        rc = HYPERVISOR_xen_version(XENVER_extraversion, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
        snprintf(name, sizeof(name), "efault.%s.get_features", badname[i]);
        rc = HYPERVISOR_xen_version(XENVER_get_features, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
        snprintf(name, sizeof(name), "efault.%s.add_to_physmap", badname[i]);
        rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
        snprintf(name, sizeof(name), "efault.%s.get_param", badname[i]);
        rc = HYPERVISOR_hvm_op(HVMOP_get_param, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
        snprintf(name, sizeof(name), "efault.%s.console_io", badname[i]);
        rc = HYPERVISOR_console_io(CONSOLEIO_write, 16, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
        snprintf(name, sizeof(name), "efault.%s.evtchn_alloc_unbound", badname[i]);
        rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, bad[i]);
        check(rc == -XEN_EFAULT, name, "returned %ld", rc);
    }
    /* a buffer that runs off the end of the identity map (last page mapped, next not) */
    rc = HYPERVISOR_console_io(CONSOLEIO_write, 64, (void *)(uintptr_t)(0x100000000ULL - 32));
    check(rc == -XEN_EFAULT, "efault.console_io_straddle", "returned %ld", rc);

    /* still alive and answering */
    check(HYPERVISOR_xen_version(XENVER_version, NULL) == (long)expected_version(),
          "xenver.version_after_errors", "no longer answers");
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_version guest");
    if (!xen_init())
        return 1;
    test_cpuid();
    test_xenver();
    test_errors();
    return 0;
}
