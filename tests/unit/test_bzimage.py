"""Linux boot protocol: setup header validation, zero page contents, placement, hostile images."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootimages import BZ
from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi
from xenkvm.machine.boot.bzimage import load_bzimage, parse_setup_header
from xenkvm.machine.loader import map_file, unmap
from xenkvm.machine.memory import PAGE_SIZE

MiB = 1 << 20
ZP = layout.BOOT_PARAMS
E820 = struct.Struct("<QQI")


# ---- layouts against Documentation/arch/x86/boot.rst and zero-page.rst --------
@pytest.mark.parametrize("field, offset", [
    ("acpi_rsdp_addr", 0x070), ("ext_ramdisk_image", 0x0C0), ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8), ("e820_entries", 0x1E8), ("sentinel", 0x1EF),
    ("hdr", 0x1F1), ("e820_table", 0x2D0),
])
def test_boot_params_offsets(field, offset):
    assert ffi.offsetof("struct boot_params", field) == offset


@pytest.mark.parametrize("field", sorted(BZ))
def test_setup_header_offsets(field):
    assert 0x1F1 + ffi.offsetof("struct setup_header", field) == BZ[field][0]


def test_sizes():
    assert ffi.sizeof("struct boot_params") == 4096
    assert ffi.sizeof("struct boot_e820_entry") == E820.size == 20
    assert ffi.offsetof("struct boot_params", "hdr") + ffi.offsetof("struct setup_header", "cmd_line_ptr") == 0x228
    assert ffi.offsetof("struct boot_params", "hdr") + ffi.offsetof("struct setup_header", "ramdisk_image") == 0x218


# ---- loading -------------------------------------------------------------------
def _zp(mem, name: str) -> int:
    off, fmt = BZ[name]
    return struct.unpack("<" + fmt, mem.read(ZP + off, struct.calcsize("<" + fmt)))[0]


def test_load_relocatable_kernel(mem, build_bzimage):
    image = build_bzimage(b"PAYLOAD!" * 8)
    initrd = b"initrd" * 1000
    boot = load_bzimage(mem, image, "console=ttyS0", initrd, rsdp_gpa=layout.ACPI_BASE)
    pm = image[5 * 512:]
    assert boot.kernel_addr == 16 * MiB and boot.entry64 == 16 * MiB + 0x200
    assert boot.boot_params_gpa == ZP and boot.protocol == 0x020F
    assert mem.read(16 * MiB, len(pm)) == pm
    # loader fields
    assert _zp(mem, "type_of_loader") == 0xFF
    assert _zp(mem, "loadflags") & 0x81 == 0x81                 # LOADED_HIGH | CAN_USE_HEAP
    assert _zp(mem, "heap_end_ptr") == 0xFE00
    assert _zp(mem, "cmd_line_ptr") == layout.BOOT_CMDLINE
    assert mem.read_cstr(layout.BOOT_CMDLINE, 100) == b"console=ttyS0"
    rd, rd_size = _zp(mem, "ramdisk_image"), _zp(mem, "ramdisk_size")
    assert (rd, rd_size) == (boot.initrd_addr, len(initrd))
    assert rd % PAGE_SIZE == 0 and rd >= 16 * MiB + 0x40_0000 and 64 * MiB - PAGE_SIZE < rd + rd_size <= 64 * MiB
    assert mem.read(rd, rd_size) == initrd
    assert mem.read_u32(ZP + 0xC0) == 0 and mem.read_u32(ZP + 0xC4) == 0
    assert mem.read_u64(ZP + 0x70) == layout.ACPI_BASE
    # header copied from the image; sentinel and the rest of the page clean
    for name in ("setup_sects", "syssize", "version", "pref_address", "init_size", "payload_length"):
        assert _zp(mem, name) == struct.unpack_from("<" + BZ[name][1], image, BZ[name][0])[0]
    assert mem.read(ZP, 0x70) == bytes(0x70) and mem.read(ZP + 0x1EF, 1) == b"\0"


def test_load_from_mapped_files(mem, build_bzimage, tmp_path):
    """The loader maps the kernel and initrd files (loader.map_file) instead of reading
    them: loading from the mappings puts the same bytes in the guest as from bytes."""
    image, initrd = build_bzimage(b"PAYLOAD!" * 8), bytes(range(256)) * 40
    (tmp_path / "k").write_bytes(image)
    (tmp_path / "rd").write_bytes(initrd)
    k, rd = map_file(tmp_path / "k"), map_file(tmp_path / "rd")
    boot = load_bzimage(mem, k, "console=ttyS0", rd)
    unmap(k)
    unmap(rd)
    assert k.closed and rd.closed
    assert mem.read(boot.kernel_addr, len(image) - 5 * 512) == image[5 * 512:]
    assert mem.read(boot.initrd_addr, boot.initrd_size) == initrd


def test_map_file_reads_what_cannot_be_mapped(tmp_path):
    """An empty file cannot be mapped, a character device is not a file: both are read."""
    (tmp_path / "empty").write_bytes(b"")
    assert map_file(tmp_path / "empty") == b""
    assert map_file(Path("/dev/null")) == b""
    (tmp_path / "x").write_bytes(b"abc")
    k = map_file(tmp_path / "x")
    view = memoryview(k)
    unmap(k)        # a live view: stays mapped until the view goes, no error
    assert bytes(view) == b"abc"
    view.release()


def test_zero_page_e820(mem, build_bzimage):
    load_bzimage(mem, build_bzimage(b"x"))
    n = mem.read(ZP + 0x1E8, 1)[0]
    got = [E820.unpack(mem.read(ZP + 0x2D0 + i * 20, 20)) for i in range(n)]
    assert got == [(e.addr, e.size, int(e.type)) for e in mem.e820()]
    assert any(a <= layout.ACPI_BASE and layout.ACPI_BASE + layout.ACPI_SIZE <= a + s and t == 2
               for a, s, t in got)


def test_non_relocatable_loads_at_1mib(mem, build_bzimage):
    boot = load_bzimage(mem, build_bzimage(b"x", relocatable=0))
    assert boot.kernel_addr == layout.KERNEL_LOAD and boot.entry64 == layout.KERNEL_LOAD + 0x200
    assert boot.initrd_addr == 0 and _zp(mem, "ramdisk_image") == 0


def test_setup_sects_zero_means_four(build_bzimage):
    assert parse_setup_header(build_bzimage(b"x", setup_sects=0)).setup_size == 5 * 512


def test_protocol_2_12_gets_no_rsdp_field(mem, build_bzimage):
    load_bzimage(mem, build_bzimage(b"x", version=0x020C), rsdp_gpa=layout.ACPI_BASE)
    assert mem.read_u64(ZP + 0x70) == 0


def test_initrd_respects_initrd_addr_max(mem, build_bzimage):
    boot = load_bzimage(mem, build_bzimage(b"x", initrd_addr_max=32 * MiB - 1), initrd=b"r" * 10000)
    assert boot.initrd_addr + boot.initrd_size <= 32 * MiB
    with pytest.raises(BootError, match="initrd"):
        load_bzimage(mem, build_bzimage(b"x", initrd_addr_max=18 * MiB), initrd=b"r" * 10000)


# ---- hostile images --------------------------------------------------------------
def _patched(image: bytes, name: str, value) -> bytes:
    buf = bytearray(image)
    off, fmt = BZ[name]
    struct.pack_into("<" + fmt, buf, off, value)
    return bytes(buf)


@pytest.mark.parametrize("field, value, match", [
    ("header", b"HdrX", "HdrS"),
    ("boot_flag", 0x1234, "HdrS"),
    ("jump", 0x90, "jump"),
    ("version", 0x020B, "2.12"),
    ("xloadflags", 0, "64-bit"),
    ("payload_length", 0xFFFF_FFFF, "payload"),
    ("payload_offset", 0xFFFF_FF00, "payload"),
    ("syssize", 0x100_0000, "syssize"),
    ("syssize", 0, "syssize"),
    ("setup_sects", 200, "setup sectors"),
    ("pref_address", 16 * MiB + 0x1000, "kernel_alignment"),
    ("kernel_alignment", 3 << 20, "kernel_alignment"),
])
def test_bad_header_rejected(build_bzimage, field, value, match):
    with pytest.raises(BootError, match=match):
        parse_setup_header(_patched(build_bzimage(b"payload"), field, value))


def test_truncated_image(build_bzimage):
    image = build_bzimage(b"payload")
    for cut in (0, 0x100, 0x201, 5 * 512):
        with pytest.raises(BootError):
            parse_setup_header(image[:cut])


def test_kernel_outside_ram_or_too_big(mem, build_bzimage):
    with pytest.raises(BootError, match="RAM"):
        load_bzimage(mem, build_bzimage(b"x", pref_address=1 << 30))
    with pytest.raises(BootError, match="RAM"):
        load_bzimage(mem, build_bzimage(b"x", init_size=0xF000_0000))
    with pytest.raises(BootError, match="4 GiB"):
        load_bzimage(mem, build_bzimage(b"x", pref_address=1 << 33))


def test_cmdline_longer_than_cmdline_size(mem, build_bzimage):
    image = build_bzimage(b"x", cmdline_size=15)
    load_bzimage(mem, image, "a" * 15)
    with pytest.raises(BootError, match="command line"):
        load_bzimage(mem, image, "a" * 16)
    with pytest.raises(BootError, match="command line"):
        load_bzimage(mem, build_bzimage(b"x", cmdline_size=0xFFFF_FFFF), "a" * layout.CMDLINE_MAX)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_header_never_escapes_booterror(mem, build_bzimage, data):
    buf = bytearray(build_bzimage(b"payload", initrd_addr_max=0xFFFF_FFFF))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0x1F1, 0x26B))
        buf[i] = data.draw(st.integers(0, 255))
    try:
        load_bzimage(mem, bytes(buf), "x", b"initrd")
    except BootError:
        pass
