"""The port-I/O bus: routes a KVM_EXIT_IO to the device owning that port.

Unknown ports behave like an empty ISA bus: reads return all-ones and writes
are dropped, both logged once per port at debug level.
"""
from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class PortDevice(Protocol):
    """A device on the I/O bus; ``offset`` is relative to the base it was registered at."""

    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class PortBus:
    """Maps each port to (device, base); O(1) dispatch per exit."""

    def __init__(self) -> None:
        self._ports: dict[int, tuple[PortDevice, int]] = {}
        self._unknown_seen: set[int] = set()

    def register(self, base: int, length: int, device: PortDevice) -> None:
        for port in range(base, base + length):
            if port in self._ports:
                raise ValueError(f"I/O port {port:#x} registered twice")
            self._ports[port] = (device, base)

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            self._note_unknown(port, "read")
            return (1 << (8 * size)) - 1
        device, base = entry
        return device.pio_read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._note_unknown(port, f"write {value:#x}")
            return
        device, base = entry
        device.pio_write(port - base, size, value)

    def _note_unknown(self, port: int, what: str) -> None:
        if port not in self._unknown_seen:
            self._unknown_seen.add(port)
            log.debug("unclaimed I/O port %#x: %s (further accesses not logged)", port, what)
