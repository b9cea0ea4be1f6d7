"""The PCI bus: mechanism #1 through the port bus, the host bridge, config masks, BAR sizing and moves."""
from __future__ import annotations

import random

import pytest

from xenkvm.machine.devices.bus import PortBus
from xenkvm.machine.devices.pci import (CONFIG_ADDRESS, CONFIG_DATA, ENABLE, IO_WINDOW, BarKind, Command,
                                        PciBus, PciDevice, Reg)


class Recorder(PciDevice):
    def __init__(self):
        super().__init__(0x1234, 0x5678, 0x020000, revision=3, subsystem_vendor=0xAAAA, subsystem=0xBBBB,
                         interrupt_pin=1, name="rec")
        self.add_bar(0, 0x100, BarKind.IO)
        self.add_bar(1, 16 << 20, BarKind.MEM32, prefetchable=True)
        self.add_bar(2, 1 << 20, BarKind.MEM64)
        self.moves = []
        self.io = []

    def bar_moved(self, index, old, new):
        self.moves.append((index, old, new))

    def io_read(self, index, offset, size):
        return 0xA0 + offset

    def io_write(self, index, offset, size, value):
        self.io.append((index, offset, size, value))


@pytest.fixture
def ports():
    return PortBus()


@pytest.fixture
def pci(ports):
    return PciBus(ports)


def addr(slot, reg, fn=0, bus=0):
    return ENABLE | bus << 16 | slot << 11 | fn << 8 | reg


def cfg_read(ports, slot, reg, size=4, fn=0):
    ports.write(CONFIG_ADDRESS, 4, addr(slot, reg & 0xFC, fn))
    return ports.read(CONFIG_DATA + (reg & 3), size)


def cfg_write(ports, slot, reg, size, value, fn=0):
    ports.write(CONFIG_ADDRESS, 4, addr(slot, reg & 0xFC, fn))
    ports.write(CONFIG_DATA + (reg & 3), size, value)


def test_address_register_reads_back_only_as_dword(ports, pci):
    ports.write(CONFIG_ADDRESS, 4, 0x8000_0000)
    assert ports.read(CONFIG_ADDRESS, 4) == 0x8000_0000          # Linux's pci_check_type1
    ports.write(CONFIG_ADDRESS, 2, 0x1234)                       # ignored, as QEMU does
    ports.write(0xCFB, 1, 0x01)                                  # Linux's probe write: nobody's port
    assert ports.read(CONFIG_ADDRESS, 4) == 0x8000_0000
    assert ports.read(CONFIG_ADDRESS, 1) == 0xFF


def test_reset_control_port_still_free_for_power(ports):
    PciBus(ports)
    ports.register(0xCF9, 1, object())      # the PIIX reset register between the two: not claimed


def test_host_bridge(ports, pci):
    assert cfg_read(ports, 0, Reg.VENDOR_ID, 2) == 0x8086
    assert cfg_read(ports, 0, Reg.DEVICE_ID, 2) == 0x1237
    assert cfg_read(ports, 0, 0x0A, 2) == 0x0600                 # what pci_sanity_check looks for
    assert cfg_read(ports, 0, Reg.HEADER_TYPE, 1) == 0
    assert cfg_read(ports, 0, 0, 4) == 0x1237_8086


def test_empty_slots_other_functions_buses_and_disabled_read_ones(ports, pci):
    assert cfg_read(ports, 5, 0, 4) == 0xFFFF_FFFF
    assert cfg_read(ports, 5, 0, 2) == 0xFFFF
    assert cfg_read(ports, 0, 0, 4, fn=1) == 0xFFFF_FFFF
    ports.write(CONFIG_ADDRESS, 4, addr(0, 0, bus=1))
    assert ports.read(CONFIG_DATA, 4) == 0xFFFF_FFFF
    ports.write(CONFIG_ADDRESS, 4, 0)                            # enable bit clear
    assert ports.read(CONFIG_DATA, 4) == 0xFFFF_FFFF
    ports.write(CONFIG_ADDRESS, 4, addr(0, 0) | 0x0100_0000)     # AMD extended-register bits
    assert ports.read(CONFIG_DATA, 4) == 0xFFFF_FFFF
    cfg_write(ports, 5, Reg.COMMAND, 2, 0xFFFF)                  # dropped, no crash


