"""ELF parsing and loading: PT_LOAD at p_paddr, bss, Xen notes, and hostile files."""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot._abi_cffi import ffi
from xenkvm.machine.boot.elf import ElfClass, XenElfNote, load_elf, parse_elf

MiB = 1 << 20
PHYS32 = 18
CODE = bytes(range(256)) * 4


def pvh_note(entry: int, size: int = 4):
    return (b"Xen", PHYS32, entry.to_bytes(size, "little"))


def test_cffi_elf_layouts_match_the_elf_spec():
    assert ffi.sizeof("Elf64_Ehdr") == 64 and ffi.sizeof("Elf32_Ehdr") == 52
    assert ffi.sizeof("Elf64_Phdr") == 56 and ffi.sizeof("Elf32_Phdr") == 32
    assert ffi.offsetof("Elf64_Phdr", "p_paddr") == 24 and ffi.offsetof("Elf32_Phdr", "p_paddr") == 12
    assert ffi.offsetof("Elf64_Ehdr", "e_phoff") == 32 and ffi.offsetof("Elf32_Ehdr", "e_phoff") == 28
    assert XenElfNote.PHYS32_ENTRY == PHYS32


def test_load_elf64_with_pvh_note_and_bss(mem, build_elf):
    mem.fill(MiB, 2 * MiB, 0xAA)
    data = build_elf([(MiB, CODE, len(CODE) + 0x3000)], entry=MiB + 0x10, notes=[pvh_note(MiB + 4)])
    img = load_elf(mem, data)
    assert img.elf_class == ElfClass.ELF64
    assert img.pvh_entry == MiB + 4 and img.entry == MiB + 0x10 and img.entry_paddr == MiB + 0x10
    assert (img.lowest_paddr, img.end_paddr) == (MiB, MiB + len(CODE) + 0x3000)
    assert mem.read(MiB, len(CODE)) == CODE
    assert mem.read(MiB + len(CODE), 0x3000) == bytes(0x3000)
    assert mem.read(MiB + len(CODE) + 0x3000, 16) == b"\xaa" * 16
    assert img.xen_notes[XenElfNote.PHYS32_ENTRY] == MiB + 4


def test_pvh_note_with_64_bit_value(build_elf):
    img = parse_elf(build_elf([(MiB, CODE, len(CODE))], entry=MiB, notes=[pvh_note(MiB + 8, 8)]))
    assert img.pvh_entry == MiB + 8


def test_elf32_image(mem, build_elf):
    data = build_elf([(2 * MiB, CODE, len(CODE))], entry=2 * MiB, cls=32, notes=[pvh_note(2 * MiB)])
    img = load_elf(mem, data)
    assert img.elf_class == ElfClass.ELF32 and img.pvh_entry == 2 * MiB
    assert mem.read(2 * MiB, len(CODE)) == CODE


def test_vmlinux_style_virtual_entry_is_translated(mem, build_elf):
    base = 0xFFFF_FFFF_8000_0000
    data = build_elf([(16 * MiB, CODE, len(CODE)), (17 * MiB, b"data", 0x2000)], entry=base + 16 * MiB + 0x40,
                     vaddr_offset=base, notes=[pvh_note(16 * MiB + 0x80), (b"Xen", 6, b"linux\0"),
                                               (b"GNU", 3, b"\x01\x02\x03\x04")])
    img = load_elf(mem, data)
    assert img.entry_paddr == 16 * MiB + 0x40
    assert img.xen_notes[XenElfNote.GUEST_OS] == "linux"
    assert [n.name for n in img.notes] == ["Xen", "Xen", "GNU"]
    assert mem.read(17 * MiB, 4) == b"data"
    assert img.end_paddr == 17 * MiB + 0x2000


def test_no_pvh_note_gives_none(build_elf):
    assert parse_elf(build_elf([(MiB, CODE, len(CODE))], entry=MiB)).pvh_entry is None


