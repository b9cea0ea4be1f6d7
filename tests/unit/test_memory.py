"""Guest memory: every guest-supplied address is bounds-checked, views are zero-copy."""
from __future__ import annotations

import numpy as np
import pytest

from xenkvm.kvm._kvm_cffi import ffi
from xenkvm.machine.memory import (HIGH_RAM_BASE, LOW_RAM_TOP, E820Type, GuestMemory,
                                   GuestMemoryError, RegionRefused)

MiB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(16 * MiB)


def test_read_write_roundtrip(mem):
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"
    mem.write_u64(0x2000, 0x1122334455667788)
    assert mem.read_u32(0x2000) == 0x55667788
    assert mem.read_u64(0x2000) == 0x1122334455667788


def test_views_are_zero_copy(mem):
    view = mem.view(0x3000, 16)
    view[0] = 0xAB
    assert mem.read(0x3000, 1) == b"\xab"
    arr = mem.array(0x3000, 2, np.uint64)
    arr[1] = 7
    assert mem.read_u64(0x3008) == 7


@pytest.mark.parametrize("gpa,length", [
    (16 * MiB, 1),            # first byte past RAM
    (16 * MiB - 4, 8),        # straddles the end
    (-1, 4),                  # negative address
    (0, -1),                  # negative length
    (2**64 - 1, 2),           # wraps around
    (LOW_RAM_TOP + 0x1000, 4),  # in the MMIO hole
])
def test_out_of_bounds_is_an_error_value(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    assert not mem.contains(gpa, length)


def test_read_cstr_bounded(mem):
    mem.write(0x5000, b"abc\0")
    assert mem.read_cstr(0x5000, 16) == b"abc"
    mem.fill(0x6000, 64, 0x41)
    with pytest.raises(GuestMemoryError):
        mem.read_cstr(0x6000, 32)
    mem.fill(16 * MiB - 8, 8, 0x41)  # runs into the end of RAM: an error, not an overrun
    with pytest.raises(GuestMemoryError):
        mem.read_cstr(16 * MiB - 8, 4096)


def test_high_ram_above_4g():
    mem = GuestMemory(LOW_RAM_TOP + 8 * MiB)
    assert [r.gpa for r in mem.regions] == [0, HIGH_RAM_BASE]
    mem.write(HIGH_RAM_BASE + 5, b"x")
    assert mem.read(HIGH_RAM_BASE + 5, 1) == b"x"
    assert mem.e820()[-1].addr == HIGH_RAM_BASE


def test_e820_keeps_low_memory_and_reserves_bios_area(mem):
    e = mem.e820()
    assert e[0].addr == 0 and e[0].type is E820Type.RAM
    assert e[1].type is E820Type.RESERVED and e[1].addr + e[1].size == 0x100000
    assert sum(x.size for x in e if x.type is E820Type.RAM) + e[1].size == 16 * MiB


def test_add_region_at_run_time(mem):
    seen = []
    mem.on_region_added(seen.append)
    r = mem.add_region(0xF000_0000, 0x2000, "grant-frames")
    assert seen[-1] is r
    mem.write(0xF000_1000, b"g")
    assert mem.read(0xF000_1000, 1) == b"g"
    with pytest.raises(GuestMemoryError):
        mem.add_region(0xF000_1000, 0x1000, "overlap")
    with pytest.raises(GuestMemoryError):
        mem.add_region(0x1000, 0x1000, "inside RAM")
    with pytest.raises(GuestMemoryError):
        mem.add_region(0xFEE0_0000, 0x1000, "over the LAPIC")
    with pytest.raises(GuestMemoryError):
        mem.add_region(1 << 50, 0x1000, "too high")
    above_ram = mem.add_region(16 * MiB, 0x1000, "grant frame above RAM")  # where Linux puts them
    assert above_ram.gpa == 16 * MiB


def test_reserved_regions_appear_in_e820(mem):
    mem.add_region(0xFEB0_0000, 0x4000, "special", reserved=True)
    e = mem.e820()
    assert E820Type.RESERVED in {x.type for x in e if x.addr == 0xFEB0_0000}
    assert [x.addr for x in e] == sorted(x.addr for x in e)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        GuestMemory(4096)
    with pytest.raises(ValueError):
        GuestMemory(16 * MiB + 1)


def test_atomic_bit_helpers(mem):
    from xenkvm.kvm._kvm_cffi import ffi, lib
    addr = ffi.cast("void *", mem.host_address(0x8000, 16))
    assert lib.xk_test_and_set_bit(addr, 70) == 0
    assert lib.xk_test_and_set_bit(addr, 70) == 1
    assert mem.read_u64(0x8008) == 1 << 6
    assert lib.xk_test_bit(addr, 70) == 1
    assert lib.xk_test_and_clear_bit(addr, 70) == 1
    assert mem.read_u64(0x8008) == 0
    expected = ffi.new("uint32_t *", 0)
    assert lib.xk_cmpxchg32(addr, expected, 5) and mem.read_u32(0x8000) == 5
    assert not lib.xk_cmpxchg32(addr, expected, 9) and expected[0] == 5


def test_page_by_gfn_is_a_zero_copy_view(mem):
    page = mem.page(5)
    assert len(page) == 4096
    page[0] = 0x5A
    assert mem.read(5 * 4096, 1) == b"\x5a"


@pytest.mark.parametrize("gfn", [-1, (16 * MiB) >> 12, 1 << 40])
def test_page_outside_memory_is_an_error(mem, gfn):
    with pytest.raises(GuestMemoryError):
        mem.page(gfn)


def test_ram_lookups(mem):
    extra = mem.add_region(0xFEB0_0000, 0x4000, "special", reserved=True)
    assert mem.is_ram(0) and mem.is_ram(16 * MiB - 1)
    assert not mem.is_ram(16 * MiB) and not mem.is_ram(-4096) and not mem.is_ram(0xFEB0_0000)
    assert mem.region_at(0xFEB0_3FFF) is extra and mem.region_at(0xFEB0_4000) is None
    assert mem.region_at(-1) is None and mem.region_at(1 << 50) is None
    assert mem.top_of_ram() == 16 * MiB
    assert mem.top_of_regions() == 0xFEB0_4000
    assert [r.name for r in mem.ram_regions()] == ["ram-low"]


def test_top_of_ram_above_4g():
    big = GuestMemory(LOW_RAM_TOP + 2 * MiB)
    assert big.top_of_ram() == HIGH_RAM_BASE + 2 * MiB
    assert big.is_ram(HIGH_RAM_BASE) and not big.is_ram(LOW_RAM_TOP)


def test_u32_atomics(mem):
    mem.write_u32(0x8000, 0xF0)
    assert mem.atomic_or32(0x8000, 0x0F) == 0xF0 and mem.read_u32(0x8000) == 0xFF
    assert mem.atomic_and32(0x8000, ~0x0F) == 0xFF and mem.read_u32(0x8000) == 0xF0
    assert mem.cmpxchg32(0x8000, 0xF0, 7) == (True, 0xF0) and mem.read_u32(0x8000) == 7
    assert mem.cmpxchg32(0x8000, 0xF0, 9) == (False, 7) and mem.read_u32(0x8000) == 7
    ptr = mem.u32_ptr(0x8000)
    ptr[0] = 0x1234
    assert mem.read_u32(0x8000) == 0x1234


@pytest.mark.parametrize("gpa", [0x8002, 16 * MiB - 2, 16 * MiB, -4])
def test_u32_atomics_refuse_unaligned_or_outside(mem, gpa):
    for op in (lambda: mem.atomic_or32(gpa, 1), lambda: mem.atomic_and32(gpa, 1),
               lambda: mem.cmpxchg32(gpa, 0, 1), lambda: mem.u32_ptr(gpa)):
        with pytest.raises(GuestMemoryError):
            op()


def test_bit_atomics(mem):
    assert mem.test_and_set_bit(0x8000, 70) is False
    assert mem.test_and_set_bit(0x8000, 70) is True
    assert mem.read_u64(0x8008) == 1 << 6 and mem.test_bit(0x8000, 70)
    assert mem.test_and_clear_bit(0x8000, 70) is True
    assert mem.test_and_clear_bit(0x8000, 70) is False
    assert mem.read_u64(0x8008) == 0 and not mem.test_bit(0x8000, 70)


def test_xchg8(mem):
    assert mem.xchg8(0x8001, 1) == 0 and mem.xchg8(0x8001, 0x1FF) == 1
    assert mem.read(0x8000, 3) == b"\x00\xff\x00"
    for gpa in (-1, 16 * MiB):
        with pytest.raises(GuestMemoryError):
            mem.xchg8(gpa, 1)


@pytest.mark.parametrize("gpa,bit", [(0x8000, -1), (16 * MiB - 8, 64), (16 * MiB, 0)])
def test_bit_atomics_refuse_negative_bits_or_outside(mem, gpa, bit):
    for op in (mem.test_and_set_bit, mem.test_and_clear_bit, mem.test_bit):
        with pytest.raises(GuestMemoryError):
            op(gpa, bit)
    assert mem.read(16 * MiB - 8, 8) == bytes(8)


def test_refused_region_is_not_added_and_earlier_listeners_are_undone(mem):
    """A listener that cannot back a region (no memslot left) leaves nothing behind."""
    backed, dropped = [], []

    def refuse(region):
        if not region.ram:
            raise OSError(28, "no memslot left")

    mem.on_region_added(backed.append, dropped.append)
    mem.on_region_added(lambda r: None)
    mem.on_region_added(refuse)
    before = mem.regions
    with pytest.raises(RegionRefused) as e:
        mem.add_region(0xF000_0000, 0x1000, "grant-frame")
    assert isinstance(e.value, GuestMemoryError) and e.value.cause.errno == 28
    assert mem.regions == before and not mem.contains(0xF000_0000)
    assert dropped == [backed[-1]] and backed[-1].gpa == 0xF000_0000


def test_remove_region_tells_listeners_and_frees_the_range(mem):
    removed = []
    mem.on_region_added(lambda r: None, removed.append)
    r = mem.add_region(0xF000_0000, 0x1000, "grant-frame")
    view = mem.view(0xF000_0000, 16)          # a backend may still hold a view
    mem.remove_region(r)
    assert removed == [r] and not mem.contains(0xF000_0000)
    view[:2] = b"ok"                          # the host page lives on while viewed
    again = mem.add_region(0xF000_0000, 0x1000, "grant-frame")
    assert again is not r and mem.read(0xF000_0000, 2) == bytes(2)
    with pytest.raises(ValueError):
        mem.remove_region(r)                  # not in the address space any more
    with pytest.raises(ValueError):
        mem.remove_region(mem.regions[0])     # RAM never leaves


def test_page_region_at_and_is_ram(mem):
    mem.write(0x3000, b"pg")
    assert bytes(mem.page(3)[:2]) == b"pg" and len(mem.page(3)) == 4096
    with pytest.raises(GuestMemoryError):
        mem.page(0xF0000)                     # a hole
    r = mem.add_region(0xF000_0000, 0x1000, "grant-frame")
    assert mem.region_at(0xF000_0FFF) is r and mem.region_at(0xF000_1000) is None
    assert mem.is_ram(0x3000) and not mem.is_ram(0xF000_0000) and not mem.is_ram(0xF000_1000)


def test_atomics_on_guest_words(mem):
    mem.write_u32(0x100, 0x10)
    assert mem.cmpxchg32(0x100, 0x11, 0x22) == (False, 0x10)      # lost: reports what it found
    assert mem.cmpxchg32(0x100, 0x10, 0x22) == (True, 0x10) and mem.read_u32(0x100) == 0x22
    assert mem.atomic_or32(0x100, 0x101) == 0x22 and mem.read_u32(0x100) == 0x123
    assert mem.atomic_and32(0x100, ~0x3) == 0x123 and mem.read_u32(0x100) == 0x120
    for bad in (0x102, 16 * MiB):            # unaligned; outside guest memory
        with pytest.raises(GuestMemoryError):
            mem.atomic_or32(bad, 1)


def test_big_regions_are_huge_page_aligned_with_their_gpa():
    """KVM maps guest RAM with 2 MiB pages only where host address and GPA agree modulo
    2 MiB (else it disallows them for the whole memslot), so RAM is mapped that way."""
    mem = GuestMemory(64 * MiB)
    mem.add_region(HIGH_RAM_BASE + 3 * MiB, 4 * MiB, "odd")     # a GPA not 2 MiB aligned
    for r in mem.regions:
        if r.size >= 2 * MiB:
            assert r.host_addr % (2 * MiB) == r.gpa % (2 * MiB), r.name


def test_aligned_region_accessors_agree():
    """The padding that aligns a region is invisible: the view, the numpy array, the C
    pointer and discard all address the same bytes."""
    mem = GuestMemory(64 * MiB)
    gpa = 5 * MiB + 0x3000
    mem.write(gpa, b"\x11" * 8)
    assert mem.array(gpa, 1, np.uint64)[0] == 0x1111111111111111
    assert ffi.unpack(mem.cptr(gpa, 8), 8) == b"\x11" * 8
    mem.discard(gpa - 0x3000, 0x4000)
    assert mem.read(gpa, 8) == bytes(8)
    assert mem.read(gpa + 0x1000, 1) == b"\x00"
    mem.write(gpa + 0x1000, b"\x22")
    mem.discard(gpa, 0x1000)
    assert mem.read(gpa + 0x1000, 1) == b"\x22"          # only the pages asked for
