"""Power and reset: the ACPI PM1a blocks and PM timer, port 0xcf9 and the i8042 reset line.

The guest powers off by writing SLP_TYP=5 | SLP_EN to PM1a_CNT (the DSDT's
``_S5`` package says 5), and resets through 0xcf9 or the keyboard controller.
Each request calls back into the machine, which stops the run with its status.
"""
from __future__ import annotations

import logging
from typing import Callable

from xenkvm.machine import layout
from xenkvm.machine.clock import GuestClock

log = logging.getLogger(__name__)

PM_TIMER_HZ = 3_579_545
SCI_EN = 1


class AcpiPm:
    """PM1a_EVT (status+enable), PM1a_CNT and PM_TMR at layout.PM_BASE (12 ports)."""

    def __init__(self, power_off: Callable[[], None], clock: GuestClock | None = None):
        self._power_off = power_off
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = SCI_EN  # no SMM: the OS owns ACPI from the start
        self.clock = clock or GuestClock()  #: guest time, dilated like every guest clock

    def to_state(self) -> dict:
        """PM1 status, enable and control (the PM timer follows the machine's clock)."""
        return {"pm1_sts": self.pm1_sts, "pm1_en": self.pm1_en, "pm1_cnt": self.pm1_cnt}

    def from_state(self, st: dict) -> None:
        self.pm1_sts, self.pm1_en, self.pm1_cnt = (int(st[k]) & 0xFFFF for k in ("pm1_sts", "pm1_en", "pm1_cnt"))

    def pio_read(self, offset: int, size: int) -> int:
        if offset < 2:
            return (self.pm1_sts >> (8 * offset)) & _mask(size)
        if offset < 4:
            return (self.pm1_en >> (8 * (offset - 2))) & _mask(size)
        if offset < 6:
            return (self.pm1_cnt >> (8 * (offset - 4))) & _mask(size)
        if 8 <= offset < 12:
            ticks = self.clock.ns() * PM_TIMER_HZ // 1_000_000_000
            return (ticks & 0xFFFFFF) >> (8 * (offset - 8)) & _mask(size)
        return _mask(size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.pm1_sts &= ~value & 0xFFFF  # write-one-to-clear
        elif offset == 2:
            self.pm1_en = value & 0xFFFF
        elif offset == 4 and size >= 2:
            self._write_cnt(value & 0xFFFF)
        elif offset in (4, 5):  # byte writes: merge into the 16-bit register
            shift = 8 * (offset - 4)
            self._write_cnt((self.pm1_cnt & ~(0xFF << shift)) | (value & 0xFF) << shift)

    def _write_cnt(self, value: int) -> None:
        self.pm1_cnt = (value & ~layout.SLP_EN) | SCI_EN
        if value & layout.SLP_EN:
            slp_typ = (value >> 10) & 7
            if slp_typ == layout.SLP_TYP_S5:
                log.info("guest requested ACPI S5 (power off)")
                self._power_off()
            else:
                log.info("guest asked for sleep state SLP_TYP=%d: not supported, ignored", slp_typ)


class ResetControl:
    """Port 0xcf9 (reset control register) and the i8042 command port 0x64."""

    def __init__(self, reset: Callable[[str], None]):
        self._reset = reset
        self.rcr = 0

    def pio_read(self, offset: int, size: int) -> int:
        return self.rcr if size == 1 else _mask(size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if value & 0x04:  # RST_CPU: bit 1 selects hard reset, both reset here
            self._reset("reset via port 0xcf9")
        self.rcr = value & 0x0A


class I8042Reset:
    """Only what reboot needs of the keyboard controller at 0x60/0x64: command 0xfe."""

    def __init__(self, reset: Callable[[str], None]):
        self._reset = reset

    def pio_read(self, offset: int, size: int) -> int:
        return 0x00 if offset == 4 else 0xFF  # status: input buffer empty, no data

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and value & 0xFF == 0xFE:
            self._reset("reset via the i8042 controller")


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1
