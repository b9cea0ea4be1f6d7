"""A bzImage's vmlinux booted through the 64-bit protocol (boot/vmlinux64.py): segments at p_paddr,
entry at the ELF's physical entry, the zero page from the bzImage's header."""
from __future__ import annotations

import struct

import pytest

from bootimages import BZ
from xenkvm.machine import layout
from xenkvm.machine.boot import BootError
from xenkvm.machine.boot.vmlinux64 import load_vmlinux64

MiB = 1 << 20
HIGH = 0xFFFFFFFF80000000   # __START_KERNEL_map: vaddr = paddr + HIGH, as Linux links vmlinux
TEXT = bytes(range(256)) * 16
DATA = b"D" * 512


def _zp(mem, name: str) -> int:
    off, fmt = BZ[name]
    return struct.unpack("<" + fmt, mem.read(layout.BOOT_PARAMS + off, struct.calcsize("<" + fmt)))[0]


@pytest.fixture
def vmlinux(build_elf):
    # e_entry is physical (phys_startup_64), the text linked high
    return build_elf([(16 * MiB, TEXT, len(TEXT)), (18 * MiB, DATA, 0x3000)], entry=16 * MiB + 0x40,
                     vaddr_offset=HIGH)


def test_segments_at_paddr_entry_and_zero_page(mem, build_bzimage, vmlinux):
    image = build_bzimage(b"COMPRESSED" * 10)
    mem.write(18 * MiB + len(DATA), b"\xff" * 16)  # memsz past filesz must come out zeroed
    boot = load_vmlinux64(mem, image, vmlinux, "console=hvc0 nokaslr", b"rd" * 500, rsdp_gpa=layout.ACPI_BASE)
    assert boot.entry64 == 16 * MiB + 0x40 and boot.boot_params_gpa == layout.BOOT_PARAMS
    assert (boot.kernel_addr, boot.kernel_end) == (16 * MiB, 18 * MiB + 0x3000)
    assert mem.read(16 * MiB, len(TEXT)) == TEXT and mem.read(18 * MiB, len(DATA)) == DATA
    assert mem.read(18 * MiB + len(DATA), 16) == bytes(16)
    # the compressed payload is nowhere at the load address: nothing will decompress over the text
    assert mem.read(16 * MiB, 10) != b"COMPRESSED"
    assert _zp(mem, "version") == 0x020F and _zp(mem, "type_of_loader") == 0xFF
    assert _zp(mem, "code32_start") == 16 * MiB
    assert mem.read_cstr(_zp(mem, "cmd_line_ptr"), 100) == b"console=hvc0 nokaslr"
    rd, size = _zp(mem, "ramdisk_image"), _zp(mem, "ramdisk_size")
    assert size == 1000 and rd >= boot.kernel_end and mem.read(rd, size) == b"rd" * 500
    assert mem.read_u64(layout.BOOT_PARAMS + 0x70) == layout.ACPI_BASE


def test_refuses_what_has_no_64bit_entry(mem, build_bzimage, build_elf):
    image = build_bzimage(b"x" * 16)
    elf32 = build_elf([(16 * MiB, TEXT, len(TEXT))], entry=16 * MiB, cls=32)
    with pytest.raises(BootError, match="not an x86-64 ELF"):
        load_vmlinux64(mem, image, elf32)
    stray = build_elf([(16 * MiB, TEXT, len(TEXT))], entry=40 * MiB, vaddr_offset=HIGH)
    with pytest.raises(BootError, match="in no loaded segment"):
        load_vmlinux64(mem, image, stray)
    with pytest.raises(BootError):
        load_vmlinux64(mem, b"not a bzImage" * 100, build_elf([(16 * MiB, TEXT, len(TEXT))], entry=16 * MiB))


def _machine(tmp_path, bzimage: bytes, xen: bool):
    """What loader.prepare reads from a Machine: config, memory, vCPU count, host parameters, extensions."""
    from types import SimpleNamespace

    from xenkvm.config import BootMode, GuestConfig, XenConfig
    from xenkvm.machine.memory import GuestMemory
    from xenkvm.xen.domain import XenDomain
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage)
    cfg = GuestConfig(name="t", kernel=kernel, cmdline="nokaslr", memory=64 * MiB, boot=BootMode.LINUX,
                      xen=XenConfig() if xen else None)
    extensions = ([SimpleNamespace(needs_kernel_elf=XenDomain.needs_kernel_elf, kernel_params=lambda: ())]
                  if xen else [])  # what build attaches
    return SimpleNamespace(cfg=cfg, mem=GuestMemory(64 * MiB), vcpus=[None], host=SimpleNamespace(kernel_params=()),
                           extensions=extensions)


def test_loader_boots_a_xen_bzimage_as_its_vmlinux(tmp_path, build_bzimage, vmlinux):
    """boot: linux + xen: the extracted vmlinux is what lies at 16 MiB and what the traps get."""
    import gzip

    from xenkvm.machine.loader import prepare
    image = build_bzimage(gzip.compress(vmlinux) + struct.pack("<I", len(vmlinux)))
    m = _machine(tmp_path, image, xen=True)
    entry = prepare(m)
    assert (entry.rip, entry.rsi, entry.image) == (16 * MiB + 0x40, layout.BOOT_PARAMS, vmlinux)
    assert m.mem.read(16 * MiB, len(TEXT)) == TEXT
    plain = _machine(tmp_path, image, xen=False)  # without Xen: the bzImage itself, decompressor and all
    entry = prepare(plain)
    assert (entry.rip, entry.image) == (16 * MiB + 0x200, None)
