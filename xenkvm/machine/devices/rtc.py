"""The MC146818 CMOS RTC at 0x70/0x71: the host's UTC time in BCD, never updating.

Linux reads the wall clock here at boot (and waits while UIP is set, so a bus
that floats to all-ones would stall it).
"""
from __future__ import annotations

import time

REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


class CmosRtc:
    def __init__(self) -> None:
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[REG_A] = 0x26  # 32.768 kHz time base, UIP clear
        self.nvram[REG_B] = 0x02  # 24-hour, BCD, no interrupts
        self.nvram[REG_D] = 0x80  # RAM and time valid

    def to_state(self) -> dict:
        """The index register and CMOS bytes (the time itself is the host's, read live)."""
        return {"index": self.index, "nvram": self.nvram.hex()}

    def from_state(self, st: dict) -> None:
        nvram = bytes.fromhex(st["nvram"])
        if len(nvram) != len(self.nvram):
            raise ValueError(f"CMOS state of {len(nvram)} bytes")
        self.index, self.nvram[:] = int(st["index"]) & 0x7F, nvram

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        return self._register(self.index)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F  # bit 7 is the NMI mask
        elif self.index > REG_D:
            self.nvram[self.index] = value & 0xFF
        elif self.index == REG_B:
            self.nvram[REG_B] = (value & 0xFF) | 0x02

    def _register(self, index: int) -> int:
        t = time.gmtime()
        clock = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: (t.tm_wday + 1) % 7 + 1,
                 0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, CENTURY: t.tm_year // 100}
        if index in clock:
            return _bcd(clock[index])
        if index == REG_C:
            return 0
        return self.nvram[index]
