"""ACPI tables for the guest: RSDP, XSDT/RSDT, FADT, FACS, DSDT (\\_S5, \\_SB.PCI0) and MADT.

Written into guest memory at ``layout.ACPI_BASE`` (inside the reserved legacy
hole, so the RSDP is also found by the 0xE0000..0xFFFFF scan).  There is no
system header for ACPI, so the layouts below are ``struct.Struct``s written from
the ACPI specification (6.x) and tested against its sizes and offsets.

The platform is a PC without a BIOS: a PM1a event/control block and PM timer
at ``layout.PM_BASE`` (FADT, not hardware-reduced), power-off by writing
SLP_TYP 5 | SLP_EN to PM1a_CNT (the DSDT's \\_S5 package), reset through the
FADT reset register at ``layout.RESET_PORT``, one local APIC per vCPU and one
IOAPIC (MADT).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from xenkvm.machine import layout
from xenkvm.machine.devices.pci import CONFIG_ADDRESS, IO_WINDOW, MEM_WINDOW
from xenkvm.machine.memory import GuestMemory

log = logging.getLogger(__name__)

OEM_ID = b"XENKVM"
OEM_TABLE_ID = b"XENKVM  "
OEM_REVISION = 1
CREATOR_ID = b"XKVM"
CREATOR_REVISION = 1
SCI_IRQ = 9
#: Largest vCPU count: APIC IDs 0..n-1 plus the IOAPIC's ID n must stay below 0xFF (broadcast).
MAX_VCPUS = 254

# ---- layouts (ACPI 6.x; all little-endian, packed) --------------------------
#: RSDP (5.2.5.3): signature, checksum, OEMID, revision, RsdtAddress, Length,
#: XsdtAddress, extended checksum, reserved.  36 bytes; the v1 checksum covers 20.
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_V1_LEN = 20
#: System description table header (5.2.6): 36 bytes.
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_CHECKSUM_OFFSET = 9
#: Generic Address Structure (5.2.3.2): space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
#: FADT body after the header, revision 6 (5.2.9, Table 5.9): 276 bytes in all.
FADT_BODY = struct.Struct(
    "<II"        # FIRMWARE_CTRL, DSDT                                   @36
    "BBH"        # reserved (INT_MODEL), Preferred_PM_Profile, SCI_INT     @44
    "IBBBB"      # SMI_CMD, ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT @48
    "IIIIIIII"   # PM1a/b_EVT, PM1a/b_CNT, PM2_CNT, PM_TMR, GPE0, GPE1 blocks @56
    "BBBBBBBB"   # PM1_EVT_LEN .. GPE1_BASE, CST_CNT                       @88
    "HHHH"       # P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE        @96
    "BBBBB"      # DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY     @104
    "HxI"        # IAPC_BOOT_ARCH, reserved, Flags                         @109
    "12sBHB"     # RESET_REG, RESET_VALUE, ARM_BOOT_ARCH, minor version    @116
    "QQ"         # X_FIRMWARE_CTRL, X_DSDT                                 @132
    "12s12s12s12s12s12s12s12s"  # X_PM1a_EVT .. X_GPE1 blocks              @148
    "12s12sQ"    # SLEEP_CONTROL_REG, SLEEP_STATUS_REG, hypervisor vendor  @244
)
FADT_REVISION = 6
FADT_MINOR = 0
#: FACS (5.2.10): signature, length, hw signature, waking vector, global lock,
#: flags, X waking vector, version, reserved, OSPM flags, reserved.  64 bytes.
FACS = struct.Struct("<4sIIIIIQB3xI24x")
FACS_VERSION = 2
#: MADT body (5.2.12): local APIC address, flags.
MADT_BODY = struct.Struct("<II")
MADT_REVISION = 5
#: MADT entries (5.2.12.2, .3, .5): type, length, ...
MADT_LAPIC = struct.Struct("<BBBBI")           # processor UID, APIC ID, flags
MADT_IOAPIC = struct.Struct("<BBBxII")         # IOAPIC ID, reserved, address, GSI base
MADT_ISO = struct.Struct("<BBBBIH")            # bus, source IRQ, GSI, MPS INTI flags


class AddressSpace(IntEnum):
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(IntEnum):
    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


class FadtFlags(IntFlag):
    WBINVD = 1 << 0
    WBINVD_FLUSH = 1 << 1
    PROC_C1 = 1 << 2
    P_LVL2_UP = 1 << 3
    PWR_BUTTON = 1 << 4
    SLP_BUTTON = 1 << 5
    FIX_RTC = 1 << 6
    RTC_S4 = 1 << 7
    TMR_VAL_EXT = 1 << 8
    RESET_REG_SUP = 1 << 10
    HW_REDUCED_ACPI = 1 << 20


class BootArch(IntFlag):
    """FADT IAPC_BOOT_ARCH flags."""

    LEGACY_DEVICES = 1 << 0
    I8042 = 1 << 1
    VGA_NOT_PRESENT = 1 << 2
    MSI_NOT_SUPPORTED = 1 << 3


class MadtType(IntEnum):
    LOCAL_APIC = 0
    IO_APIC = 1
    INTERRUPT_OVERRIDE = 2


class MadtFlags(IntFlag):
    PCAT_COMPAT = 1


class LapicFlags(IntFlag):
    ENABLED = 1


class MpsInti(IntFlag):
    """Interrupt source override polarity (bits 0-1) and trigger mode (bits 2-3)."""

    CONFORMS = 0
    ACTIVE_HIGH = 0b01
    ACTIVE_LOW = 0b11
    EDGE = 0b01 << 2
    LEVEL = 0b11 << 2


#: DSDT body: the one AML object ``Name (_S5, Package () { 5, 5, 0, 0 })``.
#: Derived from the AML grammar (ACPI 6.x, section 20.2):
#:   DefName    := NameOp NameString DataRefObject; NameOp = 0x08
#:   NameString := NameSeg "_S5_" (4 chars, '_'-padded) = 5F 53 35 5F
#:   DefPackage := PackageOp PkgLength NumElements PackageElementList; PackageOp = 0x12
#:   PkgLength  := one byte (value < 64) counting itself and what follows in the
#:                 package: 1 (PkgLength) + 1 (NumElements) + 2 + 2 + 1 + 1 = 8
#:   NumElements = 0x04
#:   5 -> ByteConst := BytePrefix 0x0A, 0x05   (SLP_TYPa for PM1a_CNT)
#:   5 -> 0x0A 0x05                          (SLP_TYPb)
#:   0 -> ZeroOp 0x00, 0 -> ZeroOp 0x00       (reserved)
S5_AML = bytes([
    0x08, 0x5F, 0x53, 0x35, 0x5F,
    0x12, 0x08, 0x04,
    0x0A, layout.SLP_TYP_S5, 0x0A, layout.SLP_TYP_S5, 0x00, 0x00,
])


class AcpiError(ValueError):
    """ACPI tables that cannot be built as asked (bad vCPU count, no room)."""


# ---- AML for \_SB.PCI0 (ACPI 6.x, section 20.2 grammar; 6.4 resource descriptors) ----------
def aml_pkg_length(content: int) -> bytes:
    """PkgLength (20.2.4) of a package whose bytes after the PkgLength number ``content``.

    The encoded value counts the PkgLength bytes too: one byte up to 63, else a lead
    byte (count of following bytes in bits 7:6, low nibble) and 1..3 more bytes.
    """
    if content + 1 < 0x40:
        return bytes([content + 1])
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise AcpiError(f"AML package of {content} bytes is too long")


def aml_integer(value: int) -> bytes:
    """ZeroOp, OneOp or the smallest of Byte/Word/DWord/QWordConst."""
    if value in (0, 1):
        return bytes([value])
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if value < 1 << 8 * size:
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AcpiError(f"AML integer {value:#x} does not fit in 64 bits")


def aml_eisa_id(text: str) -> bytes:
    """EisaId("PNP0A03"): DWordConst of three 5-bit letters and a 16-bit product, big-endian."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    vendor = letters[0] << 10 | letters[1] << 5 | letters[2]
    return b"\x0C" + vendor.to_bytes(2, "big") + int(text[3:], 16).to_bytes(2, "big")