def test_byte_and_word_accesses_at_data_offsets(ports, pci):
    d = pci.add(3, Recorder())
    assert cfg_read(ports, 3, 0x00, 1) == 0x34 and cfg_read(ports, 3, 0x01, 1) == 0x12
    assert cfg_read(ports, 3, 0x02, 2) == 0x5678 and cfg_read(ports, 3, 0x03, 1) == 0x56
    assert cfg_read(ports, 3, Reg.REVISION, 4) == 0x0200_0003
    assert cfg_read(ports, 3, Reg.SUBSYSTEM_VENDOR, 4) == 0xBBBB_AAAA
    assert cfg_read(ports, 3, Reg.INTERRUPT_PIN, 1) == 1
    cfg_write(ports, 3, Reg.INTERRUPT_LINE, 1, 11)
    assert cfg_read(ports, 3, Reg.INTERRUPT_LINE, 2) == 0x010B   # line written, pin read-only
    cfg_write(ports, 3, Reg.INTERRUPT_LINE, 2, 0xFFFF)
    assert cfg_read(ports, 3, Reg.INTERRUPT_PIN, 1) == 1
    assert d.config[Reg.INTERRUPT_LINE] == 0xFF


def test_read_only_fields_and_command_mask(ports, pci):
    pci.add(3, Recorder())
    for reg in (Reg.VENDOR_ID, Reg.REVISION, Reg.HEADER_TYPE - 2, Reg.SUBSYSTEM_VENDOR, Reg.CAPABILITIES, Reg.ROM):
        before = cfg_read(ports, 3, reg, 4)
        cfg_write(ports, 3, reg, 4, 0xFFFF_FFFF)
        cfg_write(ports, 3, reg, 4, 0)
        after = cfg_read(ports, 3, reg, 4)
        if reg == Reg.HEADER_TYPE - 2:       # cache line and latency are writable, header type/BIST not
            assert after & 0xFFFF_0000 == before & 0xFFFF_0000
        else:
            assert after == before, hex(reg)
    cfg_write(ports, 3, Reg.COMMAND, 4, 0xFFFF_FFFF)
    assert cfg_read(ports, 3, Reg.COMMAND, 2) == int(Command.IO | Command.MEMORY | Command.MASTER | Command.PARITY
                                                     | Command.SERR | Command.INTX_DISABLE)
    assert cfg_read(ports, 3, Reg.STATUS, 2) == 0                # status read-only here
    assert cfg_read(ports, 3, Reg.ROM, 4) == 0                   # no expansion ROM: sizes to 0


def test_bar_sizing(ports, pci):
    pci.add(3, Recorder())
    for index, want in ((0, 0xFFFF_FF01), (1, 0xFF00_0008), (2, 0xFFF0_0004), (3, 0xFFFF_FFFF), (4, 0), (5, 0)):
        off = Reg.BAR0 + 4 * index
        cfg_write(ports, 3, off, 4, 0xFFFF_FFFF)
        got = cfg_read(ports, 3, off, 4)
        if index == 3:      # the upper half of the 64-bit BAR2: all address bits writable
            assert got == 0xFFFF_FFFF
        else:
            assert got == want, (index, hex(got))
    for index in range(6):
        cfg_write(ports, 3, Reg.BAR0 + 4 * index, 4, 0)
    assert cfg_read(ports, 3, Reg.BAR0, 4) == 0x1                # type bits stay
    assert cfg_read(ports, 3, Reg.BAR0 + 4, 4) == 0x8
    assert cfg_read(ports, 3, Reg.BAR0 + 8, 4) == 0x4


