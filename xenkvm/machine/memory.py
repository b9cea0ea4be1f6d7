"""Guest physical memory: anonymous mmaps exposed as zero-copy views.

Every access names a guest-physical address (GPA) and a length; both usually
come from the guest and are hostile.  An access that is not wholly inside one
region raises :class:`GuestMemoryError` (callers turn it into the ABI's error,
e.g. -EFAULT); nothing here ever touches host memory outside a region.

Layout (x86, like QEMU's pc machines): RAM from 0 up to ``LOW_RAM_TOP``
(3 GiB), the rest above 4 GiB; the hole in between holds MMIO (IOAPIC, LAPIC)
and the extra regions added at run time (grant frames, special pages).

The Xen layer reaches guest memory only through this class: pages by gfn,
RAM lookups (``is_ram``, ``region_at``, ``top_of_ram``) instead of walking the
regions, and 32-bit and bit atomics on words the running vCPUs share with us
(event-channel pending bits, FIFO event words, grant entry flags).

Anonymous regions of 2 MiB or more are mapped so that their host address and GPA
agree modulo 2 MiB, and marked ``MADV_HUGEPAGE`` (as QEMU does with guest RAM): KVM
backs a guest page with a 2 MiB host page only where both are so aligned (otherwise
it disallows large pages for the whole memslot), so without it every first touch of
guest RAM is a 4 KiB nested page fault; in the nested rig that was most of the gap
to QEMU's boot time (docs/hw-rig.md).

Past ~400 lines on purpose: the single owner of guest RAM and of every way into it
(bytes, structs, pages, host pointers, atomics), so no other module maps or walks it.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import numpy as np

from xenkvm.kvm._kvm_cffi import ffi
from xenkvm.kvm._kvm_cffi import lib as _klib  # the C atomic helpers (xk_*): lock-prefixed, seq_cst

PAGE_SIZE = 4096
HUGE_PAGE = 2 << 20          #: x86 large page: the alignment KVM needs to map guest RAM with it
# The atomic C helpers, bound once (they run on every event-channel delivery).
_test_and_set = _klib.xk_test_and_set_bit
_test_and_clear = _klib.xk_test_and_clear_bit
_fetch_or32 = _klib.xk_fetch_or32
_fetch_and32 = _klib.xk_fetch_and32
LOW_RAM_TOP = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000
MMIO_HOLE_END = 0xFEC0_0000  # IOAPIC at 0xfec00000, LAPIC at 0xfee00000
MAX_GPA = 1 << 46            # guest physical address width we allow
#: Legacy BIOS area kept out of e820 RAM: EBDA, VGA hole and option ROMs.
LEGACY_HOLE = (0x9_FC00, 0x10_0000)


class GuestMemoryError(ValueError):
    """A guest-physical range that is not backed by one memory region."""

    def __init__(self, gpa: int, length: int, why: str = "not in guest memory"):
        super().__init__(f"GPA {gpa:#x}+{length:#x}: {why}")
        self.gpa = gpa
        self.length = length


class RegionRefused(GuestMemoryError):
    """A listener (the VM: no memslot left, KVM said no) could not back a new region.

    Nothing was added: GuestMemory and every listener are as before the call.
    """

    def __init__(self, gpa: int, length: int, why: str, cause: BaseException):
        super().__init__(gpa, length, why)
        self.cause = cause


class E820Type(IntEnum):
    """e820 / hvm_memmap_table_entry types (Linux and Xen share the values)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type


