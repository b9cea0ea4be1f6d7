/*
 * acpi.c - finding the RSDP from start_info, walking the XSDT (or RSDT) and
 * listing the processors in the MADT. Only reads; validation results are
 * returned to the caller, who decides what is a test failure.
 */
#include "xk.h"

uint8_t acpi_checksum(const void *p, size_t len)
{
    const uint8_t *b = p;
    uint8_t sum = 0;
    while (len--)
        sum = (uint8_t)(sum + *b++);
    return sum;
}

static bool addr_ok(uint64_t a)
{
    /* everything we can read is identity mapped below 4 GiB */
    return a != 0 && a < 0x100000000ULL;
}

const struct acpi_rsdp *acpi_rsdp(const struct hvm_start_info *si)
{
    if (!si || si->magic != XEN_HVM_START_MAGIC_VALUE || !addr_ok(si->rsdp_paddr))
        return NULL;
    const struct acpi_rsdp *r = (const struct acpi_rsdp *)(uintptr_t)si->rsdp_paddr;
    if (memcmp(r->signature, "RSD PTR ", 8))
        return NULL;
    return r;
}

const struct acpi_sdt_header *acpi_root(const struct acpi_rsdp *rsdp, bool allow_rsdt, bool *is_xsdt)
{
    if (!rsdp)
        return NULL;
    if (rsdp->revision >= 2 && addr_ok(rsdp->xsdt_address)) {
        if (is_xsdt)
            *is_xsdt = true;
        return (const struct acpi_sdt_header *)(uintptr_t)rsdp->xsdt_address;
    }
    if (allow_rsdt && addr_ok(rsdp->rsdt_address)) {
        if (is_xsdt)
            *is_xsdt = false;
        return (const struct acpi_sdt_header *)(uintptr_t)rsdp->rsdt_address;
    }
    return NULL;
}

const struct acpi_sdt_header *acpi_find(const struct acpi_rsdp *rsdp, const char sig[4], bool allow_rsdt)
{
    bool xsdt = false;
    const struct acpi_sdt_header *root = acpi_root(rsdp, allow_rsdt, &xsdt);
    if (!root || root->length < sizeof(*root))
        return NULL;
    size_t esz = xsdt ? 8 : 4;
    size_t n = (root->length - sizeof(*root)) / esz;
    const uint8_t *ents = (const uint8_t *)(root + 1);
    for (size_t i = 0; i < n; i++) {
        uint64_t a = 0;
        memcpy(&a, ents + i * esz, esz);
        if (!addr_ok(a))
            continue;
        const struct acpi_sdt_header *t = (const struct acpi_sdt_header *)(uintptr_t)a;
        if (!memcmp(t->signature, sig, 4))
            return t;
    }
    return NULL;
}

int acpi_madt_cpus(const struct acpi_madt *madt, uint32_t *ids, int max)
{
    int count = 0;
    if (!madt || madt->hdr.length < sizeof(*madt))
        return 0;
    const uint8_t *p = madt->entries;
    const uint8_t *end = (const uint8_t *)madt + madt->hdr.length;
    while (p + 2 <= end) {
        uint8_t type = p[0], len = p[1];
        if (len < 2 || p + len > end)
            break;
        if (type == MADT_TYPE_LAPIC && len >= 8) {
            /* uid(1) apic_id(1) flags(4) */
            uint32_t flags;
            memcpy(&flags, p + 4, 4);
            if (flags & MADT_LAPIC_ENABLED) {
                if (count < max)
                    ids[count] = p[3];
                count++;
            }
        } else if (type == MADT_TYPE_X2APIC && len >= 16) {
            /* reserved(2) x2apic_id(4) flags(4) uid(4) */
            uint32_t id, flags;
            memcpy(&id, p + 4, 4);
            memcpy(&flags, p + 8, 4);
            if (flags & MADT_LAPIC_ENABLED) {
                if (count < max)
                    ids[count] = id;
                count++;
            }
        }
        p += len;
    }
    return count;
}
