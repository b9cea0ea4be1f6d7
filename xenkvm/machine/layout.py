"""Where things are in the guest's physical address space and I/O port space.

One table, shared by the VMM, the boot loaders, the ACPI builder and the
freestanding test guests (``firmware/include/platform.h`` mirrors it; a test
checks that the two agree).
"""
from __future__ import annotations

# --- guest-physical addresses used while booting (all below 1 MiB) ------------
BOOT_GDT = 0x0500            #: GDT the VMM loads before a 32/64-bit entry
BOOT_PARAMS = 0x7000         #: Linux zero page (bzImage) / hvm_start_info (PVH)
PVH_START_INFO = 0x6000      #: hvm_start_info, module list and memmap (one page)
#: 0x8000..0xffff is left to guests (the test toolkit's AP trampoline lives there)
BOOT_PML4 = 0x1_0000         #: identity page tables for a 64-bit entry (0x10000..0x15fff)
BOOT_CMDLINE = 0x2_0000      #: kernel command line (up to CMDLINE_MAX bytes)
CMDLINE_MAX = 0x1_0000
ACPI_BASE = 0xE_0000         #: RSDP and the tables after it (in the reserved legacy hole)
ACPI_SIZE = 0x1_0000
KERNEL_LOAD = 0x10_0000      #: where a bzImage's protected-mode part goes (1 MiB)

# --- I/O ports -----------------------------------------------------------------
COM1 = 0x3F8                 #: 16550 UART
DEBUG_PORT = 0xE9            #: byte written = byte on the console (Bochs/QEMU convention)
PM_BASE = 0x600              #: ACPI PM1a event block (4 bytes), as QEMU's q35 (ICH9)
PM1A_EVT = PM_BASE
PM1A_CNT = PM_BASE + 4       #: write SLP_TYP<<10 | SLP_EN to sleep; SLP_TYP 5 = S5 (off)
PM_TMR = PM_BASE + 8         #: ACPI PM timer (3.579545 MHz, 24-bit)
SLP_EN = 1 << 13
SLP_TYP_S5 = 5
RESET_PORT = 0xCF9           #: write 0x06 (or 0x0e) to reset; also the FADT reset register
RESET_VALUE = 0x06
I8042_CMD = 0x64             #: write 0xfe to pulse the reset line
HYPERCALL_PORT = 0xEA        #: hypercall-page stubs: `mov eax, nr; out HYPERCALL_PORT, eax; ret`
SEND_PORT = 0xEB             #: the send stub's `out` of an EVTCHNOP_send's port number (xen/sendstub.py)
XEN_TESTDEV_PORT = 0xEC      #: the test backend (xen.test_device: true), 32-bit writes only
SNAPSHOT_PORT = 0xEE         #: `run --snapshot-on-port FILE`: any write takes a snapshot there (tests)

# --- MMIO ----------------------------------------------------------------------
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
