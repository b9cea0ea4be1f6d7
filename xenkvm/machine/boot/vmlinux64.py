"""A bzImage's extracted vmlinux booted through the 64-bit boot protocol, no decompressor.

Why: a Xen HVM guest's hypercall instructions (``xen_hypercall_intel``/``_amd``)
are rewritten in guest memory before the first instruction (the ``patch``
trap, xen/traps.py).  A bzImage decompresses itself over its load address, so
bytes patched in the vmlinux it will produce would be overwritten; loading
that vmlinux ourselves puts the final code in place first.  It also skips the
decompressor (~32 s of emulated ring 0 on PVM hosts).

Facts used (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"; Linux's
``arch/x86/kernel/head_64.S``): ``startup_64`` is entered in long mode with
paging on, the kernel, zero page and command line identity mapped, a GDT with
flat 64-bit code and data descriptors, interrupts off, and RSI = the zero
page.  It is the same entry the decompressor jumps to once it has written the
vmlinux; ``e_entry`` of a Linux vmlinux is ``phys_startup_64``, a physical
address.  Each PT_LOAD goes to its ``p_paddr`` (LOAD_PHYSICAL_ADDR for the
text), so a relocatable kernel finds no physical offset to apply, and the
decompressor's KASLR is not run at all.  The zero page is filled as for the
bzImage itself (its setup header, command line, initrd, e820, RSDP).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot.bzimage import _place_initrd, _zero_page, parse_setup_header
from xenkvm.machine.boot.common import write_cmdline, write_guest
from xenkvm.machine.boot.elf import ElfClass, load_elf
from xenkvm.machine.boot._abi_cffi import ffi
from xenkvm.machine.memory import GuestMemory

log = logging.getLogger(__name__)

EM_X86_64 = 62


@dataclass(frozen=True)
class Vmlinux64Boot:
    """Where the VMM starts the kernel: RIP = ``entry64`` in long mode, RSI = ``boot_params_gpa``."""

    entry64: int
    boot_params_gpa: int
    kernel_addr: int
    kernel_end: int
    initrd_addr: int
    initrd_size: int


def load_vmlinux64(mem: GuestMemory, bzimage: bytes | bytearray | memoryview, vmlinux: bytes,
                   cmdline: str | bytes = "", initrd: bytes | None = None,
                   rsdp_gpa: int | None = None) -> Vmlinux64Boot:
    """Load ``vmlinux`` (extracted from ``bzimage``) at its physical addresses and write the
    zero page from ``bzimage``'s setup header; the VMM then enters ``entry64`` in long mode."""
    hdr = parse_setup_header(bzimage)
    image = load_elf(mem, vmlinux)
    if image.elf_class is not ElfClass.ELF64 or image.machine != EM_X86_64:
        raise BootError("vmlinux: not an x86-64 ELF, it has no 64-bit entry")
    entry = image.entry_paddr
    if entry is None:
        raise BootError(f"vmlinux: entry {image.entry:#x} is in no loaded segment")
    cmdline_gpa = write_cmdline(mem, cmdline, hdr.cmdline_size)
    rd = _place_initrd(mem, hdr, initrd, image.end_paddr)
    bp = _zero_page(mem, hdr, image.lowest_paddr, cmdline_gpa, rd, rsdp_gpa)
    write_guest(mem, layout.BOOT_PARAMS, ffi.buffer(bp), "zero page")
    log.info("vmlinux via the 64-bit boot protocol: %#x..%#x entry %#x, initrd %#x+%#x",
             image.lowest_paddr, image.end_paddr, entry, rd[0], rd[1])
    return Vmlinux64Boot(entry64=entry, boot_params_gpa=layout.BOOT_PARAMS, kernel_addr=image.lowest_paddr,
                         kernel_end=image.end_paddr, initrd_addr=rd[0], initrd_size=rd[1])