def aml_name(seg: bytes, data: bytes) -> bytes:
    return b"\x08" + seg + data                                     # NameOp NameSeg DataRefObject


def aml_scope(path: bytes, body: bytes) -> bytes:
    return b"\x10" + aml_pkg_length(len(path) + len(body)) + path + body          # ScopeOp


def aml_device(seg: bytes, body: bytes) -> bytes:
    return b"\x5B\x82" + aml_pkg_length(len(seg) + len(body)) + seg + body       # ExtOpPrefix DeviceOp


def aml_buffer(data: bytes) -> bytes:
    size = aml_integer(len(data))
    return b"\x11" + aml_pkg_length(len(size) + len(data)) + size + data         # BufferOp


#: Address space descriptor general flags: producer, MinFixed | MaxFixed, positive decode
_PRODUCER_FIXED = 0x0C


def res_word_address(kind: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    """Word Address Space Descriptor (6.4.3.5.3): kind 1 = I/O, 2 = bus numbers."""
    length = maximum - minimum + 1
    return b"\x88" + struct.pack("<HBBBHHHHH", 13, kind, _PRODUCER_FIXED, type_flags, 0, minimum, maximum, 0, length)


def res_dword_memory(minimum: int, maximum: int) -> bytes:
    """DWord Address Space Descriptor (6.4.3.5.2), memory, cacheable, read-write."""
    length = maximum - minimum + 1
    return b"\x87" + struct.pack("<HBBBIIIII", 23, 0, _PRODUCER_FIXED, 0x03, 0, minimum, maximum, 0, length)


def res_io(minimum: int, maximum: int, align: int, length: int) -> bytes:
    """I/O Port Descriptor (6.4.2.5), 16-bit decode."""
    return b"\x47\x01" + struct.pack("<HHBB", minimum, maximum, align, length)


RES_END = b"\x79\x00"                 #: End Tag, checksum 0 ("treated as correct")


def pci0_aml() -> bytes:
    """``Scope (\\_SB) { Device (PCI0) { _HID PNP0A03, _UID 0, _CRS } }``: the PCI root bridge.

    Linux with ACPI enumerates PCI only through PNP0A03/PNP0A08 devices (its
    ``pci_acpi_init`` replaces the legacy bus scan unless ``pci=noacpi``/``acpi=noirq``),
    and claims BARs only inside the root bridge's _CRS windows: bus 0-255, the
    config ports 0xCF8-0xCFF consumed, I/O 0-0xCF7 (legacy, as QEMU's pc) and the
    bus's I/O window, the 32-bit memory window (``devices/pci.py``).  No _PRT: INTx
    routing falls back to the interrupt line register (Xen guests use the event-channel
    vector callback, not the platform device's INTx).
    """
    crs = (res_word_address(2, 0, 0, 0xFF)
           + res_io(CONFIG_ADDRESS, CONFIG_ADDRESS, 1, 8)
           + res_word_address(1, 0x03, 0, CONFIG_ADDRESS - 1)
           + res_word_address(1, 0x03, IO_WINDOW[0], IO_WINDOW[0] + IO_WINDOW[1] - 1)
           + res_dword_memory(MEM_WINDOW[0], MEM_WINDOW[0] + MEM_WINDOW[1] - 1)
           + RES_END)
    body = (aml_name(b"_HID", aml_eisa_id("PNP0A03"))
            + aml_name(b"_UID", aml_integer(0))
            + aml_name(b"_CRS", aml_buffer(crs)))
    return aml_scope(b"_SB_", aml_device(b"PCI0", body))    # at the root: _SB_ is \\_SB_ (as iasl writes it)


@dataclass(frozen=True)
class AcpiTables:
    """Where the tables went: RSDP address and, per signature, (gpa, length)."""

    rsdp_gpa: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero mod 256."""
    return -sum(data) & 0xFF


def gas(space: AddressSpace, bit_width: int, address: int, access: AccessSize = AccessSize.UNDEFINED) -> bytes:
    """A Generic Address Structure."""
    return GAS.pack(space, bit_width, 0, access, address)


def _io(width_bytes: int, port: int) -> bytes:
    return gas(AddressSpace.SYSTEM_IO, width_bytes * 8, port)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (checksummed) + body."""
    length = SDT_HEADER.size + len(body)
    header = SDT_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                             OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(rsdt_gpa: int, xsdt_gpa: int) -> bytes:
    """An RSDP revision 2 with both checksums."""
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, rsdt_gpa, RSDP.size, xsdt_gpa, 0))
    raw[8] = checksum(raw[:RSDP_V1_LEN])
    raw[32] = checksum(raw)
    return bytes(raw)


