"""The Xen platform PCI device (5853:0001) and the emulated-device unplug ports (0x10..0x13).

What an HVM (not PVH) Linux needs from the platform (research/linux.md 4.7):

* **the PCI function** ``drivers/xen/platform-pci.c`` binds to: vendor 0x5853,
  device 0x0001, class 0xFF80 (other, 0x80), subsystem 5853:0001, revision 1,
  interrupt pin A; BAR0 = 256 I/O ports, BAR1 = 16 MiB prefetchable memory.
  The driver takes BAR1's address as ``platform_mmio`` and hands pages of it
  out (``alloc_xen_mmio``) as the gpfns of the grant-table frames
  (``gnttab_setup_auto_xlat_frames``).  BAR1 itself is a hole, as in Xen and
  QEMU: a page of it becomes memory when the guest maps a grant frame there
  (``XENMEM_add_to_physmap``; ``GrantTable.map_frame`` adds a one-page region
  for any gpfn outside RAM).  BAR0 answers QEMU's legacy ports: byte 0 the
  platform flags, a write of 1 at 4 unplugs everything, bytes written at 8 are
  guest log text.
* **the unplug protocol** (Xen ``docs/misc/hvm-emulated-unplug.pandoc``,
  Linux ``arch/x86/xen/platform-pci-unplug.c``): 16-bit read of 0x10 = magic
  0x49D2 (0xD249 would mean "blacklisted": never here); 8-bit read of 0x12 =
  protocol version 1; 16-bit write of 0x12 = product number (Linux: 3); 32-bit
  write of 0x10 = driver build number; 16-bit write of 0x10 = the unplug mask
  (bit 0 all IDE/SCSI disks, 1 all NICs, 2 auxiliary IDE disks, 3 NVMe disks);
  8-bit writes of 0x12 are log characters, a line at a time; 8-bit read/write
  of 0x10 = platform flags.  Without the magic, Linux's
  ``xen_has_pv_devices()`` is false and blkfront/netfront do not load.
  There are no emulated disks or NICs to remove: the request is recorded and logged.

Only for Xen guests in HVM mode: the lead's wiring calls :func:`attach` from
``XenDomain.install`` when ``xen.platform_pci`` is true or the guest boots
through the Linux (bzImage) protocol.  PVH guests never look for it (and port
0x10 stays free for the benchmarks' scratch port on plain machines).
"""
from __future__ import annotations

import logging
from enum import IntFlag
from typing import TYPE_CHECKING

from xenkvm.machine.devices.pci import IO_WINDOW, MEM_WINDOW, BarKind, Command, PciBus, PciDevice, Reg

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

VENDOR = 0x5853
DEVICE = 0x0001
CLASS_CODE = 0xFF8000          #: base class 0xFF (other), subclass 0x80, prog-if 0
REVISION = 1
SLOT = 2                       #: 00:02.0 (where Xen's QEMU usually puts it)
IO_SIZE = 0x100
MMIO_SIZE = 16 << 20
#: where "firmware" puts the BARs (the guest may move them; Linux keeps them inside _CRS)
IO_BASE = IO_WINDOW[0]
MMIO_BASE = 0xF000_0000
assert MEM_WINDOW[0] <= MMIO_BASE and MMIO_BASE + MMIO_SIZE <= MEM_WINDOW[0] + MEM_WINDOW[1]

UNPLUG_PORT = 0x10
UNPLUG_PORTS = 4
MAGIC = 0x49D2
PROTOCOL_VERSION = 1
LOG_LINE_MAX = 256
PRODUCTS = {1: "Citrix Windows PV drivers", 2: "GPLPV Windows drivers", 3: "Linux", 4: "Xen Windows PV drivers"}


class Unplug(IntFlag):
    ALL_IDE_DISKS = 1 << 0     #: all emulated IDE and SCSI disks (not CD drives)
    ALL_NICS = 1 << 1
    AUX_IDE_DISKS = 1 << 2     #: IDE disks except the primary master
    NVME_DISKS = 1 << 3


class PlatformState:
    """What the guest told the platform: shared by the ports at 0x10 and BAR0."""

    def __init__(self, domid: int = 0):
        self.domid = domid
        self.flags = 0                 #: platform flags byte (bit 0: ROM lock; nothing to lock here)
        self.product: int | None = None
        self.build: int | None = None
        self.unplugged = Unplug(0)
        self.unplug_requests: list[int] = []
        self.log_lines: list[str] = []
        self._line = bytearray()

    def unplug(self, mask: int) -> None:
        mask &= 0xFFFF
        self.unplug_requests.append(mask)
        self.unplugged |= Unplug(mask & 0xF)
        names = [u.name.lower() for u in Unplug if mask & u] or ["nothing"]
        log.info("dom%d: unplug emulated devices %#x (%s): none are emulated", self.domid, mask, ", ".join(names))

    def set_product(self, product: int) -> None:
        self.product = product & 0xFFFF
        log.info("dom%d: PV drivers, product %d (%s)", self.domid, self.product,
                 PRODUCTS.get(self.product, "unknown"))

    def log_byte(self, b: int) -> None:
        b &= 0xFF
        if b == 0x0A or len(self._line) >= LOG_LINE_MAX:
            self.flush_log()
            if b == 0x0A:
                return
        if b != 0x0D:
            self._line.append(b)

    def flush_log(self) -> None:
        if self._line:
            text = self._line.decode("ascii", "replace")
            text = "".join(c if c.isprintable() else "?" for c in text)
            self.log_lines.append(text)
            log.info("dom%d platform log: %s", self.domid, text)
            self._line.clear()


