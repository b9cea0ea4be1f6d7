/*
 * xen_userpriv - hypercalls from outside ring 0 must do nothing.
 *
 * Xen answers a hypercall made at CPL > 0 by an HVM/PVH guest with -EPERM
 * (xen/arch/x86/hvm/hypercall.c, hvm_get_cpl()), and a user process that
 * jumps into kernel memory gets the instruction-fetch #PF it would get
 * without any hypervisor. Ring 3 (a user process) and ring 1 (xk_user.h)
 * call the trap style's hypercall entry (hypercall-page stub, or
 * xen_hypercall_intel/amd, which the VMM traps with a hardware breakpoint
 * that fires before the fetch) with two calls that would be visible if they
 * went through:
 *   XENMEM_add_to_physmap(shared_info -> decoy page): the decoy would be
 *       overwritten with shared_info's contents;
 *   SCHEDOP_shutdown(poweroff): the domain would stop before the SUMMARY.
 * Cases (ring, the entry's page, IOPL) and what the CPU does:
 *   3, supervisor:      #PF, CR2 = RIP = entry, error P|U (|I/D with EFER.NXE)
 *   any, not present:   #PF, error (U|) (|I/D with EFER.NXE)
 *   3 user page, 1 supervisor page: the instructions run at that CPL:
 *       the stub's `out` #GPs when CPL > IOPL, else reaches the VMM, which
 *       must answer -EPERM; a direct vmcall/vmmcall must return -EPERM,
 *       unless the VMM's patch trap rewrote it into `out %eax,$0xea; nop`:
 *       then it behaves as the stub's `out` (offset 0).
 * The IOPL a host really gives the outer ring is measured first (the PVM
 * host runs them with IOPL 0 whatever iretq asked, so there every `out`
 * #GPs). Each case twice, with EFER.NXE clear and set (the I/D bit).
 * Afterwards ring-0 hypercalls still work, and the same add_to_physmap from
 * ring 0 does overwrite the decoy (the no-effect checks can see a move).
 *
 * Command line: xk.trap=page|direct.
 */
#include "xen_guest.h"
#include "xk_user.h"

#define DECOY_BYTE      0xA5
#define EFER_NXE        (1u << 11)
#define OUT_OFFSET      5           /* the stub's `out` follows `mov eax, imm32` */
#define OUT_EAX_IMM8    0xE7        /* `out %eax, $port`: what the patch trap put at a direct entry */

static uint8_t decoy[XEN_PAGE] XEN_PAGE_ALIGNED;
/* hypercall arguments, in a page ring 3 may read */
static struct {
    struct xen_add_to_physmap xatp;
    struct sched_shutdown sd;
} user_args XEN_PAGE_ALIGNED;

/* In the user-accessible text: CS | RFLAGS << 16 as the outer ring sees them
 * (proves the ring, and shows the IOPL a host really gave it). */
__attribute__((section(".text.user"), used, noinline))
static uint64_t user_cpu_state(void)
{
    uint64_t cs, flags;
    __asm__ volatile("mov %%cs, %0; pushfq; popq %1" : "=r"(cs), "=r"(flags));
    return (cs & 0xFFFF) | flags << 16;
}

/* The IOPL code in `ring` really runs with when entered with `iopl`: the
 * PVM host here runs outer rings with IOPL 0 whatever the guest asked. */
static unsigned effective_iopl(unsigned ring, unsigned iopl)
{
    struct xk_user_regs none = { 0 };
    struct xk_user_result r;
    xk_user_call(ring, (uint64_t)(uintptr_t)user_cpu_state, &none, XK_RFLAGS_IOPL(iopl), &r);
    return r.vector == XK_USER_RETURNED ? (unsigned)(r.rax >> 16 >> 12) & 3 : 0;
}

enum page_state { SUPERVISOR, NOT_PRESENT, USER };
static const char *const state_names[] = { "supervisor", "not-present", "user" };

struct user_case {
    unsigned ring;              /* 3: a user process; 1: another outer ring */
    enum page_state page;       /* of the hypercall entry */
    unsigned iopl;
};

static const struct user_case cases[] = {
    { 3, SUPERVISOR, 0 },       /* a user process jumps into the kernel's entry */
    { 3, NOT_PRESENT, 0 },
    { 3, USER, 0 },             /* the entry in a user page: its instructions run at CPL 3 */
    { 3, USER, 3 },             /* ... and the stub's `out` is allowed by IOPL */
    { 1, SUPERVISOR, 0 },       /* CPL 1 may fetch supervisor pages: the instructions run */
    { 1, SUPERVISOR, 1 },
    { 1, NOT_PRESENT, 1 },
};

static bool decoy_intact(void)
{
    for (unsigned i = 0; i < XEN_PAGE; i++)
        if (decoy[i] != DECOY_BYTE)
            return false;
    return true;
}

/* Set the P and U bits of the 4 KiB page `page` (in the split low 2 MiB). */
static bool set_state(uint64_t page, enum page_state st)
{
    return xk_user_set_page(page, st == USER) && xk_user_set_present(page, st != NOT_PRESENT);
}

