/*
 * smp - starts every application processor listed in the MADT with
 * INIT/SIPI/SIPI, checks each came up with a distinct APIC ID, and runs a
 * shared-counter test with lock xadd on all CPUs at once.
 *
 * The ACPI root may be the XSDT or (QEMU/SeaBIOS) the RSDT here: table
 * validation proper is hello's job; this guest only needs the CPU list.
 *
 * Command line: xk.ap_fault=K makes every AP raise exception K (ud, pf, gp,
 * de, df) in its callback, to check that a fault on an AP is reported.
 */
#include "xk.h"

#define INCREMENTS          20000u      /* per CPU */
#define DONE_WAIT           2000000u    /* BSP polls for the APs to finish */

static volatile uint32_t go;
static volatile uint32_t shared_counter;
static volatile uint32_t in_callback;
static char ap_fault[8];

static void ap_work(unsigned cpu, uint32_t apic_id)
{
    (void)cpu;
    (void)apic_id;
    xk_fetch_add(&in_callback, 1);
    if (ap_fault[0])
        xk_inject_fault(ap_fault);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        cpu_relax();                    /* the BSP's waits are the bounded ones */
    for (uint32_t i = 0; i < INCREMENTS; i++)
        xk_fetch_add(&shared_counter, 1);
}

static bool in_list(uint32_t id, const uint32_t *ids, int n)
{
    for (int i = 0; i < n; i++)
        if (ids[i] == id)
            return true;
    return false;
}

int main(const struct hvm_start_info *si)
{
    puts("xenkvm smp guest");
    xk_cmdline_value("xk.ap_fault", ap_fault, sizeof(ap_fault));
    if (!check(si->magic == XEN_HVM_START_MAGIC_VALUE, "start_info.magic", "magic %#x", si->magic))
        return 1;

    const struct acpi_rsdp *rsdp = acpi_rsdp(si);
    if (!check(rsdp != NULL, "acpi.rsdp", "no RSDP at %lx", si->rsdp_paddr))
        return 1;
    const struct acpi_madt *madt = (const struct acpi_madt *)acpi_find(rsdp, "APIC", true);
    if (!check(madt != NULL && acpi_checksum(madt, madt->hdr.length) == 0, "acpi.madt",
               "MADT missing or bad checksum"))
        return 1;

    uint32_t ids[XK_MAX_CPUS];
    int ncpus = acpi_madt_cpus(madt, ids, XK_MAX_CPUS);
    printf("MADT lists %d enabled CPU(s):", ncpus);
    for (int i = 0; i < ncpus && i < XK_MAX_CPUS; i++)
        printf(" %u", ids[i]);
    printf("\n");
    if (ncpus > XK_MAX_CPUS) {
        skip("smp.cpus", "only the first %d of %d CPUs are started", XK_MAX_CPUS, ncpus);
        ncpus = XK_MAX_CPUS;
    }
    check(ncpus >= 2, "smp.madt_cpus", "%d CPU(s); this guest needs vcpus >= 2", ncpus);

    uint64_t apic_base = rdmsr(MSR_APIC_BASE);
    printf("IA32_APIC_BASE=%lx\n", apic_base);
    check((apic_base & ~0xFFFULL) == XK_LAPIC_BASE && (apic_base & (1u << 8)), "lapic.base",
          "IA32_APIC_BASE %#lx: expected base %#lx with the BSP flag", apic_base, XK_LAPIC_BASE);
    lapic_enable();
    uint32_t bsp = lapic_id();
    printf("BSP: LAPIC id %u, CPUID id %u, LAPIC version %08x, SVR %08x\n", bsp,
           cpuid_apic_id(), lapic_read(LAPIC_VERSION), lapic_read(LAPIC_SVR));
    check(bsp == cpuid_apic_id(), "lapic.id", "LAPIC ID %u != CPUID APIC ID %u", bsp, cpuid_apic_id());
    check(in_list(bsp, ids, ncpus), "smp.bsp_in_madt", "BSP APIC ID %u not in the MADT", bsp);
    xk_cpus[0].apic_id = bsp;
    xk_cpus[0].cpuid_apic_id = cpuid_apic_id();
    xk_cpus[0].online = 1;

    /* start the APs one by one */
    unsigned next = 1;
    for (int i = 0; i < ncpus; i++) {
        if (ids[i] == bsp)
            continue;
        char name[32];
        snprintf(name, sizeof(name), "smp.start_ap.%u", ids[i]);
        bool up = smp_start_ap(ids[i], next, ap_work);
        if (check(up, name, "APIC ID %u did not announce itself", ids[i]))
            printf("  cpu %u: LAPIC id %u, CPUID id %u\n", next, xk_cpus[next].apic_id,
                   xk_cpus[next].cpuid_apic_id);
        next++;
    }
    unsigned online = xk_cpus_online;
    check(online == (unsigned)ncpus, "smp.all_online", "%u of %d CPUs online", online, ncpus);

    /* every CPU has a distinct APIC ID, as listed in the MADT, agreeing with CPUID */
    bool distinct = true, listed = true, agree = true;
    for (unsigned c = 0; c < next; c++) {
        if (!xk_cpus[c].online)
            continue;
        if (!in_list(xk_cpus[c].apic_id, ids, ncpus))
            listed = false;
        if (xk_cpus[c].apic_id != xk_cpus[c].cpuid_apic_id)
            agree = false;
        for (unsigned d = 0; d < c; d++)
            if (xk_cpus[d].online && xk_cpus[d].apic_id == xk_cpus[c].apic_id)
                distinct = false;
    }
    check(distinct, "smp.distinct_apic_ids", "two CPUs report the same APIC ID");
    check(listed, "smp.apic_ids_in_madt", "a CPU reports an APIC ID not in the MADT");
    check(agree, "smp.cpuid_matches_lapic", "CPUID.1 APIC ID differs from the LAPIC ID register");

    /* shared counter: everyone adds INCREMENTS with lock xadd at the same time */
    for (uint32_t i = 0; i < DONE_WAIT && in_callback < online - 1; i++)
        cpu_relax();
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    for (uint32_t i = 0; i < INCREMENTS; i++)
        xk_fetch_add(&shared_counter, 1);
    bool done = smp_wait_done(next, DONE_WAIT);
    check(done, "smp.aps_done", "APs did not finish the counter loop");
    uint32_t expect = online * INCREMENTS;
    printf("shared counter %u (expected %u from %u CPUs)\n", shared_counter, expect, online);
    check(shared_counter == expect, "smp.lock_xadd_counter", "counter %u, expected %u",
          shared_counter, expect);
    return 0;
}
