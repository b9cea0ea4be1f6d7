/*
 * platform.h - the guest-visible platform contract, mirrored from
 * xenkvm/machine/layout.py (same names, prefixed XK_).
 *
 * tests/unit/test_platform_header.py parses this file and checks that every
 * XK_ constant equals the layout.py value, so keep each definition a plain
 * integer literal on one line: #define XK_NAME 0x1234
 */
#ifndef XK_PLATFORM_H
#define XK_PLATFORM_H

/* guest-physical addresses used while booting (all below 1 MiB) */
#define XK_BOOT_GDT         0x0500
#define XK_BOOT_PARAMS      0x7000
#define XK_PVH_START_INFO   0x6000
#define XK_BOOT_PML4        0x10000
#define XK_BOOT_CMDLINE     0x20000
#define XK_CMDLINE_MAX      0x10000
#define XK_ACPI_BASE        0xE0000
#define XK_ACPI_SIZE        0x10000
#define XK_KERNEL_LOAD      0x100000

/* I/O ports */
#define XK_COM1             0x3F8
#define XK_DEBUG_PORT       0xE9
#define XK_SNAPSHOT_PORT    0xEE   /* run --snapshot-on-port FILE: a write snapshots the guest there */
#define XK_PM_BASE          0x600
#define XK_PM1A_EVT         0x600
#define XK_PM1A_CNT         0x604
#define XK_PM_TMR           0x608
#define XK_SLP_EN           0x2000
#define XK_SLP_TYP_S5       5
#define XK_RESET_PORT       0xCF9
#define XK_RESET_VALUE      0x06
#define XK_I8042_CMD        0x64

/* MMIO */
#define XK_IOAPIC_BASE      0xFEC00000UL
#define XK_LAPIC_BASE       0xFEE00000UL

#endif /* XK_PLATFORM_H */
