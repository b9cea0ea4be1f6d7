/*
 * hello - the first xenkvm test guest: checks what the VMM hands over at a
 * PVH boot (start_info, command line, memory map, ACPI tables) and that we
 * really are in long mode.
 *
 * Command-line switches (whitespace-separated tokens):
 *   xk.rsdt_ok   accept an ACPI 1.0 RSDP (no XSDT) such as SeaBIOS/QEMU
 *                provide; the XSDT checks are then SKIPped, not failed.
 *                Without it, an RSDP revision < 2 is a failure: our VMM
 *                builds ACPI 2.0+ tables.
 *   xk.fault=K   after the tests, raise exception K (ud, pf, gp, de, df) to
 *                check the exception path: expect "FAIL exception: ..." and
 *                the SUMMARY line.
 */
#include "xk.h"

static void test_start_info(const struct hvm_start_info *si)
{
    printf("start_info at %p: magic=%08x version=%u flags=%x nr_modules=%u\n",
           (const void *)si, si->magic, si->version, si->flags, si->nr_modules);
    check(si->magic == XEN_HVM_START_MAGIC_VALUE, "start_info.magic",
          "magic %#x, expected %#x", si->magic, XEN_HVM_START_MAGIC_VALUE);
    check(si->version >= 1, "start_info.version", "version %u < 1", si->version);
}

static void test_cmdline(const struct hvm_start_info *si)
{
    if (!si->cmdline_paddr) {
        fail("cmdline", "cmdline_paddr is 0");
        return;
    }
    if (si->cmdline_paddr >= 0x100000000ULL) {
        fail("cmdline", "cmdline_paddr %lx above 4 GiB", si->cmdline_paddr);
        return;
    }
    const char *s = (const char *)(uintptr_t)si->cmdline_paddr;
    size_t n = strnlen(s, XK_CMDLINE_MAX);
    if (n == XK_CMDLINE_MAX) {
        fail("cmdline", "no NUL within %u bytes at %lx", XK_CMDLINE_MAX, si->cmdline_paddr);
        return;
    }
    printf("cmdline at %lx (%u bytes): \"%s\"\n", si->cmdline_paddr, (unsigned)n, s);
    bool printable = true;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            printable = false;
    check(n > 0 && printable, "cmdline", "empty or unprintable command line (%u bytes)", (unsigned)n);
}

static const char *memtype(uint32_t t)
{
    switch (t) {
    case XEN_HVM_MEMMAP_TYPE_RAM: return "RAM";
    case XEN_HVM_MEMMAP_TYPE_RESERVED: return "reserved";
    case XEN_HVM_MEMMAP_TYPE_ACPI: return "ACPI";
    case XEN_HVM_MEMMAP_TYPE_NVS: return "NVS";
    case XEN_HVM_MEMMAP_TYPE_UNUSABLE: return "unusable";
    case XEN_HVM_MEMMAP_TYPE_DISABLED: return "disabled";
    case XEN_HVM_MEMMAP_TYPE_PMEM: return "pmem";
    default: return "?";
    }
}

static void test_memmap(const struct hvm_start_info *si)
{
    if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries) {
        fail("memmap", "no memory map (version %u, paddr %lx, entries %u)",
             si->version, si->memmap_paddr, si->memmap_entries);
        return;
    }
    if (si->memmap_paddr >= 0x100000000ULL || si->memmap_entries > 1024) {
        fail("memmap", "implausible memory map at %lx with %u entries",
             si->memmap_paddr, si->memmap_entries);
        return;
    }
    pass("memmap");
    const struct hvm_memmap_table_entry *e =
        (const struct hvm_memmap_table_entry *)(uintptr_t)si->memmap_paddr;
    bool ram_at_1m = false;
    uint64_t total = 0;
    for (uint32_t i = 0; i < si->memmap_entries; i++) {
        printf("  memmap[%u]: %016lx-%016lx %s\n", i, e[i].addr, e[i].addr + e[i].size - 1,
               memtype(e[i].type));
        if (e[i].type == XEN_HVM_MEMMAP_TYPE_RAM) {
            total += e[i].size;
            if (e[i].addr <= XK_KERNEL_LOAD && e[i].addr + e[i].size > XK_KERNEL_LOAD)
                ram_at_1m = true;
        }
    }
    printf("  RAM total %lu KiB\n", total >> 10);
    check(ram_at_1m, "memmap.ram_at_1m", "no RAM entry covers %#x", XK_KERNEL_LOAD);
}

