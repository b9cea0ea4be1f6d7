"""The Xen platform PCI device and the unplug ports, on a real Xen machine (not running)."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenkvm.config import BootMode, ConfigError, _xen
from xenkvm.machine.devices.pci import CONFIG_ADDRESS, CONFIG_DATA, ENABLE, Reg
from xenkvm.machine.loader import Entry
from xenkvm.xen import platform_pci
from xenkvm.xen.platform_pci import MAGIC, MMIO_BASE, MMIO_SIZE, SLOT, UNPLUG_PORT, PlatformState, Unplug, UnplugPorts
from guestbuild import build_guests


def cfg(m, reg, size=4, value=None):
    m.bus.write(CONFIG_ADDRESS, 4, ENABLE | SLOT << 11 | (reg & 0xFC))
    if value is None:
        return m.bus.read(CONFIG_DATA + (reg & 3), size)
    m.bus.write(CONFIG_DATA + (reg & 3), size, value)
    return None


@pytest.fixture
def platform(xen_machine):
    return platform_pci.attach(xen_machine.xen)


def test_identity(xen_machine, platform):
    m = xen_machine
    assert m.xen.platform is platform
    assert cfg(m, Reg.VENDOR_ID) == 0x0001_5853
    assert cfg(m, Reg.REVISION) == 0xFF80_0001                   # class 0xFF80, prog-if 0, revision 1
    assert cfg(m, Reg.SUBSYSTEM_VENDOR) == 0x0001_5853
    assert cfg(m, Reg.INTERRUPT_PIN, 1) == 1
    assert cfg(m, Reg.HEADER_TYPE, 1) == 0
    assert cfg(m, Reg.COMMAND, 2) & 0x3 == 0x3                   # firmware enabled both decoders
    assert cfg(m, Reg.BAR0) == platform_pci.IO_BASE | 1
    assert cfg(m, Reg.BAR0 + 4) == MMIO_BASE | 0x8               # prefetchable 32-bit memory
    assert platform.device.mmio == (MMIO_BASE, MMIO_SIZE)


def test_bar_sizing_and_move(xen_machine, platform):
    m, dev = xen_machine, platform.device
    cfg(m, Reg.COMMAND, 2, 0)
    cfg(m, Reg.BAR0 + 4, 4, 0xFFFF_FFFF)
    assert cfg(m, Reg.BAR0 + 4) == 0xFF00_0008                   # 16 MiB, prefetchable
    cfg(m, Reg.BAR0, 4, 0xFFFF_FFFF)
    assert cfg(m, Reg.BAR0) == 0xFFFF_FF01                       # 256 ports
    cfg(m, Reg.BAR0 + 4, 4, 0xE800_0000)
    cfg(m, Reg.BAR0, 4, platform_pci.IO_BASE)
    cfg(m, Reg.COMMAND, 2, 0x3)
    assert dev.mmio == (0xE800_0000, MMIO_SIZE)
    assert (1, None, 0xE800_0000) in dev.moves


def test_grant_frames_back_pages_of_bar1(xen_machine, platform):
    m = xen_machine
    base_pfn = MMIO_BASE >> 12
    m.xen.gnttab.map_frame(0, base_pfn)
    m.xen.gnttab.map_frame(1, base_pfn + 1)
    assert m.mem.contains(MMIO_BASE, 4096) and m.mem.contains(MMIO_BASE + 4096, 4096)   # one memslot per frame
    m.mem.write(MMIO_BASE + 4096 + 8, b"grant")
    assert m.mem.read(MMIO_BASE + 4096 + 8, 5) == b"grant"
    assert not m.mem.contains(MMIO_BASE + 2 * 4096)              # the rest of the BAR stays a hole
    assert all(e.addr + e.size <= MMIO_BASE or e.addr >= MMIO_BASE + MMIO_SIZE
               for e in m.mem.e820() if e.type == 1)            # never RAM in the map


def test_unplug_protocol_as_linux_runs_it(xen_machine, platform, caplog):
    m, st = xen_machine, platform.state
    caplog.set_level(logging.INFO, logger="xenkvm.xen.platform_pci")
    assert m.bus.read(UNPLUG_PORT, 2) == MAGIC
    assert m.bus.read(UNPLUG_PORT + 2, 1) == 1                   # protocol version
    m.bus.write(UNPLUG_PORT + 2, 2, 3)                           # product: Linux
    m.bus.write(UNPLUG_PORT, 4, 0x0001_0203)                     # driver build
    assert m.bus.read(UNPLUG_PORT, 2) == MAGIC                   # not blacklisted
    m.bus.write(UNPLUG_PORT, 2, Unplug.ALL_IDE_DISKS | Unplug.ALL_NICS | Unplug.AUX_IDE_DISKS)
    assert (st.product, st.build) == (3, 0x0001_0203)
    assert st.unplugged == Unplug.ALL_IDE_DISKS | Unplug.ALL_NICS | Unplug.AUX_IDE_DISKS
    assert "unplug emulated devices 0x7" in caplog.text and "(Linux)" in caplog.text
    for b in b"hello\r\nworld\n":
        m.bus.write(UNPLUG_PORT + 2, 1, b)
    assert st.log_lines == ["hello", "world"]


def test_unplug_ports_hostile():
    st = PlatformState(1)
    ports = UnplugPorts(st)
    for off in range(4):
        for size in (1, 2, 4):
            ports.pio_read(off, size)
            ports.pio_write(off, size, 0xFFFF_FFFF)
    assert ports.pio_read(0, 2) == MAGIC and ports.pio_read(0, 1) == 1
    st.flush_log()
    assert st.log_lines == ["\ufffd"]                          # the 0xFF byte written above
    st.log_lines.clear()
    for _ in range(1000):
        st.log_byte(0x41)
    assert all(len(line) <= platform_pci.LOG_LINE_MAX for line in st.log_lines)
    st.log_byte(0x07)
    st.flush_log()
    assert st.log_lines[-1] == "A" * (1000 % platform_pci.LOG_LINE_MAX) + "?"


def test_bar0_legacy_ports(xen_machine, platform):
    m, st = xen_machine, platform.state
    io = platform_pci.IO_BASE
    m.bus.write(io, 1, 1)
    assert m.bus.read(io, 1) == 1 == st.flags
    m.bus.write(io + 8, 1, ord("x"))
    m.bus.write(io + 8, 1, 0x0A)
    assert st.log_lines == ["x"]
    m.bus.write(io + 4, 4, 1)
    assert st.unplugged == Unplug.ALL_IDE_DISKS | Unplug.ALL_NICS


def test_attached_only_for_hvm(xen_machine):
    m = xen_machine
    assert m.xen.platform is None
    assert m.bus.read(UNPLUG_PORT, 2) == 0xFFFF                  # PVH: nothing at 0x10
    m.xen.cfg = dataclasses.replace(m.xen.cfg, platform_pci=False)
    m.xen.install(Entry(BootMode.PVH, 0, image=b"not an ELF"))
    assert m.xen.platform is None
    m.xen.install(Entry(BootMode.LINUX, 0))
    assert m.xen.platform is not None and m.bus.read(UNPLUG_PORT, 2) == MAGIC


def test_config_field():
    assert _xen({"platform_pci": True}).platform_pci is True
    assert _xen({}).platform_pci is False
    with pytest.raises(ConfigError, match="xen.platform_pci"):
        _xen({"platform_pci": "yes"})


@pytest.mark.kvm
def test_hvm_platform_guest_host_side(tmp_path):
    """guests/xen_hvm_platform.c end to end: the host logs what the guest's unplug protocol said."""
    root = Path(__file__).resolve().parents[2]
    build_guests()
    r = subprocess.run([sys.executable, "-m", "xenkvm", "-v", "run", "guests/xen_hvm_platform.yaml"], cwd=root,
                       capture_output=True, text=True, errors="replace", timeout=120,
                       env={**os.environ, "XENSTORED_PATH": str(tmp_path / "xs.sock")})
    assert r.returncode == 0 and "FAIL" not in r.stdout and ", 0 failed" in r.stdout, r.stdout + r.stderr
    assert "pci 00:02.0 5853:0001 class ff8000" in r.stdout
    assert "unplug emulated devices 0x7" in r.stderr and "product 3 (Linux)" in r.stderr
    assert "platform log: XENKVM-PLATFORM-LOG hello from the guest" in r.stderr
    assert "BAR1 (MMIO) - -> 0xe8000000" in r.stderr
