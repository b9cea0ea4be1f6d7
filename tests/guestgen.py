"""Tiny PVH guests made from raw 32-bit machine code, for tests and benchmarks.

``pvh_elf(code)`` wraps bytes into an ELF64 with one PT_LOAD at 1 MiB and a
``XEN_ELFNOTE_PHYS32_ENTRY`` note pointing at its first byte, which is all our
PVH loader (and any PVH loader) needs.
"""
from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_ELFNOTE_GUEST_OS = 6


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def pvh_elf(code: bytes, entry_offset: int = 0, guest_os: bytes | None = None) -> bytes:
    """``guest_os``: also a GUEST_OS note (b"linux": the loader treats the image as Linux)."""
    note = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", LOAD_ADDR + entry_offset))
    if guest_os is not None:
        note += _note(b"Xen", XEN_ELFNOTE_GUEST_OS, guest_os + b"\0")
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
#: sti; hlt; jmp back to hlt: halted with interrupts on (only an interrupt or a kick ends KVM_RUN)
IDLE_LOOP = b"\xfb\xf4\xeb\xfd"
#: lidt with a zero limit, then int3: #GP -> #DF -> triple fault
TRIPLE_FAULT = b"\x0f\x01\x1d" + struct.pack("<I", 0x100000 + 0x800) + b"\xcc"
RESET_CF9 = b"\xb0\x06\x66\xba\xf9\x0c\xee"  # mov al,6; mov dx,0xcf9; out dx,al


def pio_loop(port: int = 0x10) -> bytes:
    """out port, al forever (the exit round-trip benchmark)."""
    return bytes([0xE6, port, 0xEB, 0xFC])


# --- Xen hypercalls from raw 32-bit guests ------------------------------------------
HYPERCALL_PAGE = 0x200000
STACK = b"\xbc\x00\x00\x09\x00"                     # mov esp, 0x90000


def install_hypercall_page(page: int = HYPERCALL_PAGE) -> bytes:
    """wrmsr(0x40000000, page)."""
    return (b"\xb9\x00\x00\x00\x40" + b"\xb8" + struct.pack("<I", page) + b"\x31\xd2" + b"\x0f\x30")


def xen_version_via_page(page: int = HYPERCALL_PAGE) -> bytes:
    """eax = xen_version(XENVER_version, 0) through the hypercall page."""
    return b"\x31\xdb\x31\xc9" + b"\xb8" + struct.pack("<I", page + 17 * 32) + b"\xff\xd0"


def print_version_eax() -> bytes:
    """Print the minor (low byte) and major (byte 2) of EAX on the debug port."""
    return b"\xe6\xe9\xc1\xe8\x10\xe6\xe9"


def xen_version_via_vmcall_program(loops: int = 1, marker_port: int | None = None) -> bytes:
    """A guest that calls a `vmcall; ret` stub ``loops`` times with eax=17 (xen_version) and ebx=0.

    With ``marker_port`` it writes that port once before and once after the loop
    (for timing); then prints the result and powers off.
    """
    marker = bytes([0xE6, marker_port]) if marker_port is not None else b""
    head = STACK + marker + b"\xbe" + struct.pack("<I", loops)        # mov esi, loops
    loop = b"\x31\xdb\x31\xc9\xb8\x11\x00\x00\x00" + b"\xe8"            # xor ebx; xor ecx; mov eax,17; call rel32
    after_call = b"\x4e" + b"\x75"                                     # dec esi; jnz loop
    tail = marker + print_version_eax() + POWER_OFF + SPIN
    stub = b"\x0f\x01\xc1\xc3"                                         # vmcall; ret
    # layout: head | loop(+rel32) | dec/jnz(+rel8) | tail | stub
    loop_start = len(head)
    call_end = loop_start + len(loop) + 4
    jnz_end = call_end + len(after_call) + 1
    stub_at = jnz_end + len(tail)
    code = (head + loop + struct.pack("<i", stub_at - call_end) + after_call
            + struct.pack("<b", loop_start - jnz_end) + tail + stub)
    return code


def xen_version_via_page_program(loops: int = 1, marker_port: int | None = None) -> bytes:
    """Like xen_version_via_vmcall_program, through the hypercall page."""
    marker = bytes([0xE6, marker_port]) if marker_port is not None else b""
    head = STACK + install_hypercall_page() + marker + b"\xbe" + struct.pack("<I", loops)
    loop = xen_version_via_page() + b"\x4e\x75"
    code = head + loop + struct.pack("<b", -(len(loop) + 1)) + marker + print_version_eax() + POWER_OFF + SPIN
    return code
