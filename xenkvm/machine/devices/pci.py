"""A minimal PCI bus: configuration mechanism #1, a host bridge, type-0 devices with BARs.

Ports (PCI Local Bus 3.0, 3.2.2.3.2): 0xCF8 is CONFIG_ADDRESS (32-bit accesses
only: bit 31 enable, bus 23:16, device 15:11, function 10:8, register 7:2);
0xCFC..0xCFF is CONFIG_DATA (1, 2 or 4 bytes at any of its byte offsets, the
byte offset adding to the register).  Only 0xCF8 itself is claimed for the
address register: a byte access to 0xCF9 is the reset control register
(devices/power.py), as on a PIIX, and byte or word accesses to 0xCF8..0xCFB
(Linux writes 0xCFB while probing) are ignored, as QEMU's host does.

Bus 0 only, function 0 only: a slot with nothing in it, another function, another
bus, or an address without the enable bit reads all-ones and ignores writes.

A device is a 256-byte configuration space with a per-bit write mask (bits
outside it are read-only); BARs are sized the usual way (write all-ones, read
back ``~(size - 1)`` plus the type bits).  The bus tracks where each BAR decodes
(its address while the command register's I/O or memory enable bit is set) and
tells the device through :meth:`PciDevice.bar_moved`.  I/O BARs are decoded by
the bus inside the I/O window (``IO_WINDOW``), which it claims on the PortBus
when the first device with an I/O BAR is added; memory BARs have no decoder
here (the device maps what it needs: the Xen platform device backs pages of its
BAR with grant frames) and unbacked addresses exit as MMIO that reads all-ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

log = logging.getLogger(__name__)

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
CONFIG_SPACE = 256
ENABLE = 1 << 31
#: I/O ports the bus decodes for I/O BARs (below: legacy ISA and 0xCF8..0xCFF; _CRS says the same)
IO_WINDOW = (0xD000, 0x1000)
#: 32-bit memory window for memory BARs: above any low RAM (3 GiB top), below the special pages
MEM_WINDOW = (0xE000_0000, 0xFEB0_0000 - 0xE000_0000)
SLOTS = 32
HOST_BRIDGE_SLOT = 0


class Reg(IntEnum):
    """Type-0 header offsets (PCI Local Bus 3.0, 6.1)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    CLASS_PROG = 0x09          #: programming interface, then subclass (0x0A), class (0x0B)
    CACHE_LINE = 0x0C
    LATENCY = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    SUBSYSTEM_VENDOR = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM = 0x30
    CAPABILITIES = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


#: command bits a guest may set on our devices
COMMAND_WRITABLE = Command.IO | Command.MEMORY | Command.MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE
NUM_BARS = 6


class BarKind(IntEnum):
    IO = 0
    MEM32 = 1
    MEM64 = 2


@dataclass
class Bar:
    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.kind is BarKind.MEM64 else 0x0) | (0x8 if self.prefetchable else 0)

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