def test_below_1mib_allowed_only_clear_of_boot_areas(mem, build_elf):
    load_elf(mem, build_elf([(0x30000, CODE, len(CODE))], entry=0x30000))
    for where in (layout.BOOT_PARAMS, layout.PVH_START_INFO, layout.BOOT_PML4 + 0x1000,
                  layout.BOOT_CMDLINE, 0x100, layout.ACPI_BASE, 0x9FA00):
        with pytest.raises(BootError):
            load_elf(mem, build_elf([(where, CODE, len(CODE))], entry=where))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_gcc_built_pvh_kernel(tmp_path, mem):
    """A real toolchain's output: .note.Xen in a PT_NOTE, PHYS32 entry = a symbol."""
    src = tmp_path / "k.S"
    src.write_text(
        ".code32\n.section .text\n.globl _start\n_start: nop\npvh_entry: hlt\njmp pvh_entry\n"
        ".section .note.Xen,\"a\",@note\n.p2align 2\n.long 4\n.long 4\n.long 18\n"
        ".asciz \"Xen\"\n.long pvh_entry\n"
        ".bss\n.space 8192\n")
    out = tmp_path / "k.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                    "-Wl,-Ttext-segment=0x100000", "-o", str(out), str(src)], check=True)
    syms = subprocess.run(["nm", str(out)], check=True, capture_output=True, text=True).stdout
    addr = next(int(line.split()[0], 16) for line in syms.splitlines() if line.endswith(" pvh_entry"))
    img = load_elf(mem, out.read_bytes())
    assert img.pvh_entry == addr and img.lowest_paddr >= MiB
    assert mem.read(addr, 1) == b"\xf4"


# ---- hostile files -----------------------------------------------------------

def _valid(build_elf) -> bytes:
    return build_elf([(MiB, CODE, len(CODE) + 0x100)], entry=MiB, notes=[pvh_note(MiB)])


def _patch(data: bytes, off: int, fmt: str, *values) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, off, *values)
    return bytes(buf)


PH0 = 64          # first program header (the PT_NOTE), second at 64 + 56
PH1 = 64 + 56


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d[:30], "truncated header"),
    (lambda d: d[:64 + 60], "truncated phdr table"),
    (lambda d: b"\x7fELG" + d[4:], "bad magic"),
    (lambda d: _patch(d, 4, "B", 3), "bad class"),
    (lambda d: _patch(d, 5, "B", 2), "big endian"),
    (lambda d: _patch(d, 18, "<H", 40), "ARM machine"),
    (lambda d: _patch(d, 16, "<H", 1), "relocatable object"),
    (lambda d: _patch(d, 32, "<Q", 1 << 40), "phoff past EOF"),
    (lambda d: _patch(d, 54, "<H", 40), "wrong phentsize"),
    (lambda d: _patch(d, 56, "<H", 0), "no program headers"),
    (lambda d: _patch(d, PH1 + 8, "<Q", 1 << 40), "segment offset past EOF"),
    (lambda d: _patch(d, PH1 + 32, "<Q", 1 << 30), "segment filesz past EOF"),
    (lambda d: _patch(d, PH1 + 32, "<QQ", 0x500, 0x400), "filesz > memsz"),
    (lambda d: _patch(d, PH1 + 24, "<Q", (1 << 64) - 0x100), "paddr wraps"),
    (lambda d: _patch(d, PH1, "<I", 6), "no PT_LOAD"),
    (lambda d: _patch(d, PH0 + 32, "<Q", 1 << 20), "note segment past EOF"),
])
def test_hostile_elf_rejected(build_elf, mutate, why):
    with pytest.raises(BootError):
        parse_elf(mutate(_valid(build_elf)))


def test_note_running_past_its_segment(build_elf):
    data = build_elf([(MiB, CODE, len(CODE))], entry=MiB, notes=[pvh_note(MiB)])
    data = _patch(data, 64 + 56 * 2 + 4, "<I", 0x1000)      # descsz of the first note
    with pytest.raises(BootError, match="note"):
        parse_elf(data)


def test_pvh_entry_must_be_inside_the_image(build_elf):
    with pytest.raises(BootError, match="PHYS32"):
        parse_elf(build_elf([(MiB, CODE, len(CODE))], entry=MiB, notes=[pvh_note(8 * MiB)]))
    with pytest.raises(BootError, match="PHYS32"):
        parse_elf(build_elf([(MiB, CODE, len(CODE))], entry=MiB, notes=[pvh_note(1 << 33, 8)]))


def test_overlapping_segments_rejected(build_elf):
    with pytest.raises(BootError, match="overlap"):
        parse_elf(build_elf([(MiB, CODE, 0x2000), (MiB + 0x1000, CODE, len(CODE))], entry=MiB))


def test_segment_outside_ram_rejected(mem, build_elf):
    for paddr in (1 << 30, 64 * MiB - 0x100, 0xFEC0_0000, 1 << 40):
        with pytest.raises(BootError, match="RAM"):
            load_elf(mem, build_elf([(paddr, CODE, len(CODE))], entry=paddr))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_elf_never_escapes_booterror(mem, build_elf, data):
    """Random byte corruption of a valid file: either it loads or BootError, nothing else."""
    buf = bytearray(_valid(build_elf))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        load_elf(mem, bytes(buf[:cut]))
    except BootError:
        pass
