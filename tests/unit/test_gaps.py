"""The refused-instruction rule table and the fast completion path (no KVM needed)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from xenkvm.machine import gaps
from xenkvm.machine.gaps import BP_VECTOR, RFLAGS_AC, Gaps, match_rule


@pytest.mark.parametrize("code,name,length", [
    (b"\x0f\x01\xca\xfc", "clac", 3),
    (b"\x0f\x01\xcb\x90", "stac", 3),
    (b"\xcc\x90", "int3", 1),
    (b"\x9b\x65\x48", "fwait", 1),
])
def test_rules_match(code: bytes, name: str, length: int) -> None:
    rule = match_rule(code)
    assert rule is not None and rule.name == name and rule.completion.length == length


@pytest.mark.parametrize("code", [b"\x0f\x01\xc1", b"\xf3\x48\x0f\xb8\xc7", b"\x0f\xae\x54\x24\x04", b""])
def test_other_instructions_go_to_the_emulator(code: bytes) -> None:
    assert match_rule(code) is None


def test_rule_prefixes_are_unambiguous() -> None:
    prefixes = [r.prefix for r in gaps.RULES]
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1:]:
            assert not a.startswith(b) and not b.startswith(a)


class FakeMem:
    def __init__(self, base: int, data: bytes):
        self.base, self.data = base, bytearray(data)
        self.reads = 0

    def read(self, gpa: int, n: int) -> bytes:
        self.reads += 1
        off = gpa - self.base
        if not 0 <= off < len(self.data):
            raise ValueError("outside RAM")
        return bytes(self.data[off:off + n])


class FakeVcpu:
    id = 0

    def __init__(self, rip: int, rflags: int = 0x2):
        self.regs = SimpleNamespace(rip=rip, rflags=rflags, rsp=0xFFFFC90000003F00)
        self.msrs: dict[int, int] = {}
        self.translations = 0
        self.dirty = 0
        self.injected: list[int] = []

    def sync_regs(self):
        return self.regs

    def get_regs(self):
        return self.regs

    def mark_regs_dirty(self, regs=None) -> None:
        self.dirty += 1

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return {i: self.msrs[i] for i in indices if i in self.msrs}

    def translate(self, gva: int) -> int | None:
        self.translations += 1
        return 0x100000 + (gva & 0xFFF) if gva >> 12 == 0xFFFFFFFF81C00 else None

    def inject_exception(self, vector: int) -> None:
        self.injected.append(vector)


def _gaps(code: bytes) -> Gaps:
    page = bytearray(0x1000)
    page[0xE00:0xE00 + len(code)] = code
    return Gaps(SimpleNamespace(mem=FakeMem(0x100000, bytes(page))))


def test_clac_clears_ac_and_uses_the_code_cache() -> None:
    g = _gaps(b"\x0f\x01\xca\xfc")
    v = FakeVcpu(0xFFFFFFFF81C00E00, rflags=0x2 | RFLAGS_AC)
    assert g.complete(v)
    assert v.regs.rip == 0xFFFFFFFF81C00E03 and not v.regs.rflags & RFLAGS_AC and v.dirty == 1
    v.regs.rip, v.regs.rflags = 0xFFFFFFFF81C00E00, 0x2 | RFLAGS_AC
    assert g.complete(v)  # second time: no KVM_TRANSLATE
    assert v.translations == 1 and v.regs.rip == 0xFFFFFFFF81C00E03
    assert g.counts["clac"] == 2


def test_cached_code_is_reread_so_patched_text_is_seen() -> None:
    g = _gaps(b"\x0f\x01\xcb")
    v = FakeVcpu(0xFFFFFFFF81C00E00)
    assert g.complete(v) and v.regs.rflags & RFLAGS_AC
    g.machine.mem.data[0xE00:0xE03] = b"\x0f\x01\xca"  # the guest rewrote its text
    v.regs.rip = 0xFFFFFFFF81C00E00
    assert g.complete(v) and not v.regs.rflags & RFLAGS_AC


def test_int3_advances_and_injects_breakpoint() -> None:
    g = _gaps(b"\xcc")
    v = FakeVcpu(0xFFFFFFFF81C00E00)
    assert g.complete(v)
    assert v.regs.rip == 0xFFFFFFFF81C00E01 and v.injected == [BP_VECTOR]


def test_unreadable_rip_fails() -> None:
    g = _gaps(b"")
    assert not g.complete(FakeVcpu(0xFFFFFFFF90000000))


def test_kernel_segments_from_star() -> None:
    cs, ss = gaps.kernel_segments(0x0023_0010_0000_0000)
    assert cs["selector"] == 0x10 and cs["l"] == 1 and cs["dpl"] == 0 and cs["type"] == 0xB
    assert ss["selector"] == 0x18 and ss["db"] == 1 and ss["dpl"] == 0


def test_clac_is_not_taken_for_a_lost_syscall_without_lstar() -> None:
    g = _gaps(b"\x0f\x01\xca")
    v = FakeVcpu(0xFFFFFFFF81C00E00)
    assert g.complete(v) and g.counts.get("syscall-at-cpl3") is None


class SyscallVcpu(FakeVcpu):
    """A vCPU whose page-fault entry holds the frame of a syscall PVM left at CPL 3."""

    LSTAR = 0xFFFFFFFF81C00080

    def __init__(self):
        super().__init__(0xFFFFFFFF81C00E00)
        seg = lambda: SimpleNamespace(selector=0, base=0, limit=0, type=0, s=0, dpl=3, present=1,  # noqa: E731
                                      l=0, db=0, g=0, avl=0, unusable=0)
        self.sregs = SimpleNamespace(cs=seg(), ss=seg(), gs=seg())
        self.sregs.gs.base = 0x7F00_0000_1000
        self.msrs = {gaps.MSR_LSTAR: self.LSTAR, gaps.MSR_STAR: 0x0023_0010_0000_0000,
                     gaps.MSR_KERNEL_GS_BASE: 0xFFFF_8880_0F60_0000}

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, sregs) -> None:
        self.sregs = sregs

    def set_msrs(self, values: dict[int, int]) -> None:
        self.msrs.update(values)

    def set_regs(self, regs) -> None:
        self.regs = regs


def test_lost_syscall_is_completed_from_the_page_fault_frame() -> None:
    import struct
    g = _gaps(b"\x0f\x01\xca")
    v = SyscallVcpu()
    frame = struct.pack("<6Q", 0x15, v.LSTAR, 0x33, 0x10002, 0x7FFF_0000_1000, 0x2B)
    mem = {v.regs.rsp: frame, v.LSTAR: gaps.SWAPGS}
    read = lambda vcpu, gva, n: mem.get(gva, b"")[:n]  # noqa: E731
    assert g.syscalls.complete(v, v.regs, read)
    assert v.regs.rip == v.LSTAR + 3 and v.regs.rsp == 0x7FFF_0000_1000 and v.regs.rflags == 0x10002
    assert v.sregs.cs.selector == 0x10 and v.sregs.cs.dpl == 0 and v.sregs.ss.selector == 0x18
    assert v.sregs.gs.base == 0xFFFF_8880_0F60_0000 and v.msrs[gaps.MSR_KERNEL_GS_BASE] == 0x7F00_0000_1000


def test_ordinary_page_fault_is_left_to_the_guest() -> None:
    import struct
    g = _gaps(b"\x0f\x01\xca")
    v = SyscallVcpu()
    frame = struct.pack("<6Q", 0x4, 0x401000, 0x33, 0x246, 0x7FFF_0000_1000, 0x2B)
    read = lambda vcpu, gva, n: frame[:n] if gva == v.regs.rsp else b""  # noqa: E731
    assert not g.syscalls.complete(v, v.regs, read)