class PciDevice:
    """A type-0 function: 256 bytes of configuration space, a write mask, up to six BARs.

    Subclasses override :meth:`bar_moved` (and :meth:`io_read`/:meth:`io_write` for I/O BARs).
    """

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 0, name: str = ""):
        self.name = name or f"{vendor:04x}:{device:04x}"
        self.config = bytearray(CONFIG_SPACE)
        self.wmask = bytearray(CONFIG_SPACE)
        self.bars: dict[int, Bar] = {}
        #: where each BAR decodes now (None: not decoding); kept by the bus
        self.placement: dict[int, int | None] = {}
        self._set(Reg.VENDOR_ID, 2, vendor)
        self._set(Reg.DEVICE_ID, 2, device)
        self._set(Reg.REVISION, 1, revision)
        self._set(Reg.CLASS_PROG, 3, class_code)
        self._set(Reg.SUBSYSTEM_VENDOR, 2, subsystem_vendor)
        self._set(Reg.SUBSYSTEM_ID, 2, subsystem)
        self._set(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        self._set_mask(Reg.COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(Reg.CACHE_LINE, 1, 0xFF)
        self._set_mask(Reg.LATENCY, 1, 0xFF)
        self._set_mask(Reg.INTERRUPT_LINE, 1, 0xFF)

    # -- construction helpers ---------------------------------------------------
    def _set(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = (mask & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def add_bar(self, index: int, size: int, kind: BarKind, *, prefetchable: bool = False,
                address: int = 0) -> Bar:
        """Declare BAR ``index`` (a power of two: >= 4 bytes for I/O, >= 16 for memory).

        ``address`` is where firmware would have put it (0: unassigned).
        """
        if not 0 <= index < NUM_BARS or index in self.bars or (index - 1) in self.bars \
                and self.bars[index - 1].kind is BarKind.MEM64:
            raise ValueError(f"{self.name}: BAR{index} taken or out of range")
        if kind is BarKind.MEM64 and (index + 1 >= NUM_BARS or index + 1 in self.bars):
            raise ValueError(f"{self.name}: a 64-bit BAR{index} needs BAR{index + 1} too")
        least = 4 if kind is BarKind.IO else 16
        limit = 1 << 16 if kind is BarKind.IO else (1 << 31 if kind is BarKind.MEM32 else 1 << 63)
        if size < least or size & (size - 1) or size > limit:
            raise ValueError(f"{self.name}: BAR{index} size {size:#x} is not a power of two in range")
        if prefetchable and kind is BarKind.IO:
            raise ValueError(f"{self.name}: an I/O BAR cannot be prefetchable")
        bar = Bar(index, size, kind, prefetchable)
        self.bars[index] = bar
        off = Reg.BAR0 + 4 * index
        self._set_mask(off, 4, ~(size - 1) & ~(0x3 if bar.is_io else 0xF))
        self._set(off, 4, bar.type_bits | (address & ~(size - 1) & 0xFFFF_FFFF))
        if kind is BarKind.MEM64:
            self._set_mask(off + 4, 4, (~(size - 1)) >> 32)
            self._set(off + 4, 4, (address & ~(size - 1)) >> 32)
        self.placement[index] = None
        return bar

    # -- what the bus reads -------------------------------------------------------
    def bar_address(self, index: int) -> int:
        """The address programmed in BAR ``index`` (type bits removed)."""
        bar = self.bars[index]
        off = Reg.BAR0 + 4 * index
        low = self._get(off, 4)
        if bar.is_io:
            return low & ~0x3
        high = self._get(off + 4, 4) if bar.kind is BarKind.MEM64 else 0
        return (high << 32 | low) & ~0xF

    @property
    def command(self) -> int:
        return self._get(Reg.COMMAND, 2)

    def decoding(self, index: int) -> int | None:
        """Where BAR ``index`` decodes: its address if enabled, sane and not mid-sizing; else None."""
        bar = self.bars[index]
        enabled = self.command & (Command.IO if bar.is_io else Command.MEMORY)
        addr = self.bar_address(index)
        if not enabled or addr == 0:
            return None
        width = 16 if bar.is_io else (64 if bar.kind is BarKind.MEM64 else 32)
        if addr + bar.size > 1 << width or addr == (~(bar.size - 1)) & ((1 << width) - 1) & ~0xF & ~0x3:
            return None     # the all-ones sizing pattern, or a range that wraps: not mapped (as QEMU)
        return addr

    def config_read(self, offset: int, size: int) -> int:
        """``size`` bytes at ``offset``; bytes past the space read as 0xFF."""
        data = bytes(self.config[offset:offset + size]).ljust(size, b"\xff")
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write through the mask, byte by byte; bytes past the space are dropped."""
        for i in range(size):
            at = offset + i
            if at >= CONFIG_SPACE:
                break
            m = self.wmask[at]
            self.config[at] = (self.config[at] & ~m) | ((value >> 8 * i) & m)

    # -- overridables -----------------------------------------------------------------
    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` stopped decoding at ``old`` and decodes at ``new`` now (None: nowhere)."""
        log.debug("%s: BAR%d %s -> %s", self.name, index, _hex(old), _hex(new))

    def io_read(self, index: int, offset: int, size: int) -> int:
        return _ones(size)

    def io_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass


class HostBridge(PciDevice):
    """00:00.0, an Intel 440FX host bridge as QEMU's pc machine (and so Xen HVM guests) show it."""

    def __init__(self) -> None:
        super().__init__(0x8086, 0x1237, 0x060000, revision=0x02, subsystem_vendor=0x1AF4,
                         subsystem=0x1100, name="host-bridge")


class PortBusLike(Protocol):
    def register(self, base: int, length: int, device) -> None: ...


class PciBus:
    """Bus 0 behind configuration mechanism #1; ``add(slot, device)`` populates it."""

    def __init__(self, ports: PortBusLike | None = None, *, host_bridge: bool = True):
        self.address = 0
        self.slots: dict[int, PciDevice] = {}
        self._ports = ports
        self._io_window_claimed = False
        if ports is not None:
            ports.register(CONFIG_ADDRESS, 1, _AddressPort(self))
            ports.register(CONFIG_DATA, 4, _DataPort(self))
        if host_bridge:
            self.add(HOST_BRIDGE_SLOT, HostBridge())

    def add(self, slot: int, device: PciDevice) -> PciDevice:
        if not 0 <= slot < SLOTS:
            raise ValueError(f"PCI slot {slot} out of range 0..{SLOTS - 1}")
        if slot in self.slots:
            raise ValueError(f"PCI slot {slot} is taken by {self.slots[slot].name}")
        self.slots[slot] = device
        if any(b.is_io for b in device.bars.values()) and self._ports is not None and not self._io_window_claimed:
            self._ports.register(IO_WINDOW[0], IO_WINDOW[1], _IoWindow(self))
            self._io_window_claimed = True
        self._update(device)
        log.debug("PCI 00:%02x.0: %s", slot, device.name)
        return device

    def to_state(self) -> dict:
        """The address latch and each function's configuration space (BAR placement follows)."""
        return {"address": self.address, "slots": {str(s): d.config.hex() for s, d in self.slots.items()}}

    def from_state(self, st: dict) -> None:
        """Reload configuration spaces into the same devices (the restored machine made them)."""
        saved = {int(s): bytes.fromhex(c) for s, c in st["slots"].items()}
        if set(saved) != set(self.slots):
            raise ValueError(f"PCI slots {sorted(saved)} saved, {sorted(self.slots)} present")
        self.address = int(st["address"]) & 0xFFFF_FFFF
        for slot, config in saved.items():
            dev = self.slots[slot]
            if len(config) != len(dev.config) or config[:4] != bytes(dev.config[:4]):
                raise ValueError(f"PCI 00:{slot:02x}.0 is not the saved device")
            dev.config[:] = config
            self._update(dev)

    def find(self, vendor: int, device: int) -> tuple[int, PciDevice] | None:
        for slot, d in sorted(self.slots.items()):
            if d.config_read(Reg.VENDOR_ID, 2) == vendor and d.config_read(Reg.DEVICE_ID, 2) == device:
                return slot, d
        return None

    # -- mechanism #1 ---------------------------------------------------------------
    def _target(self) -> tuple[PciDevice, int] | None:
        a = self.address
        if not a & ENABLE or a & 0x7F00_0000:     # disabled, or AMD extended-register bits (no ext space)
            return None
        bus, slot, fn = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7
        if bus != 0 or fn != 0:
            return None
        dev = self.slots.get(slot)
        return None if dev is None else (dev, a & 0xFC)

    def data_read(self, offset: int, size: int) -> int:
        target = self._target()
        if target is None or size not in (1, 2, 4) or not 0 <= offset < 4:
            return _ones(size)
        dev, reg = target
        return dev.config_read(reg + offset, size)

    def data_write(self, offset: int, size: int, value: int) -> None:
        target = self._target()
        if target is None or size not in (1, 2, 4) or not 0 <= offset < 4:
            return
        dev, reg = target
        dev.config_write(reg + offset, size, value & ((1 << 8 * size) - 1))
        self._update(dev)

    def _update(self, dev: PciDevice) -> None:
        """Compare each BAR's decode address with what it was; tell the device about changes."""
        for index in dev.bars:
            new = dev.decoding(index)
            old = dev.placement.get(index)
            if new != old:
                dev.placement[index] = new
                dev.bar_moved(index, old, new)

    # -- the I/O window ------------------------------------------------------------------
    def _io_owner(self, port: int, size: int) -> tuple[PciDevice, int, int] | None:
        for dev in self.slots.values():
            for index, bar in dev.bars.items():
                base = dev.placement.get(index)
                if bar.is_io and base is not None and base <= port and port + size <= base + bar.size:
                    return dev, index, port - base
        return None

    def io_read(self, port: int, size: int) -> int:
        owner = self._io_owner(port, size)
        if owner is None:
            return _ones(size)
        dev, index, off = owner
        return dev.io_read(index, off, size) & _ones(size)

    def io_write(self, port: int, size: int, value: int) -> None:
        owner = self._io_owner(port, size)
        if owner is not None:
            dev, index, off = owner
            dev.io_write(index, off, size, value)


class _AddressPort:
    def __init__(self, bus: PciBus):
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        return self.bus.address if size == 4 else _ones(size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self.bus.address = value & 0xFFFF_FFFF


class _DataPort:
    def __init__(self, bus: PciBus):
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        return self.bus.data_read(offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.bus.data_write(offset, size, value)


class _IoWindow:
    def __init__(self, bus: PciBus):
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        return self.bus.io_read(IO_WINDOW[0] + offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.bus.io_write(IO_WINDOW[0] + offset, size, value)


def _ones(size: int) -> int:
    return (1 << 8 * size) - 1 if size > 0 else 0


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"
