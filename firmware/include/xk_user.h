/*
 * xk_user.h - running a little code at CPL 3 or CPL 1 (user.c, user_entry.S).
 *
 * For tests of what a guest *user process* (CPL 3), or code in another
 * outer ring (CPL 1), can and cannot do. The low 2 MiB identity page (which
 * holds the whole image) is split into 4 KiB pages so single pages can be
 * made user-accessible; the code in section .text.user (pages of its own,
 * guest.ld) and an outer-ring stack page are. xk_user_call() enters the ring
 * with iretq at a stub that does `call *target` with the given registers and
 * then comes back to ring 0 through the #UD of a `ud2` at a known address.
 * (An exception is what every host delivers: the PVM host here silently
 * skips `int n` at CPL 3 instead of using a DPL-3 gate.) Any other exception
 * taken outside ring 0 ends the call too and is reported instead. Interrupts
 * stay disabled there (RFLAGS.IF = 0).
 */
#ifndef XK_USER_H
#define XK_USER_H

#include "xk.h"

#define XK_USER_RETURNED    256     /* not a vector: the call returned */
#define XK_RFLAGS_IOPL(n)   ((uint64_t)(n) << 12)

#define XK_PF_P             0x01    /* page-fault error code bits */
#define XK_PF_W             0x02
#define XK_PF_U             0x04
#define XK_PF_RSVD          0x08
#define XK_PF_I             0x10

struct xk_user_regs {
    uint64_t rax, rdi, rsi, rdx, r10, r8;
};

struct xk_user_result {
    unsigned vector;    /* XK_USER_RETURNED, else the exception vector */
    uint64_t error;     /* the exception's error code (0 if none) */
    uint64_t cr2;       /* CR2 at the trap */
    uint64_t rip;       /* RIP the trap reported */
    uint64_t rax;       /* RAX at the trap (the call's result for XK_USER_RETURNED) */
};

/* Split the low 2 MiB into 4 KiB pages, make the user code and stack pages
 * user-accessible, set up TSS.RSP0 and the trap hook.
 * BSP only. false (with a FAIL line) when the image does not fit. */
bool xk_user_init(void);
/* Make the 4 KiB page holding `addr` user-accessible or supervisor-only
 * (INVLPG'd). false if it is not in the split low 2 MiB. */
bool xk_user_set_page(uint64_t addr, bool user);
/* Same for the present bit (a test's not-present page; mind what runs there). */
bool xk_user_set_present(uint64_t addr, bool present);
/* In ring `ring` (1 or 3): `call *target` with `in`'s registers; RFLAGS =
 * 2 | extra (e.g. XK_RFLAGS_IOPL(3)). Fills `out` with how it came back. */
void xk_user_call(unsigned ring, uint64_t target, const struct xk_user_regs *in, uint64_t rflags_extra,
                  struct xk_user_result *out);

#endif
