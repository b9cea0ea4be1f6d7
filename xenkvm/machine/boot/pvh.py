"""Xen PVH direct boot: load an ELF kernel and build its ``hvm_start_info``.

The PVH boot ABI (xen/arch-x86/hvm/start_info.h): the kernel is entered in
32-bit protected mode, paging off, at its ``XEN_ELFNOTE_PHYS32_ENTRY`` address
with EBX holding the guest-physical address of a ``struct hvm_start_info``
(magic 0x336ec578).  Version 1 of that structure carries the command line,
a module list (the initrd is module 0), the ACPI RSDP and an e820-style memory
map.  All of it lives in the page at ``layout.PVH_START_INFO``; the command
line goes to ``layout.BOOT_CMDLINE``.  Layouts come from the Xen header via cffi.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi, lib
from xenkvm.machine.boot.common import (FOUR_GIB, align_up, boot_memmap, place_top,
                                        write_cmdline, write_guest)
from xenkvm.machine.boot.elf import ElfImage, load_elf
from xenkvm.machine.memory import PAGE_SIZE, E820Entry, GuestMemory

log = logging.getLogger(__name__)

START_INFO_MAGIC = lib.XEN_HVM_START_MAGIC_VALUE
START_INFO_VERSION = 1


@dataclass(frozen=True)
class PvhModule:
    """A module handed to the kernel (module 0 is the initrd)."""

    paddr: int
    size: int
    cmdline_paddr: int


@dataclass(frozen=True)
class PvhBoot:
    """Where the VMM starts a PVH guest: EIP = ``entry``, EBX = ``start_info_gpa``."""

    entry: int
    start_info_gpa: int
    cmdline_gpa: int
    modules: tuple[PvhModule, ...]
    memmap: tuple[E820Entry, ...]
    rsdp_gpa: int


@dataclass
class _PageLayout:
    """Offsets inside the start-info page of each array that follows the header."""

    modlist: int
    memmap: int
    strings: int


def _page_layout(n_modules: int, n_memmap: int) -> _PageLayout:
    modlist = align_up(ffi.sizeof("struct hvm_start_info"), 8)
    memmap = align_up(modlist + n_modules * ffi.sizeof("struct hvm_modlist_entry"), 8)
    strings = memmap + n_memmap * ffi.sizeof("struct hvm_memmap_table_entry")
    return _PageLayout(modlist, memmap, strings)


def _module_cmdline(text: str | bytes | None, room: int) -> bytes:
    """The module's NUL-terminated command line, or b'' for none."""
    if text is None:
        return b""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if b"\0" in raw:
        raise BootError("module command line contains a NUL byte")
    if len(raw) + 1 > room:
        raise BootError(f"module command line is {len(raw)} bytes; at most {room - 1} fit in the start-info page")
    return raw + b"\0"


def _memmap_array(entries: list[E820Entry]):
    arr = ffi.new("struct hvm_memmap_table_entry[]", len(entries))
    for dst, e in zip(arr, entries):
        dst.addr, dst.size, dst.type = e.addr, e.size, int(e.type)
    return arr


def build_start_info(mem: GuestMemory, *, entry: int, kernel_end: int, cmdline: str | bytes = "",
                     initrd: bytes | None = None, initrd_cmdline: str | bytes | None = None,
                     rsdp_gpa: int | None = None) -> PvhBoot:
    """Write the command line, initrd and ``hvm_start_info`` for a loaded kernel.

    ``kernel_end`` is the first physical address past the kernel: the initrd is
    placed page-aligned at the top of RAM below 4 GiB, but never below it.
    """
    base = layout.PVH_START_INFO
    cmdline_gpa = write_cmdline(mem, cmdline, layout.CMDLINE_MAX - 1)
    memmap = boot_memmap(mem)
    n_mod = 1 if initrd is not None else 0
    pl = _page_layout(n_mod, len(memmap))
    if pl.strings > PAGE_SIZE:
        raise BootError(f"start info with {len(memmap)} memory map entries does not fit in a page")
    write_guest(mem, base, bytes(PAGE_SIZE), "start info page")
    modules = ()
    if initrd is not None:
        mod_cmd = _module_cmdline(initrd_cmdline, PAGE_SIZE - pl.strings)
        addr = place_top(mem, len(initrd), align_up(kernel_end, PAGE_SIZE), FOUR_GIB, "initrd")
        write_guest(mem, addr, initrd, "initrd")
        if mod_cmd:
            write_guest(mem, base + pl.strings, mod_cmd, "module command line")
        modules = (PvhModule(addr, len(initrd), base + pl.strings if mod_cmd else 0),)
    _write_page(mem, base, pl, modules, memmap, cmdline_gpa, rsdp_gpa or 0)
    log.info("PVH start info at %#x: entry %#x, %d module(s), %d memmap entries",
             base, entry, len(modules), len(memmap))
    return PvhBoot(entry, base, cmdline_gpa, modules, tuple(memmap), rsdp_gpa or 0)


def _write_page(mem: GuestMemory, base: int, pl: _PageLayout, modules: tuple[PvhModule, ...],
                memmap: list[E820Entry], cmdline_gpa: int, rsdp_gpa: int) -> None:
    """Fill in and write hvm_start_info, the module list and the memory map."""
    si = ffi.new("struct hvm_start_info *")
    si.magic, si.version = START_INFO_MAGIC, START_INFO_VERSION
    si.nr_modules = len(modules)
    si.modlist_paddr = base + pl.modlist if modules else 0
    si.cmdline_paddr, si.rsdp_paddr = cmdline_gpa, rsdp_gpa
    si.memmap_paddr, si.memmap_entries = base + pl.memmap, len(memmap)
    write_guest(mem, base, ffi.buffer(si), "hvm_start_info")
    if modules:
        mods = ffi.new("struct hvm_modlist_entry[]", len(modules))
        for dst, m in zip(mods, modules):
            dst.paddr, dst.size, dst.cmdline_paddr = m.paddr, m.size, m.cmdline_paddr
        write_guest(mem, base + pl.modlist, ffi.buffer(mods), "module list")
    write_guest(mem, base + pl.memmap, ffi.buffer(_memmap_array(memmap)), "memory map")


def load_pvh(mem: GuestMemory, kernel: bytes | bytearray | memoryview, cmdline: str | bytes = "",
             initrd: bytes | None = None, initrd_cmdline: str | bytes | None = None,
             rsdp_gpa: int | None = None) -> tuple[ElfImage, PvhBoot]:
    """Load an ELF kernel with a PVH entry note and prepare its start info."""
    image = load_elf(mem, kernel)
    if image.pvh_entry is None:
        raise BootError("kernel has no XEN_ELFNOTE_PHYS32_ENTRY note: it cannot be booted as PVH")
    boot = build_start_info(mem, entry=image.pvh_entry, kernel_end=image.end_paddr, cmdline=cmdline,
                            initrd=initrd, initrd_cmdline=initrd_cmdline, rsdp_gpa=rsdp_gpa)
    return image, boot