@dataclass(eq=False)
class Region:
    """One contiguous, host-backed range of guest-physical memory (one memslot)."""

    gpa: int
    size: int
    name: str
    ram: bool = True
    reserved: bool = False  #: listed as e820 reserved so the guest never reuses the range
    slot: int = -1
    #: makes the host mapping instead of an anonymous one (a snapshot's RAM file, copy-on-write)
    backing: Callable[[int], mmap.mmap] | None = field(default=None, repr=False)
    mm: mmap.mmap = field(init=False, repr=False)
    #: where the region starts in ``mm`` (the padding that aligns an anonymous one)
    base: int = field(init=False, repr=False, default=0)
    view: memoryview = field(init=False, repr=False)
    host_addr: int = field(init=False, repr=False)
    host_ptr: object = field(init=False, repr=False)   #: ``char *`` at host_addr (C atomics)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE or self.gpa % PAGE_SIZE:
            raise ValueError(f"region {self.name}: {self.gpa:#x}+{self.size:#x} is not page aligned")
        if self.backing is not None:
            self.mm = self.backing(self.size)
        else:
            self._map_anonymous()
        self.view = memoryview(self.mm)[self.base:self.base + self.size]
        self.host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mm))) + self.base
        self.host_ptr = ffi.cast("char *", self.host_addr)

    def _map_anonymous(self) -> None:
        """Map the region, huge-page aligned with its GPA when it is big enough (module doc)."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        if self.size < HUGE_PAGE:
            self.mm = mmap.mmap(-1, self.size, flags=flags)
            return
        self.mm = mmap.mmap(-1, self.size + HUGE_PAGE, flags=flags)   # untouched slack: no memory
        start = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mm)))
        self.base = (self.gpa - start) % HUGE_PAGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.mm.madvise(mmap.MADV_HUGEPAGE, self.base, self.size)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """The guest's physical address space: RAM plus regions added at run time."""

    def __init__(self, ram_size: int, ram_backing: Callable[[str, int], Callable[[int], mmap.mmap]] | None = None):
        """``ram_backing(name, gpa)``, when given, supplies each RAM region's ``Region.backing``
        (a restored snapshot maps its RAM file there instead of anonymous memory)."""
        if ram_size < 2 * 1024 * 1024 or ram_size % PAGE_SIZE:
            raise ValueError(f"guest RAM of {ram_size} bytes: need a page multiple of at least 2 MiB")
        self.ram_size = ram_size
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._ptrs: dict = {}   #: gpa -> char * of words used atomically; dropped on removal
        #: (added, removed) pairs; ``removed`` undoes ``added`` (None: nothing to undo)
        self._listeners: list[tuple[Callable[[Region], None], Callable[[Region], None] | None]] = []
        self._tls = threading.local()   #: per-thread ``uint32_t`` cell for cmpxchg32
        #: bumped whenever a region leaves: pointers from :meth:`cptr` taken before are stale
        self.generation = 0
        low = min(ram_size, LOW_RAM_TOP)
        back = ram_backing or (lambda name, gpa: None)
        self._insert(Region(0, low, "ram-low", backing=back("ram-low", 0)))
        if ram_size > low:
            self._insert(Region(HIGH_RAM_BASE, ram_size - low, "ram-high", backing=back("ram-high", HIGH_RAM_BASE)))

    # -- regions -----------------------------------------------------------
    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def on_region_added(self, listener: Callable[[Region], None],
                        removed: Callable[[Region], None] | None = None) -> None:
        """Call ``listener`` for every existing and future region (the VM maps memslots).

        ``removed`` is called when a region leaves (:meth:`remove_region`) and to
        undo ``listener`` when a later listener refuses a new region; a listener
        that maps regions somewhere (a memslot) must give it.
        """
        self._listeners.append((listener, removed))
        for region in self._regions:
            listener(region)

    def add_region(self, gpa: int, size: int, name: str, *, reserved: bool = False,
                   backing: Callable[[int], mmap.mmap] | None = None) -> Region:
        """Back a new range outside RAM (grant frames, special pages) with a memslot.

        The guest may name any free frame (Linux puts grant frames just above
        RAM), so anything not overlapping an existing region, the IOAPIC/LAPIC
        window or the physical-address limit is accepted.  ``backing`` makes the host
        mapping (a memfd another process maps too) instead of anonymous memory.
        """
        if gpa < 0 or size <= 0 or gpa + size > MAX_GPA:
            raise GuestMemoryError(gpa, size, "beyond the guest physical address width")
        if gpa < MMIO_HOLE_END + 0x40_0000 and MMIO_HOLE_END < gpa + size:
            raise GuestMemoryError(gpa, size, "overlaps the IOAPIC/LAPIC window")
        for r in self._regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(gpa, size, f"overlaps region {r.name}")
        region = Region(gpa, size, name, ram=False, reserved=reserved, backing=backing)
        self._announce(region)
        self._insert(region)
        return region

    def _announce(self, region: Region) -> None:
        """Run the listeners on a new region; if one fails, undo the others and raise RegionRefused."""
        done: list[Callable[[Region], None] | None] = []
        try:
            for added, removed in self._listeners:
                added(region)
                done.append(removed)
        except (OSError, ValueError) as e:
            for removed in reversed(done):
                if removed is not None:
                    removed(region)
            raise RegionRefused(region.gpa, region.size, f"cannot back region {region.name}: {e}", e) from e

    def remove_region(self, region: Region) -> None:
        """Take a run-time region out of the address space (grant frames moved away).

        The listeners drop its memslot first, so the guest no longer reaches it;
        the host pages go when the last view of them does (a backend may still
        hold one).  RAM never leaves.
        """
        i = bisect.bisect(self._starts, region.gpa) - 1
        if region.ram or i < 0 or self._regions[i] is not region:
            raise ValueError(f"region {region.name} at {region.gpa:#x} is not a run-time region here")
        for _, removed in reversed(self._listeners):
            if removed is not None:
                removed(region)
        del self._starts[i]
        del self._regions[i]
        self._ptrs.clear()
        self.generation += 1

    def _insert(self, region: Region) -> None:
        i = bisect.bisect(self._starts, region.gpa)
        self._starts.insert(i, region.gpa)
        self._regions.insert(i, region)

    def _find(self, gpa: int, length: int) -> tuple[Region, int]:
        """Return (region, offset) for a range wholly inside one region."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(gpa, length, "negative address or length")
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            off = gpa - r.gpa
            if off + length <= r.size:
                return r, off
        raise GuestMemoryError(gpa, length)

    # -- access ------------------------------------------------------------
    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of ``length`` bytes at ``gpa``."""
        r, off = self._find(gpa, length)
        return r.view[off:off + length]

    def array(self, gpa: int, count: int, dtype: np.dtype | str) -> np.ndarray:
        """A zero-copy numpy view of ``count`` items of ``dtype`` at ``gpa``."""

        dt = np.dtype(dtype)
        r, off = self._find(gpa, count * dt.itemsize)
        return np.frombuffer(r.mm, dtype=dt, count=count, offset=r.base + off)

    def host_address(self, gpa: int, length: int = 1) -> int:
        """The host virtual address of ``gpa`` (for the C atomic helpers)."""
        r, off = self._find(gpa, length)
        return r.host_addr + off

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        ctypes.memset(self.host_address(gpa, length), value, length)

    def discard(self, gpa: int, length: int) -> None:
        """Return whole pages to the host (``MADV_DONTNEED``): their next access reads zeros.

        The memslot stays; KVM's MMU notifier drops the guest's mappings of them.
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(gpa, length, "not page aligned")
        r, off = self._find(gpa, length)
        r.mm.madvise(mmap.MADV_DONTNEED, r.base + off, length)

    def read_cstr(self, gpa: int, max_len: int) -> bytes:
        """A NUL-terminated string of at most ``max_len`` bytes (NUL excluded)."""
        r, off = self._find(gpa, 1)
        avail = min(max_len + 1, r.size - off)
        chunk = r.view[off:off + avail]
        end = bytes(chunk).find(b"\0")
        if end < 0:
            raise GuestMemoryError(gpa, avail, "string not terminated")
        return bytes(chunk[:end])

    def unpack(self, fmt: struct.Struct, gpa: int) -> tuple:
        """Copied out first, in one ``memcpy``: ``unpack_from`` reads standard-size fields a byte
        at a time, and a running vCPU may be writing them (sharedwords.py)."""
        r, off = self._find(gpa, fmt.size)
        return fmt.unpack(r.view[off:off + fmt.size].tobytes())

    def pack(self, fmt: struct.Struct, gpa: int, *values: int) -> None:
        """Packed aside, then copied in: ``pack_into`` zero-fills the fields before it writes
        them a byte at a time, which a vCPU reading at that moment would see."""
        r, off = self._find(gpa, fmt.size)
        r.view[off:off + fmt.size] = fmt.pack(*values)

    def read_u32(self, gpa: int) -> int:
        return self.unpack(_U32, gpa)[0]

    def read_u64(self, gpa: int) -> int:
        return self.unpack(_U64, gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        self.pack(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.pack(_U64, gpa, value)

    # -- pages and atomics (the Xen layer's shared words) ---------------------
    def page(self, gfn: int) -> memoryview:
        """A zero-copy view of the 4 KiB guest frame ``gfn`` (GuestMemoryError if not backed)."""
        if not 0 <= gfn < MAX_GPA >> 12:
            raise GuestMemoryError(gfn << 12 if gfn >= 0 else 0, PAGE_SIZE, "frame number out of range")
        return self.view(gfn << 12, PAGE_SIZE)

    # -- lookups -------------------------------------------------------------
    def region_at(self, gpa: int) -> Region | None:
        """The region that holds ``gpa``, or None (MMIO, the holes, beyond the top)."""
        i = bisect.bisect(self._starts, gpa) - 1
        if gpa < 0 or i < 0:
            return None
        r = self._regions[i]
        return r if gpa < r.end else None

    def ram_regions(self) -> tuple[Region, ...]:
        """The RAM regions, lowest first (they never change after construction)."""
        return tuple(r for r in self._regions if r.ram)

    def top_of_ram(self) -> int:
        """The GPA just past the highest RAM byte."""
        return max(r.end for r in self._regions if r.ram)

    def top_of_regions(self) -> int:
        """The GPA just past the highest backed byte, RAM or run-time region (XENMEM_maximum_gpfn)."""
        return self._regions[-1].end

    def is_ram(self, gpa: int) -> bool:
        """True if ``gpa`` is in a RAM region (not the special pages, grant frames or MMIO)."""
        try:
            r, _ = self._find(gpa, 1)
        except GuestMemoryError:
            return False
        return r.ram

    def _ptr(self, gpa: int, align: int):
        """A ``char *`` to the ``align``-byte word at ``gpa`` (4 or 8: inside one region).

        Pointers are cached by address (the Xen layer hits the same few words of
        shared_info, vcpu_info and the FIFO pages on every event); the cache is
        dropped when a region leaves.
        """
        ptr = self._ptrs.get(gpa)
        if ptr is None:
            if gpa & (align - 1):
                raise GuestMemoryError(gpa, align, f"not {align}-byte aligned")
            r, off = self._find(gpa, 8 if gpa & 7 == 0 else 4)
            if len(self._ptrs) >= 4096:
                self._ptrs.clear()
            ptr = self._ptrs[gpa] = r.host_ptr + off
        return ptr

    def test_and_set_bit(self, gpa: int, bit: int) -> bool:
        """Atomically set bit ``bit`` (LSB first) of the bitmap at ``gpa``; its old value."""
        if bit < 0:
            raise GuestMemoryError(gpa, 8, f"bit {bit}")
        byte = gpa + (bit >> 3)
        word = byte & ~7
        ptr = self._ptrs.get(word) or self._ptr(word, 8)
        return _test_and_set(ptr, (byte & 7) << 3 | bit & 7) != 0

    def test_and_clear_bit(self, gpa: int, bit: int) -> bool:
        """Atomically clear bit ``bit`` (LSB first) of the bitmap at ``gpa``; its old value."""
        if bit < 0:
            raise GuestMemoryError(gpa, 8, f"bit {bit}")
        byte = gpa + (bit >> 3)
        word = byte & ~7
        ptr = self._ptrs.get(word) or self._ptr(word, 8)
        return _test_and_clear(ptr, (byte & 7) << 3 | bit & 7) != 0

    def u32_ptr(self, gpa: int):
        """A cffi ``uint32_t *`` to the aligned 32-bit word at ``gpa`` (bounds-checked once)."""
        if gpa % 4:
            raise GuestMemoryError(gpa, 4, "not 4-byte aligned")
        return ffi.cast("uint32_t *", self.host_address(gpa, 4))

    def cptr(self, gpa: int, length: int):
        """A C ``char *`` to ``length`` guest bytes at ``gpa``, for C helpers that run on every event.

        Taken once (when the guest places shared_info, a vcpu_info, a grant
        frame) instead of a lookup by address per access.  The pointer holds
        its region's mapping: after the region leaves (``generation`` changed)
        it is stale and must be dropped, but a write through it still lands in
        host memory that stays mapped until the pointer goes, never in freed
        memory.
        """
        r, off = self._find(gpa, length)
        owner = ffi.from_buffer(r.mm)      # holds r.mm (not a memoryview: those break GC of cycles)
        return ffi.gc(ffi.cast("char *", owner) + r.base + off, _keep_mapped(owner))

    def test_bit(self, gpa: int, bit: int) -> bool:
        """Bit ``bit`` (LSB first) of the bitmap at ``gpa`` (an atomic byte load)."""
        if bit < 0:
            raise GuestMemoryError(gpa, 8, f"bit {bit}")
        byte = gpa + (bit >> 3)
        word = byte & ~7
        ptr = self._ptrs.get(word) or self._ptr(word, 8)
        return _klib.xk_test_bit(ptr, (byte & 7) << 3 | bit & 7) != 0

    def atomic_or32(self, gpa: int, bits: int) -> int:
        """Atomically OR ``bits`` into the aligned u32 at ``gpa``; the old value."""
        return _fetch_or32(self._ptrs.get(gpa) or self._ptr(gpa, 4), bits & 0xFFFFFFFF)

    def atomic_and32(self, gpa: int, bits: int) -> int:
        """Atomically AND ``bits`` into the aligned u32 at ``gpa``; the old value."""
        return _fetch_and32(self._ptrs.get(gpa) or self._ptr(gpa, 4), bits & 0xFFFFFFFF)

    def cmpxchg32(self, gpa: int, expected: int, desired: int) -> tuple[bool, int]:
        """Atomically replace the aligned u32 at ``gpa`` by ``desired`` iff it is ``expected``.

        Returns (swapped, the value found).
        """
        word = self._ptrs.get(gpa) or self._ptr(gpa, 4)
        cell = getattr(self._tls, "cell", None)
        if cell is None:
            cell = self._tls.cell = ffi.new("uint32_t *")
        cell[0] = expected & 0xFFFFFFFF
        ok = _klib.xk_cmpxchg32(word, cell, desired & 0xFFFFFFFF)
        return bool(ok), cell[0]

    def xchg8(self, gpa: int, value: int) -> int:
        """Store byte ``value`` at ``gpa`` atomically; the old byte (vcpu_info's upcall_pending)."""
        return _klib.xk_xchg8(ffi.cast("void *", self.host_address(gpa, 1)), value & 0xFF)

    @staticmethod
    def barrier() -> None:
        """A full memory fence, between the writes of a version-protected guest struct."""
        _klib.xk_mb()

    # -- map ---------------------------------------------------------------
    def e820(self) -> list[E820Entry]:
        """The RAM map a guest is told about (the legacy BIOS hole reserved)."""
        entries = [
            E820Entry(0, LEGACY_HOLE[0], E820Type.RAM),
            E820Entry(LEGACY_HOLE[0], LEGACY_HOLE[1] - LEGACY_HOLE[0], E820Type.RESERVED),
        ]
        low = min(self.ram_size, LOW_RAM_TOP)
        entries.append(E820Entry(LEGACY_HOLE[1], low - LEGACY_HOLE[1], E820Type.RAM))
        if self.ram_size > low:
            entries.append(E820Entry(HIGH_RAM_BASE, self.ram_size - low, E820Type.RAM))
        entries += [E820Entry(r.gpa, r.size, E820Type.RESERVED) for r in self._regions if r.reserved]
        return sorted(entries, key=lambda e: e.addr)


def _keep_mapped(owner) -> Callable[[object], None]:
    """A no-op destructor for ``ffi.gc`` that holds ``owner`` (the region's buffer) while the pointer lives."""
    return lambda _ptr: owner and None


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_M32 = 0xFFFF_FFFF
