"""Linux bzImage loading by the x86 boot protocol, entered at the 64-bit entry point.

Facts used (Documentation/arch/x86/boot.rst): the image starts with the
real-mode setup code, ``setup_sects`` 512-byte sectors after the boot sector
(0 means 4); the setup header sits at offset 0x1f1 and ends at 0x202 plus the
byte at 0x201 (the operand of the short jump at 0x200); "HdrS" and the boot
flag 0xAA55 identify it.  The protected-mode kernel follows the setup code and
is loaded at ``pref_address`` (relocatable kernels) or 1 MiB; a 64-bit boot
loader enters it at load address + 0x200 in long mode with RSI pointing to the
zero page (``struct boot_params``), whose ``hdr`` is a copy of the image's
header with the loader's fields filled in.  64-bit entry needs protocol 2.12
(``xloadflags``); ``acpi_rsdp_addr`` needs 2.14.

Layouts come from ``<asm/bootparam.h>`` through cffi.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi, lib
from xenkvm.machine.boot.common import (FOUR_GIB, align_up, boot_memmap, check_loadable,
                                        place_top, write_cmdline, write_guest)
from xenkvm.machine.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger(__name__)

SECTOR = 512
HDR_OFFSET = ffi.offsetof("struct boot_params", "hdr")     # 0x1f1
HDR_MAX = ffi.sizeof("struct setup_header")
JUMP_OFFSET = 0x200                #: the short jump (0xEB disp8) that ends the header
SHORT_JMP = 0xEB
HDRS_MAGIC = int.from_bytes(b"HdrS", "little")
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C              #: xloadflags / XLF_KERNEL_64
RSDP_PROTOCOL = 0x020E             #: boot_params.acpi_rsdp_addr
ENTRY64_OFFSET = 0x200
LOADER_UNDEFINED = 0xFF            #: type_of_loader for a loader without an assigned id
HEAP_END_PTR = 0xFE00              #: setup heap to the end of the 64 KiB setup segment
VID_MODE_NORMAL = 0xFFFF


@dataclass(frozen=True)
class SetupHeader:
    """The validated setup header of a bzImage (``setup_sects`` already 0 -> 4)."""

    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    pref_address: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    header_end: int
    raw: bytes

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR


@dataclass(frozen=True)
class BzImageBoot:
    """Where the VMM starts the kernel: RIP = ``entry64`` in long mode, RSI = ``boot_params_gpa``."""

    entry64: int
    boot_params_gpa: int
    kernel_addr: int
    kernel_size: int
    init_size: int
    initrd_addr: int
    initrd_size: int
    cmdline_gpa: int
    protocol: int


def _raw_header(image: bytes | memoryview) -> bytes:
    """The header bytes as the image has them: 0x1f1 up to the end the jump marks."""
    if len(image) < JUMP_OFFSET + 2:
        raise BootError(f"bzImage of {len(image)} bytes is too short for a setup header")
    if image[JUMP_OFFSET] != SHORT_JMP:
        raise BootError("bzImage: no short jump at 0x200 (not a Linux boot image)")
    end = JUMP_OFFSET + 2 + image[JUMP_OFFSET + 1]
    return bytes(image[HDR_OFFSET:min(end, HDR_OFFSET + HDR_MAX)])


def _check_header(h) -> None:
    """Reject images this loader cannot enter at the 64-bit entry point."""
    if h.boot_flag != BOOT_FLAG or h.header != HDRS_MAGIC:
        raise BootError("bzImage: missing HdrS magic or 0xAA55 boot flag")
    if h.version < MIN_PROTOCOL:
        raise BootError(f"bzImage: boot protocol {h.version >> 8}.{h.version & 0xff:02d} is older than 2.12")
    if not h.xloadflags & lib.XLF_KERNEL_64:
        raise BootError("bzImage: kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if h.relocatable_kernel:
        align = h.kernel_alignment
        if align == 0 or align & (align - 1) or h.pref_address % align:
            raise BootError(f"bzImage: pref_address {h.pref_address:#x} / kernel_alignment {align:#x} inconsistent")


def _check_sizes(hdr: SetupHeader, image_len: int) -> None:
    pm_size = image_len - hdr.setup_size
    if pm_size <= 0:
        raise BootError(f"bzImage: {hdr.setup_sects} setup sectors but only {image_len} bytes")
    if hdr.syssize == 0 or hdr.syssize * 16 > pm_size + 15:
        raise BootError(f"bzImage: syssize {hdr.syssize:#x} paragraphs disagrees with {pm_size:#x} bytes present")
    if hdr.payload_offset + hdr.payload_length > pm_size:
        raise BootError(f"bzImage: payload {hdr.payload_offset:#x}+{hdr.payload_length:#x} "
                        f"runs past the kernel ({pm_size:#x} bytes)")


def parse_setup_header(image: bytes | bytearray | memoryview) -> SetupHeader:
    """Validate a bzImage's setup header and return its fields."""
    raw = _raw_header(image)
    h = ffi.new("struct setup_header *")
    ffi.memmove(h, raw, len(raw))
    _check_header(h)
    hdr = SetupHeader(
        version=h.version, setup_sects=h.setup_sects or 4, syssize=h.syssize,
        loadflags=h.loadflags, xloadflags=h.xloadflags, relocatable=bool(h.relocatable_kernel),
        kernel_alignment=h.kernel_alignment, pref_address=h.pref_address, init_size=h.init_size,
        initrd_addr_max=h.initrd_addr_max, cmdline_size=h.cmdline_size,
        payload_offset=h.payload_offset, payload_length=h.payload_length,
        header_end=HDR_OFFSET + len(raw), raw=raw,
    )
    _check_sizes(hdr, len(image))
    return hdr


