/* xk_asm.h - constants shared by the toolkit's assembly files. */
#ifndef XK_ASM_H
#define XK_ASM_H

#define SEL_CODE32      0x08
#define SEL_DATA        0x10
#define SEL_CODE64      0x18
#define SEL_TSS0        0x20    /* + 16 * cpu index */
/* ring-3 and ring-1 segments (user.c), after the TSS descriptors; the RPL
 * is in the selector */
#define SEL_USER_DATA   0x123   /* GDT slot 36: data, DPL 3 */
#define SEL_USER_CODE64 0x12B   /* GDT slot 37: code, 64-bit, DPL 3 */
#define SEL_RING1_DATA  0x131   /* GDT slot 38: data, DPL 1 */
#define SEL_RING1_CODE64 0x139  /* GDT slot 39: code, 64-bit, DPL 1 */

#define PTE_P           0x001
#define PTE_W           0x002
#define PTE_U           0x004
#define PTE_PWT         0x008
#define PTE_PCD         0x010
#define PTE_PS          0x080

#define CR0_PE          0x00000001
#define CR0_MP          0x00000002
#define CR0_EM          0x00000004
#define CR0_TS          0x00000008
#define CR0_NE          0x00000020
#define CR0_WP          0x00010000
#define CR0_NW          0x20000000
#define CR0_CD          0x40000000
#define CR0_PG          0x80000000
#define CR4_PAE         0x00000020

#define MSR_EFER_NUM    0xC0000080
#define EFER_LME_BIT    0x00000100

/* keep in sync with xk.h (checked by _Static_assert in cpu.c) */
#define XK_MAX_CPUS_ASM     16
#define XK_STACK_SIZE_ASM   16384
#define XK_STUB_SIZE        16

#endif
