"""Helpers shared by the loaders: bounded struct reads, RAM checks, placement, memory map.

All of these take hostile numbers (from an image or a user) and turn anything
out of range into a :class:`~xenkvm.machine.boot.BootError`.
"""
from __future__ import annotations

from typing import Iterable

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi
from xenkvm.machine.memory import PAGE_SIZE, E820Entry, E820Type, GuestMemory, GuestMemoryError

#: Size of the boot page tables at ``layout.BOOT_PML4`` (0x10000..0x15fff per layout.py).
BOOT_PML4_SIZE = 0x6000
FOUR_GIB = 1 << 32


def boot_reserved() -> list[tuple[int, int, str]]:
    """Guest-physical ranges below 1 MiB that the VMM and loaders write at boot.

    A kernel segment or module placed over one of these would be clobbered (or
    would clobber the GDT, page tables, zero page, command line or ACPI tables),
    so loaders refuse such placements.
    """
    return [
        (0, PAGE_SIZE, "real-mode IVT/BDA and boot GDT"),
        (layout.PVH_START_INFO, layout.PVH_START_INFO + PAGE_SIZE, "PVH start info"),
        (layout.BOOT_PARAMS, layout.BOOT_PARAMS + PAGE_SIZE, "zero page"),
        (layout.BOOT_PML4, layout.BOOT_PML4 + BOOT_PML4_SIZE, "boot page tables"),
        (layout.BOOT_CMDLINE, layout.BOOT_CMDLINE + layout.CMDLINE_MAX, "command line"),
        (layout.ACPI_BASE, layout.ACPI_BASE + layout.ACPI_SIZE, "ACPI tables"),
    ]


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def read_struct(ctype: str, data: bytes | memoryview, offset: int, what: str):
    """Copy a ``ctype`` out of ``data`` at ``offset`` after checking it lies inside."""
    size = ffi.sizeof(ctype)
    if offset < 0 or offset + size > len(data):
        raise BootError(f"{what}: {size} bytes at offset {offset:#x} run past the end ({len(data):#x} bytes)")
    obj = ffi.new(ctype + " *")
    ffi.memmove(obj, memoryview(data)[offset:offset + size], size)
    return obj


def ram_entries(mem: GuestMemory) -> list[E820Entry]:
    """The RAM entries of the guest's e820 map."""
    return [e for e in mem.e820() if e.type == E820Type.RAM]


def check_loadable(mem: GuestMemory, addr: int, size: int, what: str) -> None:
    """Refuse ``[addr, addr+size)`` unless it is usable RAM clear of the boot areas."""
    if addr < 0 or size < 0:
        raise BootError(f"{what}: negative address or size")
    end = addr + size
    if not any(e.addr <= addr and end <= e.addr + e.size for e in ram_entries(mem)):
        raise BootError(f"{what}: {addr:#x}..{end:#x} is not inside one guest RAM range")
    for start, stop, name in boot_reserved():
        if addr < stop and start < end:
            raise BootError(f"{what}: {addr:#x}..{end:#x} overlaps the {name} at {start:#x}..{stop:#x}")


def place_top(mem: GuestMemory, size: int, floor: int, ceiling: int, what: str) -> int:
    """The highest page-aligned address for ``size`` bytes of RAM in ``[floor, ceiling)``.

    Used for initrds and modules: as high as possible (out of the kernel's way)
    but below ``ceiling`` (4 GiB, or the kernel's initrd_addr_max).
    """
    if size <= 0:
        raise BootError(f"{what}: empty")
    for e in sorted(ram_entries(mem), key=lambda e: e.addr, reverse=True):
        top = min(e.addr + e.size, ceiling)
        addr = align_down(top - size, PAGE_SIZE)
        if addr >= max(e.addr, floor, 0):
            check_loadable(mem, addr, size, what)
            return addr
    raise BootError(f"{what}: no room for {size:#x} bytes of RAM between {floor:#x} and {ceiling:#x}")


def write_guest(mem: GuestMemory, gpa: int, data: bytes | memoryview, what: str) -> None:
    """``mem.write`` with guest-memory errors reported as :class:`BootError`."""
    try:
        mem.write(gpa, data)
    except GuestMemoryError as exc:
        raise BootError(f"{what}: {exc}") from exc


def write_cmdline(mem: GuestMemory, cmdline: str | bytes, limit: int, what: str = "command line") -> int:
    """Write a NUL-terminated command line at ``layout.BOOT_CMDLINE``; return its GPA.

    ``limit`` is the longest string accepted, NUL excluded (also capped by the
    room ``layout.CMDLINE_MAX`` leaves for the NUL).
    """
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise BootError(f"{what} contains a NUL byte")
    limit = min(limit, layout.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise BootError(f"{what} is {len(raw)} bytes; at most {limit} fit")
    write_guest(mem, layout.BOOT_CMDLINE, raw + b"\0", what)
    return layout.BOOT_CMDLINE


def boot_memmap(mem: GuestMemory) -> list[E820Entry]:
    """The guest's e820 map with the ACPI table area marked reserved.

    ``mem.e820()`` already reserves the legacy hole that holds the tables; this
    adds (and carves out of RAM if necessary) the ACPI range in case it does not.
    """
    acpi = (layout.ACPI_BASE, layout.ACPI_BASE + layout.ACPI_SIZE)
    entries = list(mem.e820())
    covered = any(e.type != E820Type.RAM and e.addr <= acpi[0] and acpi[1] <= e.addr + e.size for e in entries)
    if covered:
        return sorted(entries, key=lambda e: e.addr)
    out = list(_carve(entries, *acpi))
    out.append(E820Entry(acpi[0], acpi[1] - acpi[0], E820Type.RESERVED))
    return sorted(out, key=lambda e: e.addr)


def _carve(entries: Iterable[E820Entry], start: int, stop: int) -> Iterable[E820Entry]:
    """``entries`` with ``[start, stop)`` cut out of each one."""
    for e in entries:
        end = e.addr + e.size
        if end <= start or stop <= e.addr:
            yield e
            continue
        if e.addr < start:
            yield E820Entry(e.addr, start - e.addr, e.type)
        if stop < end:
            yield E820Entry(stop, end - stop, e.type)
