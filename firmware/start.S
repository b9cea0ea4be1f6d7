/*
 * start.S - PVH entry for the xenkvm test guests.
 *
 * Entered per the Xen PVH boot ABI: 32-bit protected mode, paging off,
 * flat CS/DS/ES/SS, EBX = physical address of struct hvm_start_info,
 * interrupts off, no usable stack, no GDT/IDT of ours.
 *
 * We load our own GDT, zero .bss, build identity page tables for the low
 * 4 GiB with 2 MiB pages, enable PAE + EFER.LME + paging, far-jump into
 * 64-bit code and call xk_bsp_entry(start_info) in cpu.c.
 */
#include "xk_asm.h"

/* ---- the PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY) ---------------------------- */
        .section .note.Xen, "a", @note
        .p2align 2
        .long   4                       /* namesz: "Xen\0" */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .p2align 2
        .long   pvh_start32
        .p2align 2

/* ---- 32-bit entry ------------------------------------------------------------ */
        .section .text.boot, "ax"
        .code32
        .globl  pvh_start32
        .type   pvh_start32, @function
pvh_start32:
        cli
        cld
        mov     %ebx, %esi              /* keep start_info; rep stos uses eax/ecx/edi */

        lgdt    xk_gdt_desc
        ljmp    $SEL_CODE32, $1f
1:      mov     $SEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs

        /* zero .bss (page tables and stacks live there) */
        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %edi, %ecx
        shr     $2, %ecx
        xor     %eax, %eax
        rep stosl

        mov     $xk_boot_stack_top, %esp
        pushl   $0
        popfl                           /* clean EFLAGS (DF, AC, IF all 0) */

        /* PML4[0] -> PDPT */
        mov     $xk_pdpt, %eax
        or      $(PTE_P | PTE_W), %eax
        mov     %eax, xk_pml4
        /* PDPT[0..3] -> 4 page directories */
        mov     $xk_pd, %eax
        or      $(PTE_P | PTE_W), %eax
        xor     %ecx, %ecx
2:      mov     %eax, xk_pdpt(,%ecx,8)
        add     $0x1000, %eax
        inc     %ecx
        cmp     $4, %ecx
        jb      2b
        /* 2048 x 2 MiB identity pages; the top GiB (MMIO: IOAPIC, LAPIC) uncached */
        xor     %ecx, %ecx
3:      mov     %ecx, %eax
        shl     $21, %eax
        or      $(PTE_P | PTE_W | PTE_PS), %eax
        cmp     $1536, %ecx
        jb      4f
        or      $(PTE_PWT | PTE_PCD), %eax
4:      mov     %eax, xk_pd(,%ecx,8)
        inc     %ecx
        cmp     $2048, %ecx
        jb      3b

        /* PAE, then CR3, then EFER.LME, then paging */
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $xk_pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER_NUM, %ecx
        rdmsr
        or      $EFER_LME_BIT, %eax
        wrmsr
        mov     %cr0, %eax
        and     $~(CR0_EM | CR0_TS | CR0_CD | CR0_NW), %eax
        or      $(CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG), %eax
        mov     %eax, %cr0
        ljmp    $SEL_CODE64, $start64
        .size   pvh_start32, . - pvh_start32

/* ---- 64-bit BSP entry -------------------------------------------------------- */
        .code64
start64:
        mov     $SEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $xk_boot_stack_top, %rsp
        xor     %ebp, %ebp
        mov     %esi, %edi              /* zero-extends: start_info paddr */
        call    xk_bsp_entry
5:      cli
        hlt
        jmp     5b

/* ---- 64-bit AP entry (jumped to by the trampoline) ---------------------------
 * On entry: our page tables, the trampoline's GDT, RSP = this AP's stack,
 * RDI = cpu index. */
        .globl  xk_ap_entry64
        .type   xk_ap_entry64, @function
xk_ap_entry64:
        lgdt    xk_gdt_desc
        pushq   $SEL_CODE64
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      mov     $SEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        pushq   $0
        popfq
        xor     %ebp, %ebp
        call    xk_ap_entry
6:      cli
        hlt
        jmp     6b
        .size   xk_ap_entry64, . - xk_ap_entry64

/* ---- exception / interrupt stubs ---------------------------------------------
 * 256 stubs, each XK_STUB_SIZE bytes apart starting at xk_isr_stubs. Vectors
 * where the CPU pushes an error code skip the dummy push. All end in
 * xk_isr_common which saves the GPRs and calls xk_interrupt(frame): a
 * vector >= 32 with a registered handler returns here and irets, anything
 * else goes to the exception reporter (which does not return). */
        .text
        .p2align 4
        .globl  xk_isr_stubs
xk_isr_stubs:
        .set    vec, 0
        .rept   256
        .p2align 4
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     xk_isr_common
        .set    vec, vec + 1
        .endr

xk_isr_common:
        /* frame layout must match struct xk_frame in cpu.c */
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        cld
        mov     %rsp, %rdi
        mov     %rsp, %rbx              /* callee-saved: the frame */
        and     $~15, %rsp
        call    xk_interrupt            /* returns only for a handled interrupt */
        mov     %rbx, %rsp
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        add     $16, %rsp               /* vector, error code */
        iretq

/* ---- GDT ----------------------------------------------------------------------
 * 0x00 null, 0x08 code32, 0x10 data, 0x18 code64, then one 16-byte TSS
 * descriptor per CPU from 0x20 (filled in by cpu.c), then data and 64-bit
 * code segments for ring 3 and for ring 1 (used by user.c). */
        .data
        .p2align 4
        .globl  xk_gdt, xk_gdt_desc
xk_gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, 32-bit, flat */
        .quad   0x00cf92000000ffff      /* 0x10: data, flat */
        .quad   0x00af9a000000ffff      /* 0x18: code, 64-bit */
        .fill   XK_MAX_CPUS_ASM * 2, 8, 0 /* 0x20..: TSS descriptors */
        .quad   0x00cff2000000ffff      /* SEL_USER_DATA: data, flat, DPL 3 */
        .quad   0x00affa000000ffff      /* SEL_USER_CODE64: code, 64-bit, DPL 3 */
        .quad   0x00cfb2000000ffff      /* SEL_RING1_DATA: data, flat, DPL 1 */
        .quad   0x00afba000000ffff      /* SEL_RING1_CODE64: code, 64-bit, DPL 1 */
xk_gdt_end:
        .p2align 4
        /* 32-bit lgdt reads limit + the low 4 bytes of base; 64-bit reads all 8 */
xk_gdt_desc:
        .word   xk_gdt_end - xk_gdt - 1
        .quad   xk_gdt

/* ---- page tables and the boot stack (zeroed at entry) ----------------------- */
        .section .bss
        .p2align 12
        .globl  xk_pml4, xk_pdpt, xk_pd
xk_pml4:
        .skip   4096
xk_pdpt:
        .skip   4096
xk_pd:
        .skip   4 * 4096
        .p2align 4
xk_boot_stack:
        .skip   XK_STACK_SIZE_ASM
        .globl  xk_boot_stack_top
xk_boot_stack_top:

        .section .note.GNU-stack, "", @progbits
