/*
 * ap_trampoline.S - application processor start-up code.
 *
 * This blob is data in the image: lapic.c copies [xk_ap_tramp_start,
 * xk_ap_tramp_end) to XK_AP_TRAMPOLINE_ADDR (a page in 0x8000..0xffff) and
 * patches the parameter block at its end, then sends INIT/SIPI/SIPI with
 * vector XK_AP_TRAMPOLINE_ADDR >> 12. The AP starts in real mode at
 * CS:IP = (vector << 8):0000, goes to 32-bit protected mode with the
 * trampoline's own GDT, enables PAE + long mode + paging with the BSP's CR3
 * (below 4 GiB, as a 32-bit mov to CR3 requires), and jumps to
 * xk_ap_entry64 (start.S) with RSP = its stack and RDI = its cpu index.
 */
#include "xk_asm.h"

#define TRAMP_BASE      0x8000          /* == XK_AP_TRAMPOLINE_ADDR */
#define T(sym)          ((sym) - xk_ap_tramp_start)
#define ABS(sym)        (T(sym) + TRAMP_BASE)

        .section .rodata.ap_tramp, "a"
        .p2align 4
        .globl  xk_ap_tramp_start, xk_ap_tramp_end
        .globl  xk_ap_tramp_cr3, xk_ap_tramp_stack, xk_ap_tramp_entry, xk_ap_tramp_arg

        .code16
xk_ap_tramp_start:
        cli
        cld
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   T(tr_gdt_desc)
        mov     %cr0, %eax
        or      $CR0_PE, %eax
        mov     %eax, %cr0
        ljmpl   $SEL_CODE32, $ABS(tr_start32)

        .code32
tr_start32:
        mov     $SEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs

        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     ABS(xk_ap_tramp_cr3), %eax
        mov     %eax, %cr3
        mov     $MSR_EFER_NUM, %ecx
        rdmsr
        or      $EFER_LME_BIT, %eax
        wrmsr
        mov     %cr0, %eax
        and     $~(CR0_EM | CR0_TS | CR0_CD | CR0_NW), %eax
        or      $(CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG), %eax
        mov     %eax, %cr0
        ljmp    $SEL_CODE64, $ABS(tr_start64)

        .code64
tr_start64:
        mov     ABS(xk_ap_tramp_stack), %rsp
        mov     ABS(xk_ap_tramp_arg), %rdi
        mov     ABS(xk_ap_tramp_entry), %rax
        jmp     *%rax

        .p2align 3
tr_gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data */
        .quad   0x00af9a000000ffff      /* 0x18: code, 64-bit */
tr_gdt_end:
tr_gdt_desc:
        .word   tr_gdt_end - tr_gdt - 1
        .long   ABS(tr_gdt)

        /* parameter block, patched by the BSP in the copy */
        .p2align 3
xk_ap_tramp_cr3:
        .quad   0
xk_ap_tramp_stack:
        .quad   0
xk_ap_tramp_entry:
        .quad   0
xk_ap_tramp_arg:
        .quad   0
xk_ap_tramp_end:

        .section .note.GNU-stack, "", @progbits