static void print_sig(const char *what, const struct acpi_sdt_header *h)
{
    printf("  %s at %p: %.4s rev %u len %u oem \"%.6s\" \"%.8s\"\n", what, (const void *)h,
           h->signature, h->revision, h->length, h->oem_id, h->oem_table_id);
}

static void test_acpi(const struct hvm_start_info *si)
{
    bool rsdt_ok = xk_cmdline_has("xk.rsdt_ok");
    if (!si->rsdp_paddr || si->rsdp_paddr >= 0x100000000ULL) {
        fail("acpi.rsdp", "rsdp_paddr %lx", si->rsdp_paddr);
        return;
    }
    const struct acpi_rsdp *r = (const struct acpi_rsdp *)(uintptr_t)si->rsdp_paddr;
    if (!check(!memcmp(r->signature, "RSD PTR ", 8), "acpi.rsdp.signature",
               "bad signature at %lx", si->rsdp_paddr)) {
        hexdump(r, 36, si->rsdp_paddr);
        return;
    }
    printf("RSDP at %p: revision %u oem \"%.6s\" rsdt %x", (const void *)r, r->revision,
           r->oem_id, r->rsdt_address);
    if (r->revision >= 2)
        printf(" xsdt %lx length %u", r->xsdt_address, r->length);
    printf("\n");
    check(acpi_checksum(r, 20) == 0, "acpi.rsdp.checksum", "first 20 bytes sum to %#x",
          acpi_checksum(r, 20));

    if (r->revision >= 2) {
        check(r->length >= 36 && r->length < 4096 && acpi_checksum(r, r->length) == 0,
              "acpi.rsdp.extended_checksum", "length %u, sum %#x", r->length,
              r->length >= 36 && r->length < 4096 ? acpi_checksum(r, r->length) : 0xFFu);
    } else if (rsdt_ok) {
        skip("acpi.rsdp.extended_checksum", "RSDP revision %u has no extended part", r->revision);
    } else {
        fail("acpi.rsdp.extended_checksum", "RSDP revision %u < 2 (no XSDT)", r->revision);
    }

    bool is_xsdt = false;
    const struct acpi_sdt_header *root = acpi_root(r, rsdt_ok, &is_xsdt);
    const char *rname = is_xsdt ? "acpi.xsdt" : "acpi.rsdt";
    if (!root) {
        fail("acpi.xsdt", "no XSDT (revision %u, xsdt %lx)", r->revision,
             r->revision >= 2 ? r->xsdt_address : 0);
        return;
    }
    if (!is_xsdt)
        skip("acpi.xsdt", "no XSDT; using the RSDT at %x", r->rsdt_address);
    print_sig(is_xsdt ? "XSDT" : "RSDT", root);
    bool sig_ok = !memcmp(root->signature, is_xsdt ? "XSDT" : "RSDT", 4);
    bool len_ok = root->length >= sizeof(*root) && root->length < 0x10000;
    check(sig_ok && len_ok && acpi_checksum(root, root->length) == 0, rname,
          "signature %.4s length %u checksum sum %#x", root->signature, root->length,
          len_ok ? acpi_checksum(root, root->length) : 0xFFu);
    if (!len_ok)
        return;

    /* every table the root points to should carry a valid checksum */
    size_t esz = is_xsdt ? 8 : 4;
    size_t n = (root->length - sizeof(*root)) / esz;
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t a = 0;
        memcpy(&a, (const uint8_t *)(root + 1) + i * esz, esz);
        if (!a || a >= 0x100000000ULL) {
            bad++;
            continue;
        }
        const struct acpi_sdt_header *t = (const struct acpi_sdt_header *)(uintptr_t)a;
        print_sig("table", t);
        if (t->length < sizeof(*t) || t->length > 0x100000 || acpi_checksum(t, t->length)) {
            printf("    bad checksum or length\n");
            bad++;
        }
    }
    check(n > 0 && bad == 0, "acpi.tables.checksums", "%u of %u tables bad", bad, (unsigned)n);

    const struct acpi_madt *madt = (const struct acpi_madt *)acpi_find(r, "APIC", rsdt_ok);
    if (!madt) {
        fail("acpi.madt", "no APIC table");
        return;
    }
    uint32_t ids[XK_MAX_CPUS];
    int ncpus = acpi_madt_cpus(madt, ids, XK_MAX_CPUS);
    printf("MADT: lapic %x flags %x, %d CPU(s):", madt->lapic_address, madt->flags, ncpus);
    for (int i = 0; i < ncpus && i < XK_MAX_CPUS; i++)
        printf(" %u", ids[i]);
    printf("\n");
    check(acpi_checksum(madt, madt->hdr.length) == 0, "acpi.madt.checksum", "sum %#x",
          acpi_checksum(madt, madt->hdr.length));
    check(ncpus >= 1, "acpi.madt.cpus", "no enabled processor entries");
    check(madt->lapic_address == XK_LAPIC_BASE, "acpi.madt.lapic_address",
          "%#x, expected %#lx", madt->lapic_address, XK_LAPIC_BASE);
}

