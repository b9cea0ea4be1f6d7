"""GuestMemory's page access and atomic bit/word operations (the Xen layer's shared words)."""
from __future__ import annotations

import gc

import pytest

from xenkvm.machine.memory import GuestMemory, GuestMemoryError


@pytest.fixture
def m():
    return GuestMemory(4 << 20)


def test_bits_count_from_the_address_lsb_first(m):
    assert not m.test_and_set_bit(0x1000, 70) and m.test_and_set_bit(0x1000, 70)
    assert m.read(0x1008, 1)[0] == 1 << 6
    assert m.test_and_clear_bit(0x1000, 70) and not m.test_and_clear_bit(0x1000, 70)
    assert not m.test_and_set_bit(0x1003, 1) and m.read(0x1003, 1)[0] == 2   # unaligned base


def test_word_atomics_return_the_old_value(m):
    assert m.atomic_or32(0x2000, 5) == 0 and m.atomic_and32(0x2000, 4) == 5 and m.read_u32(0x2000) == 4
    assert m.cmpxchg32(0x2000, 3, 9) == (False, 4) and m.read_u32(0x2000) == 4
    assert m.cmpxchg32(0x2000, 4, 9) == (True, 4) and m.read_u32(0x2000) == 9


@pytest.mark.parametrize("bad", [lambda m: m.atomic_or32(0x2001, 1), lambda m: m.atomic_and32(4 << 20, 1),
                                 lambda m: m.cmpxchg32(-4, 0, 1), lambda m: m.page(1 << 40),
                                 lambda m: m.page(-1), lambda m: m.test_and_set_bit(-8, 0),
                                 lambda m: m.test_and_clear_bit(0, -9)])
def test_bad_addresses_raise_guest_memory_error(m, bad):
    with pytest.raises(GuestMemoryError):
        bad(m)


def test_pages_and_ram(m):
    m.page(1)[:4] = b"abcd"
    assert len(m.page(1)) == 4096 and m.read(0x1000, 4) == b"abcd"
    assert m.is_ram(0) and not m.is_ram(4 << 20)
    r = m.add_region(0xD000_0000, 4096, "extra")
    assert not m.is_ram(0xD000_0000) and m.atomic_or32(0xD000_0000, 1) == 0
    m.remove_region(r)
    with pytest.raises(GuestMemoryError):      # no stale pointer to a removed region
        m.atomic_or32(0xD000_0000, 1)


def test_cptr_reaches_guest_bytes_and_outlives_its_region_safely(m):
    p = m.cptr(0x3000, 16)
    p[4] = b"\x7f"
    assert m.read(0x3004, 1) == b"\x7f"
    with pytest.raises(GuestMemoryError):
        m.cptr((4 << 20) - 8, 16)          # runs past the end of RAM
    r = m.add_region(0xF000_0000, 0x1000, "hole-page")
    q, gen = m.cptr(0xF000_0008, 8), m.generation
    m.remove_region(r)
    del r
    gc.collect()
    assert m.generation != gen            # the holder sees q is stale ...
    q[0] = b"\x01"                        # ... and a late write lands in still-mapped host memory
    assert q[0] == b"\x01" and not m.contains(0xF000_0008)