def dsdt() -> bytes:
    """\\_S5 and the PCI root bridge \\_SB.PCI0 (every machine has the bus: devices/pci.py)."""
    return sdt(b"DSDT", 2, S5_AML + pci0_aml())


def facs() -> bytes:
    """FACS: no waking vector, no global lock owner; needed since we are not hardware-reduced."""
    return FACS.pack(b"FACS", FACS.size, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def fadt(facs_gpa: int, dsdt_gpa: int) -> bytes:
    """FADT revision 6 for the PM block at ``layout.PM_BASE``; SCI on IRQ 9."""
    flags = FadtFlags.WBINVD | FadtFlags.PROC_C1 | FadtFlags.SLP_BUTTON | FadtFlags.RESET_REG_SUP
    reset = gas(AddressSpace.SYSTEM_IO, 8, layout.RESET_PORT, AccessSize.BYTE)
    none = bytes(GAS.size)
    body = FADT_BODY.pack(
        facs_gpa, dsdt_gpa,
        0, 0, SCI_IRQ,
        0, 0, 0, 0, 0,                     # no SMI_CMD: ACPI mode is always on
        layout.PM1A_EVT, 0, layout.PM1A_CNT, 0, 0, layout.PM_TMR, 0, 0,
        4, 2, 0, 4, 0, 0, 0, 0,            # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN, GPE
        101, 1001, 0, 0,                   # C2/C3 latencies above the limits: not supported
        0, 0, 0, 0, 0,
        BootArch.VGA_NOT_PRESENT, int(flags),
        reset, layout.RESET_VALUE, 0, FADT_MINOR,
        0, dsdt_gpa,                       # X_FIRMWARE_CTRL must be 0 when FIRMWARE_CTRL is set
        _io(4, layout.PM1A_EVT), none, _io(2, layout.PM1A_CNT), none, none,
        _io(4, layout.PM_TMR), none, none,
        none, none, 0,
    )
    return sdt(b"FACP", FADT_REVISION, body)


def madt(n_vcpus: int) -> bytes:
    """MADT: one enabled local APIC per vCPU (UID = APIC ID = index), one IOAPIC, ISA overrides."""
    body = bytearray(MADT_BODY.pack(layout.LAPIC_BASE, MadtFlags.PCAT_COMPAT))
    for cpu in range(n_vcpus):
        body += MADT_LAPIC.pack(MadtType.LOCAL_APIC, MADT_LAPIC.size, cpu, cpu, LapicFlags.ENABLED)
    body += MADT_IOAPIC.pack(MadtType.IO_APIC, MADT_IOAPIC.size, n_vcpus, layout.IOAPIC_BASE, 0)
    body += MADT_ISO.pack(MadtType.INTERRUPT_OVERRIDE, MADT_ISO.size, 0, 0, 2, MpsInti.CONFORMS)
    body += MADT_ISO.pack(MadtType.INTERRUPT_OVERRIDE, MADT_ISO.size, 0, SCI_IRQ, SCI_IRQ,
                          MpsInti.ACTIVE_HIGH | MpsInti.LEVEL)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def _pointer_table(signature: bytes, fmt: str, addrs: list[int]) -> bytes:
    return sdt(signature, 1, b"".join(struct.pack(fmt, a) for a in addrs))


class _Writer:
    """Lays tables out one after another in the ACPI area and records where."""

    def __init__(self, mem: GuestMemory):
        self.mem, self.next = mem, layout.ACPI_BASE
        self.placed: dict[str, tuple[int, int]] = {}

    def reserve(self, name: str, length: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) // align * align
        if gpa + length > layout.ACPI_BASE + layout.ACPI_SIZE:
            raise AcpiError(f"ACPI tables do not fit in {layout.ACPI_SIZE:#x} bytes")
        self.next = gpa + length
        self.placed[name] = (gpa, length)
        return gpa

    def put(self, name: str, data: bytes) -> None:
        gpa, length = self.placed[name]
        assert length == len(data), name
        self.mem.write(gpa, data)


def build_acpi(mem: GuestMemory, n_vcpus: int) -> AcpiTables:
    """Write RSDP, XSDT, RSDT, FADT, FACS, DSDT and MADT at ``layout.ACPI_BASE``."""
    if not isinstance(n_vcpus, int) or not 1 <= n_vcpus <= MAX_VCPUS:
        raise AcpiError(f"{n_vcpus!r} vCPUs: need 1..{MAX_VCPUS}")
    w = _Writer(mem)
    mem.fill(layout.ACPI_BASE, layout.ACPI_SIZE, 0)
    rsdp_gpa = w.reserve("RSDP", RSDP.size)
    xsdt_gpa = w.reserve("XSDT", SDT_HEADER.size + 8 * 2)
    rsdt_gpa = w.reserve("RSDT", SDT_HEADER.size + 4 * 2)
    facs_gpa = w.reserve("FACS", FACS.size, align=64)
    tables = {"DSDT": dsdt(), "APIC": madt(n_vcpus)}
    for name, data in tables.items():
        w.reserve(name, len(data))
    tables["FACP"] = fadt(facs_gpa, w.placed["DSDT"][0])
    w.reserve("FACP", len(tables["FACP"]))
    pointed = [w.placed["FACP"][0], w.placed["APIC"][0]]
    tables |= {"XSDT": _pointer_table(b"XSDT", "<Q", pointed),
               "RSDT": _pointer_table(b"RSDT", "<I", pointed),
               "FACS": facs(), "RSDP": rsdp(rsdt_gpa, xsdt_gpa)}
    for name, data in tables.items():
        w.put(name, data)
    log.info("ACPI tables for %d vCPU(s) at %#x..%#x", n_vcpus, layout.ACPI_BASE, w.next)
    return AcpiTables(rsdp_gpa, dict(w.placed))
