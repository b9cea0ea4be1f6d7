"""Tiny PVH guests made from raw 32-bit machine code, for tests and benchmarks.

``pvh_elf(code)`` wraps bytes into an ELF64 with one PT_LOAD at 1 MiB and a
``XEN_ELFNOTE_PHYS32_ENTRY`` note pointing at its first byte, which is all our
PVH loader (and any PVH loader) needs.
"""
from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def pvh_elf(code: bytes, entry_offset: int = 0) -> bytes:
    note = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", LOAD_ADDR + entry_offset))
    ehsize, phentsize, phnum = 64, 56, 2
    note_off = ehsize + phentsize * phnum
    code_off = (note_off + len(note) + 15) & ~15
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                       2, 62, 1, LOAD_ADDR + entry_offset, ehsize, 0, 0, ehsize, phentsize, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, code_off, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    out = ehdr + load + pnote + note
    return out + b"\0" * (code_off - len(out)) + code


# --- 32-bit code snippets ----------------------------------------------------------
def out_imm8(port: int, value: int) -> bytes:
    """mov al, value; out port, al"""
    return bytes([0xB0, value & 0xFF, 0xE6, port & 0xFF])


def out_dx_ax(port: int, value: int) -> bytes:
    """mov dx, port; mov ax, value; out dx, ax"""
    return b"\x66\xba" + struct.pack("<H", port) + b"\x66\xb8" + struct.pack("<H", value) + b"\x66\xef"


def print_debugcon(text: bytes) -> bytes:
    return b"".join(out_imm8(0xE9, c) for c in text)


POWER_OFF = out_dx_ax(0x604, (5 << 10) | (1 << 13))
SPIN = b"\xeb\xfe"                     # jmp $
HLT_LOOP = b"\xfa\xf4\xeb\xfd"         # cli; hlt; jmp back to hlt
#: lidt with a zero limit, then int3: #GP -> #DF -> triple fault
TRIPLE_FAULT = b"\x0f\x01\x1d" + struct.pack("<I", 0x100000 + 0x800) + b"\xcc"
RESET_CF9 = b"\xb0\x06\x66\xba\xf9\x0c\xee"  # mov al,6; mov dx,0xcf9; out dx,al


def pio_loop(port: int = 0x10) -> bytes:
    """out port, al forever (the exit round-trip benchmark)."""
    return bytes([0xE6, port, 0xEB, 0xFC])