static void test_cpu(void)
{
    uint32_t a, b, c, d;
    char vendor[13];
    cpuid(0, 0, &a, &b, &c, &d);
    memcpy(vendor + 0, &b, 4);
    memcpy(vendor + 4, &d, 4);
    memcpy(vendor + 8, &c, 4);
    vendor[12] = '\0';
    printf("CPUID vendor \"%s\", max leaf %#x\n", vendor, a);
    bool printable = true;
    for (int i = 0; i < 12; i++)
        if (vendor[i] < 0x20 || vendor[i] > 0x7e)
            printable = false;
    check(printable && a >= 1, "cpuid.vendor", "vendor not printable or max leaf %#x", a);

    cpuid(1, 0, &a, &b, &c, &d);
    printf("CPUID.1: eax=%08x ebx=%08x ecx=%08x edx=%08x (apic id %u)\n", a, b, c, d, b >> 24);
    if (c & (1u << 31)) {
        char hv[13];
        uint32_t max;
        cpuid(0x40000000, 0, &max, &b, &c, &d);
        memcpy(hv + 0, &b, 4);
        memcpy(hv + 4, &c, 4);
        memcpy(hv + 8, &d, 4);
        hv[12] = '\0';
        for (int i = 0; i < 12; i++)
            if (hv[i] && (hv[i] < 0x20 || hv[i] > 0x7e))
                hv[i] = '?';
        printf("hypervisor \"%s\", max leaf %#x\n", hv, max);
    }

    uint64_t efer = rdmsr(MSR_EFER);
    printf("EFER=%lx CR0=%lx CR3=%lx CR4=%lx\n", efer, read_cr0(), read_cr3(), read_cr4());
    check((efer & EFER_LMA) && (efer & EFER_LME), "cpu.long_mode", "EFER %#lx lacks LMA/LME", efer);
}

int main(const struct hvm_start_info *si)
{
    puts("Hello from xenkvm guest");
    test_start_info(si);
    if (si->magic != XEN_HVM_START_MAGIC_VALUE) {
        fail("start_info", "not a PVH start_info; skipping the rest");
        return 1;
    }
    test_cmdline(si);
    test_memmap(si);
    test_acpi(si);
    test_cpu();

    char kind[8];
    if (xk_cmdline_value("xk.fault", kind, sizeof(kind))) {
        printf("raising a deliberate \"%s\" exception\n", kind);
        if (!xk_inject_fault(kind))
            fail("xk.fault", "unknown fault kind \"%s\"", kind);
        else
            fail("xk.fault", "exception \"%s\" did not fire", kind);
    }
    return 0;
}
