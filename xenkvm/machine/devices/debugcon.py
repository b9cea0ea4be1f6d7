"""The 0xe9 debug console: every byte written appears on the console."""
from __future__ import annotations

from xenkvm.machine.devices.console import ConsoleSink


class DebugCon:
    """Bochs/QEMU-style debug port; reads return 0xe9 so guests can detect it."""

    def __init__(self, sink: ConsoleSink):
        self.sink = sink

    def pio_read(self, offset: int, size: int) -> int:
        return 0xE9

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.sink.write(bytes([value & 0xFF]))