class UnplugPorts:
    """I/O ports 0x10..0x13 (register at :data:`UNPLUG_PORT`, length :data:`UNPLUG_PORTS`)."""

    def __init__(self, state: PlatformState):
        self.state = state

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 2:
            return MAGIC                   # never blacklisted (that would read 0xD249)
        if offset == 0 and size == 1:
            return self.state.flags
        if offset == 2 and size == 1:
            return PROTOCOL_VERSION
        return (1 << 8 * size) - 1 if size > 0 else 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            if size == 2:
                self.state.unplug(value)
            elif size == 4:
                self.state.build = value & 0xFFFF_FFFF
                log.debug("dom%d: PV driver build %#x", self.state.domid, self.state.build)
            elif size == 1:
                self.state.flags = value & 0x1
        elif offset == 2:
            if size == 2:
                self.state.set_product(value)
            elif size == 1:
                self.state.log_byte(value)


class XenPlatformDevice(PciDevice):
    """00:02.0: 5853:0001, BAR0 I/O (256 ports), BAR1 prefetchable memory (16 MiB)."""

    def __init__(self, state: PlatformState, *, io_base: int = IO_BASE, mmio_base: int = MMIO_BASE):
        super().__init__(VENDOR, DEVICE, CLASS_CODE, revision=REVISION, subsystem_vendor=VENDOR,
                         subsystem=DEVICE, interrupt_pin=1, name="xen-platform")
        self.state = state
        self.add_bar(0, IO_SIZE, BarKind.IO, address=io_base)
        self.add_bar(1, MMIO_SIZE, BarKind.MEM32, prefetchable=True, address=mmio_base)
        self.moves: list[tuple[int, int | None, int | None]] = []

    def enable_decode(self) -> None:
        """What firmware does after placing the BARs (the bus notices on its next update)."""
        self._set(Reg.COMMAND, 2, self.command | Command.IO | Command.MEMORY)

    @property
    def mmio(self) -> tuple[int, int] | None:
        """(base, size) of the grant-frame window the guest sees now, None while not decoding."""
        base = self.placement.get(1)
        return None if base is None else (base, MMIO_SIZE)

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((index, old, new))
        what = "I/O" if index == 0 else "MMIO"
        log.info("dom%d: xen-platform BAR%d (%s) %s -> %s", self.state.domid, index, what,
                 "-" if old is None else f"{old:#x}", "-" if new is None else f"{new:#x}")
        # BAR1 is a hole: pages become memory only when grant frames are mapped there, and
        # stay where they were mapped if the BAR moves (Xen's p2m does not follow BARs either).

    def io_read(self, index: int, offset: int, size: int) -> int:
        if index == 0 and offset == 0 and size == 1:
            return self.state.flags
        return (1 << 8 * size) - 1

    def io_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != 0:
            return
        if offset == 0 and size == 1:
            self.state.flags = value & 0x1
        elif offset == 4 and value == 1:
            self.state.unplug(Unplug.ALL_IDE_DISKS | Unplug.ALL_NICS)   # the old Windows drivers' way
        elif offset == 8 and size == 1:
            self.state.log_byte(value)


class XenPlatform:
    """The device and the unplug ports of one domain (``domain.platform``)."""

    def __init__(self, state: PlatformState, device: XenPlatformDevice, bus: PciBus):
        self.state = state
        self.device = device
        self.bus = bus


def attach(domain: "XenDomain") -> XenPlatform:
    """Give ``domain``'s machine the platform PCI device (slot 2) and the unplug ports (0x10).

    Call once, before the vCPUs run (``XenDomain.install``), for HVM-mode Xen
    guests only; needs ``machine.pci`` (the PciBus ``Machine._setup_devices`` made).
    The BARs are placed as firmware would (BAR0 at ``IO_BASE``, BAR1 at
    ``MMIO_BASE``) with decoding on; the guest may size and move them.
    """
    machine = domain.machine
    bus: PciBus = machine.pci
    state = PlatformState(domain.domid)
    device = XenPlatformDevice(state)
    device.enable_decode()
    bus.add(SLOT, device)
    machine.register_ports(UNPLUG_PORT, UNPLUG_PORTS, UnplugPorts(state))
    platform = XenPlatform(state, device, bus)
    domain.platform = platform
    log.info("dom%d: Xen platform PCI device at 00:%02x.0 (BAR0 %#x, BAR1 %#x), unplug ports at %#x",
             domain.domid, SLOT, IO_BASE, MMIO_BASE, UNPLUG_PORT)
    return platform
