"""Words of a page that a guest vCPU reads and writes while we do: one load or store each.

Ring indexes (xenstore, console) and grant-table fields are read by the guest at any moment, on
another CPU.  ``struct.pack_into`` must not write them: CPython zero-fills the field, then stores
its bytes one at a time, so a guest that reads in between sees 0 or a mix of old and new bytes
(this is what broke the xenstore rings of test guests now and then: the guest read ``req_cons``
as 0 right after the store moved it, and gave the ring up).  ``struct.unpack_from`` likewise
reads standard-size fields a byte at a time, so it can return a value that never was.

A ``memoryview`` cast to ``"I"`` reads or writes one item with a ``memcpy`` of its size, which
is a single aligned 32-bit move on x86-64: atomic, and (x86 being TSO) ordered after the
stores before it.  tests/test_sharedwords.py watches for torn values from a C thread.
"""

from __future__ import annotations

import sys

if sys.byteorder != "little":     # the Xen ABI's words are the CPU's: little-endian on x86
    raise ImportError("xenkvm runs on x86-64 hosts only")

_MASK = 0xFFFFFFFF


class Words:
    """The aligned little-endian u32 words of a shared buffer, each read or written whole."""

    __slots__ = ("_w",)

    def __init__(self, buf: object) -> None:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes % 4:
            raise ValueError(f"shared words: {view.nbytes} bytes is not a whole number of words")
        self._w = view.cast("I")

    def get(self, off: int) -> int:
        """The word at byte offset ``off`` (a multiple of 4), in one load."""
        if off & 3:
            raise ValueError(f"shared words: offset {off} is not word aligned")
        return self._w[off >> 2]

    def set(self, off: int, value: int) -> None:
        """Store ``value`` (taken mod 2**32) at byte offset ``off`` in one store."""
        if off & 3:
            raise ValueError(f"shared words: offset {off} is not word aligned")
        self._w[off >> 2] = value & _MASK
