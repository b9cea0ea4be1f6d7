"""Where a guest image makes its hypercalls: the vmcall/vmmcall sites the direct traps catch.

Linux since XSA-466 calls ``xen_hypercall_intel``/``_amd`` (a bare vmcall or
vmmcall) and never asks for a hypercall page.  The breakpoint and patch traps
(xen/traps.py) need those instructions' addresses: from the ELF symbol table
when it has one, else by the stubs' shape; and, for patching, where the loader
put each one in guest-physical memory.  Everything here reads an ELF the guest
supplied, so every offset is bounds-checked before it is used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

VMCALL = b"\x0f\x01\xc1"
VMMCALL = b"\x0f\x01\xd9"
INSN_LEN = 3
SYMBOLS = ("xen_hypercall_intel", "xen_hypercall_amd")


@dataclass(frozen=True)
class Site:
    name: str
    vaddr: int


def _sections(elf: bytes):
    """(sh_type, sh_offset, sh_size, sh_link, sh_entsize) of each section of an ELF64, bounds-checked."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or len(elf) < 64:
        return []
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(elf):
        return []
    out = []
    for i in range(shnum):
        _, sh_type, _, _, off, size, link, _, _, entsize = struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
        if off + size <= len(elf):
            out.append((sh_type, off, size, link, entsize))
    return out


def symbol_sites(elf: bytes) -> list[Site]:
    """Hypercall functions named in the ELF symbol table, if it has one."""
    secs = _sections(elf)
    found = []
    for sh_type, off, size, link, entsize in secs:
        if sh_type != 2 or entsize != 24 or link >= len(secs):  # SHT_SYMTAB
            continue
        _, str_off, str_size, _, _ = secs[link]
        strtab = elf[str_off:str_off + str_size]
        for i in range(size // 24):
            name_off, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", elf, off + i * 24)
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off:end].decode("ascii", "replace") if end >= 0 else ""
            if name in SYMBOLS and value:
                found.append(Site(name, value))
    return found


def _exec_segments(elf: bytes):
    """(vaddr, bytes) of each executable PT_LOAD."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return
        p_type, p_flags, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, base)
        if p_type == 1 and p_flags & 1 and off + filesz <= len(elf):
            yield vaddr, elf[off:off + filesz]


def pattern_sites(elf: bytes) -> list[Site]:
    """Hypercall stubs found by shape (linux.md 0.2): a 16-byte-aligned vmmcall stub
    followed 16 bytes later by the vmcall stub (Linux), or a lone ``vmcall; ret``."""
    found: list[Site] = []
    for vaddr, code in _exec_segments(elf):
        start = 0
        while (i := code.find(VMMCALL, start)) >= 0:
            start = i + 1
            if (vaddr + i) % 16 == 0 and code[i + 16:i + 19] == VMCALL:
                return [Site("xen_hypercall_amd", vaddr + i), Site("xen_hypercall_intel", vaddr + i + 16)]
        for insn, name in ((VMCALL, "xen_hypercall_intel"), (VMMCALL, "xen_hypercall_amd")):
            i = code.find(insn + b"\xc3")
            if i >= 0:
                found.append(Site(name, vaddr + i))
    return found


def find_sites(elf: bytes) -> list[Site]:
    sites = symbol_sites(elf) or pattern_sites(elf)
    return sorted(set(sites), key=lambda s: s.vaddr)[:4]


def site_gpa(elf: bytes, vaddr: int) -> int | None:
    """Where the loader put the instruction at ``vaddr``: through the PT_LOAD whose file
    bytes hold it, ``p_paddr + (vaddr - p_vaddr)`` (load_elf copies segments to p_paddr)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or len(elf) < 64:
        return None
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if phentsize < 56 or base + 56 > len(elf):
            return None
        p_type, _, _, p_vaddr, p_paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, base)
        if p_type == 1 and p_vaddr <= vaddr and vaddr + INSN_LEN <= p_vaddr + filesz:
            return p_paddr + (vaddr - p_vaddr)
    return None
