"""Guest-virtual memory access for hypercall arguments.

Hypercall pointer arguments are guest-virtual (often the guest kernel's
stack), so each access is translated page by page through the vCPU's own
paging (KVM_TRANSLATE), then bounds-checked in guest-physical memory.  Any
failure is ``-EFAULT`` for the guest, never an exception in the VMM.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemory, GuestMemoryError
from xenkvm.xen.abi import XenStruct
from xenkvm.xen.errors import efault

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu

PAGE = 4096
MAX_ACCESS = 1 << 20  #: no single hypercall argument is larger than this


def is_canonical(gva: int) -> bool:
    """48-bit canonical: bits 63..47 all equal (a 32-bit guest's addresses always are)."""
    top = gva >> 47
    return top == 0 or top == (1 << 17) - 1


class GuestVirtual:
    """Reads and writes through one vCPU's current address space (one per hypercall)."""

    def __init__(self, vcpu: "Vcpu", mem: GuestMemory):
        self.vcpu = vcpu
        self.mem = mem
        self._pages: dict[int, int] = {}

    def translate(self, gva: int) -> int:
        page = gva & ~(PAGE - 1)
        gpa_page = self._pages.get(page)
        if gpa_page is None:
            if not 0 <= gva < 1 << 64 or not is_canonical(gva):
                raise efault(f"GVA {gva:#x} is not a canonical address")
            try:
                gpa = self.vcpu.translate(page)
            except OSError:   # KVM_TRANSLATE refused (the binding's KvmError is an OSError)
                gpa = None
            if gpa is None:
                raise efault(f"GVA {gva:#x} is not mapped")
            gpa_page = self._pages[page] = gpa & ~(PAGE - 1)
        return gpa_page | (gva & (PAGE - 1))

    def _chunks(self, gva: int, length: int):
        if length < 0 or length > MAX_ACCESS:
            raise efault(f"access of {length} bytes")
        done = 0
        while done < length:
            addr = gva + done
            n = min(length - done, PAGE - (addr & (PAGE - 1)))
            yield self.translate(addr), done, n
            done += n

    def read(self, gva: int, length: int) -> bytes:
        if 0 < length and (gva & (PAGE - 1)) + length <= PAGE:  # the common case: one page
            try:
                return bytes(self.mem.view(self.translate(gva), length))
            except GuestMemoryError:
                raise efault(f"GVA {gva:#x}+{length} is outside guest RAM") from None
        out = bytearray(length)
        try:
            for gpa, off, n in self._chunks(gva, length):
                out[off:off + n] = self.mem.view(gpa, n)
        except GuestMemoryError:
            raise efault(f"GVA {gva:#x}+{length} is outside guest RAM") from None
        return bytes(out)

    def write(self, gva: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        try:
            for gpa, off, n in self._chunks(gva, len(data)):
                self.mem.view(gpa, n)[:] = data[off:off + n]
        except GuestMemoryError:
            raise efault(f"GVA {gva:#x}+{len(data)} is outside guest RAM") from None

    def read_struct(self, st: XenStruct, gva: int):
        return st.from_bytes(self.read(gva, st.size))

    def write_struct(self, st: XenStruct, gva: int, obj) -> None:
        self.write(gva, st.to_bytes(obj))

    def read_u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def read_u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def write_u32(self, gva: int, value: int) -> None:
        self.write(gva, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, gva: int, value: int) -> None:
        self.write(gva, (value & (1 << 64) - 1).to_bytes(8, "little"))
