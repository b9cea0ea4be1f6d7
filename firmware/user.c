/*
 * user.c - running a little code at CPL 3 or 1 (see xk_user.h).
 */
#include "xk_user.h"
#include "xk_asm.h"

#define PAGE            4096u
#define SPLIT_LIMIT     0x200000u      /* the low 2 MiB page, split into 4 KiB pages */

struct xk_user_ctx {
    uint64_t kernel_rsp, rip, rsp, rflags;
    uint64_t rax, rdi, rsi, rdx, r10, r8, r12;
    uint64_t cs, ss;
};
_Static_assert(__builtin_offsetof(struct xk_user_ctx, r12) == 80, "user_entry.S offsets");
_Static_assert(__builtin_offsetof(struct xk_user_ctx, ss) == 96, "user_entry.S offsets");

void xk_user_enter(struct xk_user_ctx *ctx);
XK_NORETURN void xk_user_leave(uint64_t kernel_rsp);

extern uint64_t xk_pml4[], xk_pdpt[], xk_pd[];
extern const char __user_text_start[], __user_text_end[], xk_user_stub[], xk_user_stub_done[];
extern const char __image_end[];

static uint64_t low_pt[512] __attribute__((aligned(PAGE)));
static uint8_t user_stack[PAGE] __attribute__((aligned(PAGE)));
static uint8_t trap_stack[PAGE] __attribute__((aligned(16)));   /* TSS.RSP0 */
static struct xk_user_ctx ctx;
static struct xk_user_result *result;

static inline void invlpg(uint64_t addr)
{
    __asm__ volatile("invlpg (%0)" :: "r"(addr) : "memory");
}

static XK_NORETURN void on_user_trap(struct xk_frame *f)
{
    if (!result) {          /* not inside xk_user_call: nowhere to go back to */
        fail("user.trap", "vector %lu at CPL %lu outside xk_user_call, rip=%#lx", f->vector, f->cs & 3, f->rip);
        xk_finish();
    }
    bool done = f->vector == 6 && f->rip == (uint64_t)(uintptr_t)xk_user_stub_done;
    result->vector = done ? XK_USER_RETURNED : (unsigned)f->vector;
    result->error = f->error;
    result->cr2 = read_cr2();
    result->rip = f->rip;
    result->rax = f->rax;
    xk_user_leave(ctx.kernel_rsp);
}

static bool set_pte_bit(uint64_t addr, uint64_t bit, bool on)
{
    if (addr >= SPLIT_LIMIT || !(xk_pd[0] & PTE_U))
        return false;
    uint64_t *pte = &low_pt[addr / PAGE];
    *pte = on ? (*pte | bit) : (*pte & ~bit);
    invlpg(addr & ~(uint64_t)(PAGE - 1));
    return true;
}

bool xk_user_set_page(uint64_t addr, bool user)
{
    return set_pte_bit(addr, PTE_U, user);
}

bool xk_user_set_present(uint64_t addr, bool present)
{
    return set_pte_bit(addr, PTE_P, present);
}

bool xk_user_init(void)
{
    if ((uint64_t)(uintptr_t)__image_end > SPLIT_LIMIT) {
        fail("user.init", "image ends at %p, beyond the low 2 MiB", (const void *)__image_end);
        return false;
    }
    for (unsigned i = 0; i < 512; i++)
        low_pt[i] = (uint64_t)i * PAGE | PTE_P | PTE_W;
    /* U must be set at every level for a user access; the 2 MiB pages other
     * than the first stay supervisor-only. */
    xk_pml4[0] |= PTE_U;
    xk_pdpt[0] |= PTE_U;
    xk_pd[0] = (uint64_t)(uintptr_t)low_pt | PTE_P | PTE_W | PTE_U;
    __asm__ volatile("mov %0, %%cr3" :: "r"(read_cr3()) : "memory");
    for (uint64_t a = (uint64_t)(uintptr_t)__user_text_start; a < (uint64_t)(uintptr_t)__user_text_end; a += PAGE)
        xk_user_set_page(a, true);
    xk_user_set_page((uint64_t)(uintptr_t)user_stack, true);
    xk_set_rsp0(0, (uint64_t)(uintptr_t)&trap_stack[sizeof(trap_stack)]);
    xk_set_user_trap(on_user_trap);
    return true;
}

void xk_user_call(unsigned ring, uint64_t target, const struct xk_user_regs *in, uint64_t rflags_extra,
                  struct xk_user_result *out)
{
    memset(out, 0, sizeof(*out));
    out->vector = ~0u;
    ctx.cs = ring == 1 ? SEL_RING1_CODE64 : SEL_USER_CODE64;
    ctx.ss = ring == 1 ? SEL_RING1_DATA : SEL_USER_DATA;
    ctx.rip = (uint64_t)(uintptr_t)xk_user_stub;
    ctx.rsp = (uint64_t)(uintptr_t)&user_stack[sizeof(user_stack)];
    ctx.rflags = 0x2 | rflags_extra;
    ctx.rax = in->rax;
    ctx.rdi = in->rdi;
    ctx.rsi = in->rsi;
    ctx.rdx = in->rdx;
    ctx.r10 = in->r10;
    ctx.r8 = in->r8;
    ctx.r12 = target;
    result = out;
    xk_user_enter(&ctx);
    result = NULL;
}
