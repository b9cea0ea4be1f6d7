/*
 * user_entry.S - entering ring 3 or 1 and coming back (see xk_user.h).
 */
#include "xk_asm.h"

/* struct xk_user_ctx (user.c) */
#define CTX_KERNEL_RSP  0
#define CTX_RIP         8
#define CTX_RSP         16
#define CTX_RFLAGS      24
#define CTX_RAX         32
#define CTX_RDI         40
#define CTX_RSI         48
#define CTX_RDX         56
#define CTX_R10         64
#define CTX_R8          72
#define CTX_R12         80
#define CTX_CS          88
#define CTX_SS          96

        .text
/* void xk_user_enter(struct xk_user_ctx *ctx): save the callee-saved
 * registers and RFLAGS on this stack, remember RSP in ctx, iretq to the
 * ring of ctx's CS/SS.
 * Returns when the trap hook calls xk_user_leave(ctx->kernel_rsp). */
        .globl  xk_user_enter
        .type   xk_user_enter, @function
xk_user_enter:
        pushq   %rbp
        pushq   %rbx
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        pushfq
        mov     %rsp, CTX_KERNEL_RSP(%rdi)
        pushq   CTX_SS(%rdi)
        pushq   CTX_RSP(%rdi)
        pushq   CTX_RFLAGS(%rdi)
        pushq   CTX_CS(%rdi)
        pushq   CTX_RIP(%rdi)
        mov     CTX_RAX(%rdi), %rax
        mov     CTX_RSI(%rdi), %rsi
        mov     CTX_RDX(%rdi), %rdx
        mov     CTX_R10(%rdi), %r10
        mov     CTX_R8(%rdi), %r8
        mov     CTX_R12(%rdi), %r12
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        xor     %ebp, %ebp
        xor     %r9d, %r9d
        xor     %r11d, %r11d
        xor     %r13d, %r13d
        xor     %r14d, %r14d
        xor     %r15d, %r15d
        mov     CTX_RDI(%rdi), %rdi
        iretq
        .size   xk_user_enter, . - xk_user_enter

/* void xk_user_leave(uint64_t kernel_rsp): back into xk_user_enter's frame,
 * which returns to its caller. */
        .globl  xk_user_leave
        .type   xk_user_leave, @function
xk_user_leave:
        mov     $SEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %rdi, %rsp
        popfq
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %rbx
        popq    %rbp
        ret
        .size   xk_user_leave, . - xk_user_leave

/* The outer-ring side, in the user-accessible pages (guest.ld, xk_user_init). */
        .section .text.user, "ax"
        .globl  xk_user_stub, xk_user_stub_done
xk_user_stub:
        call    *%r12
xk_user_stub_done:
        ud2                             /* back to ring 0 (#UD here = returned) */

        .section .note.GNU-stack, "", @progbits