def protected_mode_kernel(image: bytes | bytearray | memoryview, hdr: SetupHeader) -> memoryview:
    """The part of the image after the setup code (what goes at the load address)."""
    return memoryview(image)[hdr.setup_size:]


def _kernel_placement(mem: GuestMemory, hdr: SetupHeader, pm_size: int) -> tuple[int, int]:
    """(load address, bytes reserved there): pref_address or 1 MiB, init_size long."""
    addr = hdr.pref_address if hdr.relocatable else layout.KERNEL_LOAD
    span = align_up(max(hdr.init_size, pm_size), PAGE_SIZE)
    if addr + span > FOUR_GIB:
        raise BootError(f"bzImage: kernel at {addr:#x}+{span:#x} would not be below 4 GiB")
    check_loadable(mem, addr, span, "bzImage kernel (load address + init_size)")
    return addr, span


def _place_initrd(mem: GuestMemory, hdr: SetupHeader, initrd: bytes | None, kernel_top: int) -> tuple[int, int]:
    """Write the initrd as high as initrd_addr_max and low RAM allow, above the kernel."""
    if initrd is None:
        return 0, 0
    ceiling = min(hdr.initrd_addr_max + 1, FOUR_GIB)
    addr = place_top(mem, len(initrd), kernel_top, ceiling, "initrd")
    write_guest(mem, addr, initrd, "initrd")
    return addr, len(initrd)


def _zero_page(mem: GuestMemory, hdr: SetupHeader, kernel_addr: int, cmdline_gpa: int,
               initrd: tuple[int, int], rsdp_gpa: int | None):
    """A clean boot_params holding the image's header plus the loader's fields."""
    bp = ffi.new("struct boot_params *")
    ffi.buffer(bp)[HDR_OFFSET:HDR_OFFSET + len(hdr.raw)] = hdr.raw
    h = bp.hdr
    h.type_of_loader = LOADER_UNDEFINED
    h.loadflags = hdr.loadflags | lib.LOADED_HIGH | lib.CAN_USE_HEAP
    h.heap_end_ptr = HEAP_END_PTR
    h.vid_mode = VID_MODE_NORMAL
    h.code32_start = kernel_addr
    h.cmd_line_ptr, bp.ext_cmd_line_ptr = cmdline_gpa & 0xFFFFFFFF, cmdline_gpa >> 32
    h.ramdisk_image, bp.ext_ramdisk_image = initrd[0] & 0xFFFFFFFF, initrd[0] >> 32
    h.ramdisk_size, bp.ext_ramdisk_size = initrd[1] & 0xFFFFFFFF, initrd[1] >> 32
    _fill_e820(bp, mem)
    if rsdp_gpa and hdr.version >= RSDP_PROTOCOL:
        bp.acpi_rsdp_addr = rsdp_gpa
    return bp


def _fill_e820(bp, mem: GuestMemory) -> None:
    entries = boot_memmap(mem)
    if len(entries) > lib.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(entries)} e820 entries do not fit in the zero page")
    bp.e820_entries = len(entries)
    for dst, e in zip(bp.e820_table, entries):
        dst.addr, dst.size, dst.type = e.addr, e.size, int(e.type)


def load_bzimage(mem: GuestMemory, image: bytes | bytearray | memoryview, cmdline: str | bytes = "",
                 initrd: bytes | None = None, rsdp_gpa: int | None = None) -> BzImageBoot:
    """Load a bzImage, its command line and initrd, and write the zero page.

    The VMM then enters ``entry64`` in long mode (identity-mapped) with RSI =
    ``boot_params_gpa``, as the 64-bit boot protocol asks.
    """
    hdr = parse_setup_header(image)
    pm = protected_mode_kernel(image, hdr)
    kernel_addr, span = _kernel_placement(mem, hdr, len(pm))
    cmdline_gpa = write_cmdline(mem, cmdline, hdr.cmdline_size)
    write_guest(mem, kernel_addr, pm, "bzImage kernel")
    rd = _place_initrd(mem, hdr, initrd, kernel_addr + span)
    bp = _zero_page(mem, hdr, kernel_addr, cmdline_gpa, rd, rsdp_gpa)
    write_guest(mem, layout.BOOT_PARAMS, ffi.buffer(bp), "zero page")
    log.info("bzImage protocol %#x: kernel %#x+%#x, initrd %#x+%#x", hdr.version,
             kernel_addr, len(pm), rd[0], rd[1])
    return BzImageBoot(entry64=kernel_addr + ENTRY64_OFFSET, boot_params_gpa=layout.BOOT_PARAMS,
                       kernel_addr=kernel_addr, kernel_size=len(pm), init_size=span,
                       initrd_addr=rd[0], initrd_size=rd[1], cmdline_gpa=cmdline_gpa,
                       protocol=hdr.version)
