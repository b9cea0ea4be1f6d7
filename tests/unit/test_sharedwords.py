"""Shared words are never seen half-written by another CPU (xenkvm/sharedwords.py).

A C thread (no GIL) reads a word in a loop while Python stores two values into it in turn: every
value it sees must be one of the two.  ``struct.pack_into`` fails this (it zero-fills the field
first): that is what made guests read their xenstore ring's ``req_cons`` as 0.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import threading

import pytest

from xenkvm.machine.memory import GuestMemory
from xenkvm.sharedwords import Words
from xenkvm.xen.console import ConsoleRing
from xenkvm.xenstore.ring import REQ_CONS

A, B = 0xAAAAAAAA, 0x55555555
WRITES = 300_000

WATCHER = r"""
#include <stdint.h>
volatile int stop, started;
/* Read *p until told to stop; count values that are neither a nor b. */
long watch(volatile uint32_t *p, uint32_t a, uint32_t b, uint32_t *seen)
{
    long torn = 0;
    started = 1;
    while (!stop) {
        uint32_t x = *p;
        if (x != a && x != b) { torn++; *seen = x; }
    }
    return torn;
}
"""


@pytest.fixture(scope="module")
def watcher(tmp_path_factory):
    d = tmp_path_factory.mktemp("watcher")
    (d / "w.c").write_text(WATCHER)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(d / "w.so"), str(d / "w.c")], check=True)
    lib = ctypes.CDLL(str(d / "w.so"))
    lib.watch.restype = ctypes.c_long
    return lib


def torn_reads(lib, page: mmap.mmap, offset: int, store) -> tuple[int, int]:
    """Store A and B alternately ``WRITES`` times with ``store(value)`` while C watches the word."""
    store(A)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page)) + offset
    stop, started = ctypes.c_int.in_dll(lib, "stop"), ctypes.c_int.in_dll(lib, "started")
    stop.value = started.value = 0
    seen, result = ctypes.c_uint32(), {}
    t = threading.Thread(target=lambda: result.setdefault("torn", lib.watch(ctypes.c_void_p(addr), A, B,
                                                                              ctypes.byref(seen))))
    t.start()
    while not started.value:
        pass
    for i in range(WRITES):
        store(B if i & 1 else A)
    stop.value = 1
    t.join()
    return result["torn"], seen.value


def test_words_are_stored_whole(watcher):
    page = mmap.mmap(-1, 4096)
    words = Words(page)
    torn, seen = torn_reads(watcher, page, REQ_CONS, lambda v: words.set(REQ_CONS, v))
    assert torn == 0, f"a reader saw {seen:#x}"


def test_guest_memory_stores_fields_whole(watcher):
    mem = GuestMemory(4 << 20)
    region = mem.regions[0]
    gpa = 0x1000 + 8
    torn, seen = torn_reads(watcher, region.mm, region.base + gpa, lambda v: mem.write_u32(gpa, v))
    assert torn == 0, f"a reader saw {seen:#x}"


def test_console_ring_indexes_are_stored_whole(watcher):
    page = mmap.mmap(-1, 4096)
    ring = ConsoleRing(memoryview(page))
    off = ring.lay.in_prod
    torn, seen = torn_reads(watcher, page, off, lambda v: ring._set_u32(off, v))
    assert torn == 0, f"a reader saw {seen:#x}"


def test_misaligned_offsets_are_refused():
    words = Words(bytearray(16))
    with pytest.raises(ValueError, match="aligned"):
        words.set(2, 1)
    with pytest.raises(ValueError, match="aligned"):
        words.get(6)
    with pytest.raises(ValueError, match="whole number"):
        Words(bytearray(6))
    words.set(12, 0x1_0000_0005)
    assert words.get(12) == 5 and bytes(words._w.obj)[12:16] == b"\x05\0\0\0"
