"""The Xen public ABI: constants as enums, struct layouts from the compiled headers.

``ffi``/``lib`` come from ``_abi_build.py`` (cffi API mode over Debian's
libxen-dev headers), so every offset here is the C compiler's.
"""
from __future__ import annotations

from enum import IntEnum

from xenkvm.xen._xen_cffi import ffi, lib



PAGE_SIZE = lib.XEN_PAGE_SIZE
PAGE_SHIFT = 12
DOMID_SELF = lib.DOMID_SELF


def _enum(name: str, prefix: str, strip: str | None = None) -> type[IntEnum]:
    strip = prefix if strip is None else strip
    members = {n[len(strip):]: getattr(lib, n) for n in dir(lib) if n.startswith(prefix)}
    return IntEnum(name, members)  # type: ignore[return-value]


Hypercall = _enum("Hypercall", "__HYPERVISOR_")
#: Xen errno values (positive); hypercalls return their negation.
Errno = _enum("Errno", "XEN_E", "XEN_")
Virq = _enum("Virq", "VIRQ_")
XenVer = _enum("XenVer", "XENVER_")
MemOp = _enum("MemOp", "XENMEM_")
HvmOp = _enum("HvmOp", "HVMOP_")
HvmParam = IntEnum("HvmParam", {n[len("HVM_PARAM_"):]: getattr(lib, n) for n in dir(lib)
                                if n.startswith("HVM_PARAM_") and "CALLBACK_TYPE" not in n
                                and "CALLBACK_IRQ_TYPE" not in n and n != "HVM_NR_PARAMS"})
VcpuOp = _enum("VcpuOp", "VCPUOP_")
SchedOp = _enum("SchedOp", "SCHEDOP_")
Shutdown = IntEnum("Shutdown", {n[len("SHUTDOWN_"):]: getattr(lib, n) for n in dir(lib)
                                if n.startswith("SHUTDOWN_") and n != "SHUTDOWN_MAX"})
EvtchnOp = _enum("EvtchnOp", "EVTCHNOP_")
EvtchnStat = _enum("EvtchnStat", "EVTCHNSTAT_")
GnttabOp = _enum("GnttabOp", "GNTTABOP_")
Gntst = _enum("Gntst", "GNTST_")
PhysdevOp = _enum("PhysdevOp", "PHYSDEVOP_")

HVM_CALLBACK_VECTOR = lib.HVM_PARAM_CALLBACK_TYPE_VECTOR
HVM_CALLBACK_GSI = lib.HVM_PARAM_CALLBACK_TYPE_GSI
HVM_CALLBACK_PCI_INTX = lib.HVM_PARAM_CALLBACK_TYPE_PCI_INTX
HVM_CALLBACK_TYPE_SHIFT = 56


class XenStruct:
    """Size and field offsets of one ABI struct, for struct-free access to guest memory."""

    def __init__(self, ctype: str):
        self.ctype = ctype
        self.size = ffi.sizeof(ctype)

    def offset(self, field: str) -> int:
        return ffi.offsetof(self.ctype, field)

    def from_bytes(self, data: bytes | bytearray | memoryview):
        """A cdata copy of the struct parsed from ``data`` (exactly ``size`` bytes)."""
        if len(data) != self.size:
            raise ValueError(f"{self.ctype}: need {self.size} bytes, got {len(data)}")
        obj = ffi.new(f"{self.ctype} *")
        ffi.memmove(obj, bytes(data), self.size)
        return obj

    def to_bytes(self, obj) -> bytes:
        return bytes(ffi.buffer(obj, self.size))


def handle_offset(struct: str, field: str) -> int:
    """Offset of a ``XEN_GUEST_HANDLE`` field (exported by the build as a constant)."""
    return getattr(lib, f"XK_OFF_{struct}__{field}")