def test_bar_moves_follow_decode_enable(ports, pci):
    d = pci.add(3, Recorder())
    cfg_write(ports, 3, Reg.BAR0 + 4, 4, 0xE123_4567)            # unaligned: low bits dropped
    assert d.bar_address(1) == 0xE100_0000 and d.moves == []     # memory decode still off
    cfg_write(ports, 3, Reg.COMMAND, 2, Command.MEMORY)
    assert d.moves == [(1, None, 0xE100_0000)]
    cfg_write(ports, 3, Reg.BAR0 + 4, 4, 0xF000_0000)
    assert d.moves[-1] == (1, 0xE100_0000, 0xF000_0000)
    cfg_write(ports, 3, Reg.BAR0 + 4, 4, 0xFFFF_FFFF)            # sizing with decode on: unmapped
    assert d.moves[-1] == (1, 0xF000_0000, None)
    cfg_write(ports, 3, Reg.BAR0 + 4, 4, 0xF000_0000)
    cfg_write(ports, 3, Reg.BAR0 + 8, 4, 0x0)                    # 64-bit BAR2 above 4 GiB
    cfg_write(ports, 3, Reg.BAR0 + 12, 4, 0x1)
    assert d.moves[-1] == (2, None, 0x1_0000_0000)
    cfg_write(ports, 3, Reg.COMMAND, 2, 0)
    assert {m[0] for m in d.moves[-2:]} == {1, 2} and all(m[2] is None for m in d.moves[-2:])


def test_io_bar_decoded_in_the_window(ports, pci):
    d = pci.add(3, Recorder())
    base = IO_WINDOW[0] + 0x100
    cfg_write(ports, 3, Reg.BAR0, 4, base)
    assert ports.read(base + 4, 1) == 0xFF                       # I/O decode off
    cfg_write(ports, 3, Reg.COMMAND, 2, Command.IO)
    assert d.moves == [(0, None, base)]
    assert ports.read(base + 4, 1) == 0xA4
    ports.write(base + 8, 2, 0x1234)
    assert d.io == [(0, 8, 2, 0x1234)]
    assert ports.read(base + 0xFF, 2) == 0xFFFF                  # straddles the BAR's end
    assert ports.read(IO_WINDOW[0], 4) == 0xFFFF_FFFF            # nothing there
    cfg_write(ports, 3, Reg.BAR0, 4, 0x100)                      # moved outside the window: not decoded
    assert ports.read(base + 4, 1) == 0xFF


def test_registry_errors(pci):
    with pytest.raises(ValueError):
        pci.add(0, Recorder())                                   # the host bridge's slot
    with pytest.raises(ValueError):
        pci.add(32, Recorder())
    d = PciDevice(1, 2, 0)
    with pytest.raises(ValueError):
        d.add_bar(0, 3, BarKind.IO)
    with pytest.raises(ValueError):
        d.add_bar(6, 16, BarKind.MEM32)
    with pytest.raises(ValueError):
        d.add_bar(5, 16, BarKind.MEM64)
    with pytest.raises(ValueError):
        d.add_bar(0, 16, BarKind.IO, prefetchable=True)
    d.add_bar(0, 16, BarKind.MEM64)
    with pytest.raises(ValueError):
        d.add_bar(1, 16, BarKind.MEM32)
    assert pci.find(0x8086, 0x1237) == (0, pci.slots[0])
    assert pci.find(1, 2) is None


def test_no_bus_without_ports():
    bus = PciBus(None, host_bridge=False)
    assert bus.slots == {}
    bus.address = addr(0, 0)
    assert bus.data_read(0, 4) == 0xFFFF_FFFF


def test_hostile_offsets_and_sizes(ports, pci):
    d = pci.add(3, Recorder())
    ports.write(CONFIG_ADDRESS, 4, addr(3, 0xFC))
    assert ports.read(CONFIG_DATA + 3, 4) == 0xFFFF_FF00 | d.config[0xFF]   # past 256 bytes: ones
    ports.write(CONFIG_DATA + 3, 4, 0)                           # no IndexError
    for size in (0, 3, 5, 8, -1):
        assert pci.data_read(0, size) == ((1 << 8 * size) - 1 if size > 0 else 0)
        pci.data_write(0, size, 0xFFFF)
    assert pci.data_read(4, 4) == 0xFFFF_FFFF and pci.data_read(-1, 1) == 0xFF
    rng = random.Random(7)
    for _ in range(3000):        # garbage everywhere: never raises, host bridge ids intact
        ports.write(CONFIG_ADDRESS, 4, rng.getrandbits(32))
        size = rng.choice((1, 2, 4))
        port = CONFIG_DATA + rng.randrange(4)
        if rng.random() < 0.5:
            ports.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= ports.read(port, size) < 1 << 8 * size
    assert cfg_read(ports, 0, 0, 4) == 0x1237_8086
    assert cfg_read(ports, 3, 0, 4) == 0x5678_1234