static void expect_refused(const char *what, uint64_t nr, const struct user_case *c, bool nxe,
                           const struct xk_user_regs *in)
{
    uint64_t entry = (uint64_t)(uintptr_t)xen_hypercall_target(nr);
    uint64_t page = entry & ~0xFFFull;
    char name[80];
    snprintf(name, sizeof(name), "ring%u.%s.%s.iopl%u%s", c->ring, what, state_names[c->page], c->iopl,
             nxe ? ".nxe" : "");
    if (!set_state(page, c->page)) {
        fail(name, "entry %#lx is outside the split low 2 MiB", entry);
        return;
    }
    unsigned iopl = effective_iopl(c->ring, c->iopl);
    if (iopl != c->iopl)
        printf("%s: the host runs ring %u with IOPL %u, not %u\n", name, c->ring, iopl, c->iopl);
    struct xk_user_result r;
    xk_user_call(c->ring, entry, in, XK_RFLAGS_IOPL(c->iopl), &r);
    set_state(page, SUPERVISOR);

    /* the fetch faults: not present, or a supervisor page at CPL 3 */
    bool fetch_faults = c->page == NOT_PRESENT || (c->page == SUPERVISOR && c->ring == 3);
    /* the stub's `out` at CPL > IOPL: #GP(0), as without any hypervisor */
    bool patched = xen.trap != XEN_TRAP_PAGE && *(volatile uint8_t *)(uintptr_t)entry == OUT_EAX_IMM8;
    uint64_t out_at = entry + (patched ? 0 : OUT_OFFSET);
    bool out_gp = (xen.trap == XEN_TRAP_PAGE || patched) && c->ring > iopl;
    if (fetch_faults) {
        uint64_t err = (c->ring == 3 ? XK_PF_U : 0) | (c->page == NOT_PRESENT ? 0 : XK_PF_P)
                     | (nxe ? XK_PF_I : 0);     /* CR4.SMEP is off: I/D only with EFER.NXE */
        check(r.vector == 14 && r.cr2 == entry && r.rip == entry && r.error == err, name,
              "entry %#lx: vector %u rip %#lx cr2 %#lx err %#lx rax %ld (want #PF cr2=rip=entry err %#lx)",
              entry, r.vector, r.rip, r.cr2, r.error, (long)r.rax, err);
    } else if (out_gp) {
        check(r.vector == 13 && r.error == 0 && r.rip == out_at, name,
              "entry %#lx: vector %u rip %#lx err %#lx rax %ld (want #GP(0) at the out, %#lx)",
              entry, r.vector, r.rip, r.error, (long)r.rax, out_at);
    } else {
        check(r.vector == XK_USER_RETURNED && (long)r.rax == -XEN_EPERM, name,
              "entry %#lx: vector %u rip %#lx cr2 %#lx err %#lx rax %ld (want the call to return -EPERM)",
              entry, r.vector, r.rip, r.cr2, r.error, (long)r.rax);
    }
    size_t n = strlen(name);
    snprintf(name + n, sizeof(name) - n, ".no_effect");
    check(decoy_intact(), name, "the decoy page changed: shared_info moved there");
}

static void run_cases(bool nxe)
{
    struct xk_user_regs add = {
        .rax = __HYPERVISOR_memory_op, .rdi = XENMEM_add_to_physmap,
        .rsi = (uint64_t)(uintptr_t)&user_args.xatp,
    };
    struct xk_user_regs shut = {
        .rax = __HYPERVISOR_sched_op, .rdi = SCHEDOP_shutdown,
        .rsi = (uint64_t)(uintptr_t)&user_args.sd,
    };
    for (unsigned i = 0; i < XK_ARRAY_SIZE(cases); i++) {
        expect_refused("add_to_physmap", __HYPERVISOR_memory_op, &cases[i], nxe, &add);
        expect_refused("shutdown", __HYPERVISOR_sched_op, &cases[i], nxe, &shut);
    }
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_userpriv guest");
    if (!xen_init())
        return 1;
    if (!check(xen_map_shared_info() == 0, "shinfo.map", "XENMEM_add_to_physmap(shared_info) failed"))
        return 1;
    if (!xk_user_init())
        return 1;
    memset(decoy, DECOY_BYTE, sizeof(decoy));
    user_args.xatp = (struct xen_add_to_physmap){
        .domid = DOMID_SELF, .space = XENMAPSPACE_shared_info, .idx = 0,
        .gpfn = (uint64_t)(uintptr_t)decoy >> 12,
    };
    user_args.sd.reason = SHUTDOWN_poweroff;
    if (!xk_user_set_page((uint64_t)(uintptr_t)&user_args, true))
        return 1;

    for (unsigned ring = 1; ring <= 3; ring += 2) {
        char name[16];
        snprintf(name, sizeof(name), "ring%u.works", ring);
        struct xk_user_regs none = { 0 };
        struct xk_user_result r;
        xk_user_call(ring, (uint64_t)(uintptr_t)user_cpu_state, &none, 0, &r);
        if (!check(r.vector == XK_USER_RETURNED && (r.rax & 3) == ring, name,
                   "vector %u rip %#lx err %#lx, CS %#lx", r.vector, r.rip, r.error, r.rax & 0xFFFF))
            return 1;
    }

    run_cases(false);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_NXE);
    run_cases(true);

    long v = HYPERVISOR_xen_version(XENVER_version, NULL);
    check(v == (long)(xen.major << 16 | xen.minor), "kernel.hypercalls_still_work", "XENVER_version %#lx", v);
    /* the control: the same call from ring 0 does move shared_info onto the decoy */
    long rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap, &user_args.xatp);
    check(rc == 0 && !decoy_intact(), "kernel.add_to_physmap_moves", "rc %ld, decoy %s", rc,
          decoy_intact() ? "unchanged" : "changed");
    return 0;
}
