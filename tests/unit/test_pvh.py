"""PVH start info: hvm_start_info, module list, memory map, command line, initrd placement."""
from __future__ import annotations

import struct

import pytest

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi
from xenkvm.machine.boot.common import boot_memmap
from xenkvm.machine.boot.pvh import load_pvh
from xenkvm.machine.memory import PAGE_SIZE, E820Entry, E820Type, GuestMemory

MiB = 1 << 20
#: struct hvm_start_info as the Xen header documents it (offsets 0..55).
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST = struct.Struct("<QQQQ")
MEMMAP = struct.Struct("<QQII")
CODE = b"\xf4" * 0x1000


@pytest.fixture
def kernel(build_elf):
    return build_elf([(MiB, CODE, 0x10000)], entry=MiB, notes=[(b"Xen", 18, (MiB + 4).to_bytes(4, "little"))])


def test_start_info_layout_matches_xen_header():
    assert ffi.sizeof("struct hvm_start_info") == START_INFO.size == 56
    assert ffi.offsetof("struct hvm_start_info", "modlist_paddr") == 16
    assert ffi.offsetof("struct hvm_start_info", "rsdp_paddr") == 32
    assert ffi.offsetof("struct hvm_start_info", "memmap_entries") == 48
    assert ffi.sizeof("struct hvm_modlist_entry") == MODLIST.size == 32
    assert ffi.sizeof("struct hvm_memmap_table_entry") == MEMMAP.size == 24


def _start_info(mem):
    return START_INFO.unpack(mem.read(layout.PVH_START_INFO, START_INFO.size))


def test_pvh_with_initrd_and_cmdline(mem, kernel):
    initrd = bytes(range(256)) * 100
    image, boot = load_pvh(mem, kernel, "console=hvc0 root=/dev/ram0", initrd,
                           initrd_cmdline="initrd-args", rsdp_gpa=layout.ACPI_BASE)
    assert boot.entry == image.pvh_entry == MiB + 4
    assert boot.start_info_gpa == layout.PVH_START_INFO
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, n_mm, reserved = _start_info(mem)
    assert (magic, version, flags, nr, reserved) == (0x336EC578, 1, 0, 1, 0)
    assert cmdline == layout.BOOT_CMDLINE and rsdp == layout.ACPI_BASE
    assert mem.read_cstr(cmdline, layout.CMDLINE_MAX) == b"console=hvc0 root=/dev/ram0"
    paddr, size, mod_cmd, res = MODLIST.unpack(mem.read(modlist, MODLIST.size))
    assert (size, res) == (len(initrd), 0)
    assert paddr % PAGE_SIZE == 0 and paddr >= image.end_paddr
    assert 64 * MiB - PAGE_SIZE < paddr + size <= 64 * MiB      # top of low RAM
    assert mem.read(paddr, size) == initrd
    assert mem.read_cstr(mod_cmd, 100) == b"initrd-args"
    got = [MEMMAP.unpack(mem.read(memmap + i * MEMMAP.size, MEMMAP.size)) for i in range(n_mm)]
    assert [(a, s, t) for a, s, t, _ in got] == [(e.addr, e.size, e.type) for e in mem.e820()]
    assert all(r == 0 for *_, r in got)
    assert layout.PVH_START_INFO <= memmap and memmap + n_mm * MEMMAP.size <= layout.PVH_START_INFO + PAGE_SIZE


def test_pvh_without_initrd(mem, kernel):
    mem.fill(layout.PVH_START_INFO, PAGE_SIZE, 0xFF)
    _, boot = load_pvh(mem, kernel)
    _, _, _, nr, modlist, cmdline, rsdp, *_ = _start_info(mem)
    assert (nr, modlist, rsdp) == (0, 0, 0) and boot.modules == ()
    assert mem.read_cstr(cmdline, 10) == b""


def test_initrd_stays_below_4gib_with_high_ram(kernel):
    mem = GuestMemory((4 << 30) + 64 * MiB)
    _, boot = load_pvh(mem, kernel, initrd=b"x" * 5000)
    mod = boot.modules[0]
    assert mod.paddr + mod.size <= 0xC000_0000 and mod.paddr % PAGE_SIZE == 0
    assert any(e.addr == 1 << 32 for e in boot.memmap)


def test_acpi_range_is_carved_out_of_ram_when_e820_does_not_cover_it(mem, monkeypatch):
    monkeypatch.setattr(mem, "e820", lambda: [E820Entry(0, 64 * MiB, E820Type.RAM)])
    entries = boot_memmap(mem)
    acpi = E820Entry(layout.ACPI_BASE, layout.ACPI_SIZE, E820Type.RESERVED)
    assert entries == [E820Entry(0, layout.ACPI_BASE, E820Type.RAM), acpi,
                       E820Entry(layout.ACPI_BASE + layout.ACPI_SIZE,
                                 64 * MiB - layout.ACPI_BASE - layout.ACPI_SIZE, E820Type.RAM)]


def test_cmdline_too_long_or_with_nul(mem, kernel):
    with pytest.raises(BootError, match="command line"):
        load_pvh(mem, kernel, "x" * layout.CMDLINE_MAX)
    with pytest.raises(BootError, match="NUL"):
        load_pvh(mem, kernel, "a\0b")
    load_pvh(mem, kernel, "x" * (layout.CMDLINE_MAX - 1))


def test_module_cmdline_must_fit_in_the_page(mem, kernel):
    with pytest.raises(BootError, match="module command line"):
        load_pvh(mem, kernel, initrd=b"x", initrd_cmdline="y" * PAGE_SIZE)


def test_kernel_without_pvh_note_refused(mem, build_elf):
    with pytest.raises(BootError, match="PHYS32"):
        load_pvh(mem, build_elf([(MiB, CODE, len(CODE))], entry=MiB))


def test_initrd_too_big_for_ram_above_the_kernel(mem, kernel):
    with pytest.raises(BootError, match="initrd"):
        load_pvh(mem, kernel, initrd=b"\0" * (63 * MiB))
    with pytest.raises(BootError, match="initrd"):
        load_pvh(mem, kernel, initrd=b"")
