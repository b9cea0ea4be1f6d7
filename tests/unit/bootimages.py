"""Image builders for the boot-loader tests (importable: ``from bootimages import ...``).

The builders write ELF files and bzImages with ``struct`` from the published
formats (ELF spec, Linux boot.rst offsets), independently of the cffi layouts
the loaders use, so the tests cross-check those layouts too.
"""
from __future__ import annotations

import struct


EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")      # 64 bytes
EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")      # 52 bytes
PHDR64 = struct.Struct("<IIQQQQQQ")              # type flags offset vaddr paddr filesz memsz align
PHDR32 = struct.Struct("<IIIIIIII")              # type offset vaddr paddr filesz memsz flags align
PT_LOAD, PT_NOTE = 1, 4
EM_386, EM_X86_64 = 3, 62


def note_bytes(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    """One ELF note: namesz, descsz, type, name+NUL padded, desc padded."""
    n = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % align)  # noqa: E731
    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def build_elf(segments, entry, notes=(), cls=64, vaddr_offset=0, machine=None):
    """An ELF executable with one PT_LOAD per (paddr, data, memsz) and one PT_NOTE."""
    ehdr, phdr = (EHDR64, PHDR64) if cls == 64 else (EHDR32, PHDR32)
    note_blob = b"".join(note_bytes(*n) for n in notes)
    nph = len(segments) + (1 if note_blob else 0)
    off = ehdr.size + nph * phdr.size
    phdrs, body = [], b""
    if note_blob:
        phdrs.append(_phdr(cls, PT_NOTE, off, 0, 0, len(note_blob), len(note_blob), 4, 4))
        body += note_blob
    for paddr, data, memsz in segments:
        pad = -(off + len(body)) % 16
        body += b"\0" * pad
        phdrs.append(_phdr(cls, PT_LOAD, off + len(body), paddr + vaddr_offset, paddr,
                           len(data), memsz, 7, 16))
        body += data
    ident = b"\x7fELF" + bytes([2 if cls == 64 else 1, 1, 1]) + bytes(9)
    mach = machine or (EM_X86_64 if cls == 64 else EM_386)
    head = ehdr.pack(ident, 2, mach, 1, entry, ehdr.size, 0, 0, ehdr.size, phdr.size, nph, 0, 0, 0)
    return head + b"".join(phdrs) + body


def _phdr(cls, ptype, offset, vaddr, paddr, filesz, memsz, flags, align):
    if cls == 64:
        return PHDR64.pack(ptype, flags, offset, vaddr, paddr, filesz, memsz, align)
    return PHDR32.pack(ptype, offset, vaddr, paddr, filesz, memsz, flags, align)


# ---- bzImage (offsets from Documentation/arch/x86/boot.rst) ------------------
BZ = {
    "setup_sects": (0x1F1, "B"), "syssize": (0x1F4, "I"), "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"), "header": (0x202, "4s"), "version": (0x206, "H"),
    "type_of_loader": (0x210, "B"), "loadflags": (0x211, "B"), "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"), "ramdisk_size": (0x21C, "I"), "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"), "initrd_addr_max": (0x22C, "I"), "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"), "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"),
    "payload_offset": (0x248, "I"), "payload_length": (0x24C, "I"), "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}
HEADER_END = 0x26C   # end of kernel_info_offset (protocol 2.15)


def bz_get(buf: bytes, name: str, base: int = 0) -> int:
    off, fmt = BZ[name]
    return struct.unpack_from("<" + fmt, buf, base + off)[0]


def build_bzimage(payload: bytes = b"", *, version=0x020F, setup_sects=4, xloadflags=1,
                  pref_address=0x100_0000, init_size=0x40_0000, relocatable=1,
                  kernel_alignment=0x20_0000, initrd_addr_max=0x7FFF_FFFF, cmdline_size=2047,
                  stub: bytes = b"\xf4" * 0x200, trailer: bytes = b"", **overrides) -> bytes:
    """A minimal bzImage: setup sectors + header, then stub code and the payload."""
    nsect = setup_sects or 4
    pm = stub + payload + trailer
    pm += b"\0" * (-len(pm) % 16)
    fields = {
        "setup_sects": setup_sects, "syssize": len(pm) // 16, "boot_flag": 0xAA55,
        "jump": 0xEB | ((HEADER_END - 0x202) << 8), "header": b"HdrS", "version": version,
        "loadflags": 0x01, "initrd_addr_max": initrd_addr_max,
        "kernel_alignment": kernel_alignment, "relocatable_kernel": relocatable,
        "xloadflags": xloadflags, "cmdline_size": cmdline_size,
        "payload_offset": len(stub) if payload else 0, "payload_length": len(payload),
        "pref_address": pref_address, "init_size": init_size,
    }
    fields.update(overrides)
    setup = bytearray((nsect + 1) * 512)
    for name, value in fields.items():
        off, fmt = BZ[name]
        struct.pack_into("<" + fmt, setup, off, value)
    return bytes(setup) + pm
