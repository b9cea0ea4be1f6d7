"""Port devices: the 16550 as Linux's 8250 driver probes it, ACPI PM, reset, RTC, the bus."""
from __future__ import annotations

import time

from fakeclock import FakeClock
from xenkvm.machine import layout
from xenkvm.machine.clock import GuestClock
from xenkvm.machine.devices.bus import PortBus
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.devices.power import AcpiPm, I8042Reset, ResetControl
from xenkvm.machine.devices.rtc import CmosRtc
from xenkvm.machine.devices.serial import Serial16550


def make_uart():
    sink = ConsoleSink(None)
    irqs: list[int] = []
    return Serial16550(sink, irqs.append), sink, irqs


def test_uart_transmits_to_console():
    uart, sink, _ = make_uart()
    for c in b"hi\n":
        uart.pio_write(0, 1, c)
    assert sink.tail() == b"hi\n"
    assert uart.pio_read(5, 1) & 0x60 == 0x60  # THRE and TEMT: always ready


def test_uart_scratch_and_loopback_probe():
    uart, sink, _ = make_uart()
    uart.pio_write(7, 1, 0xA5)
    assert uart.pio_read(7, 1) == 0xA5
    uart.pio_write(4, 1, 0x1A)  # loopback with RTS and OUT2, as the 8250 driver probes
    assert uart.pio_read(6, 1) & 0xF0 == 0x90
    uart.pio_write(0, 1, ord("x"))  # looped back, not printed
    assert sink.tail() == b""
    assert uart.pio_read(5, 1) & 1 and uart.pio_read(0, 1) == ord("x")


def test_uart_fifo_detection_and_divisor_latch():
    uart, _, _ = make_uart()
    uart.pio_write(2, 1, 0xE7)
    assert uart.pio_read(2, 1) & 0xC0 == 0xC0
    uart.pio_write(3, 1, 0x83)  # DLAB
    uart.pio_write(0, 1, 0x0C)
    uart.pio_write(1, 1, 0x00)
    assert uart.pio_read(0, 1) == 0x0C
    uart.pio_write(3, 1, 0x03)
    assert uart.pio_read(3, 1) == 0x03


def test_uart_interrupts_thre_and_rx():
    uart, _, irqs = make_uart()
    uart.pio_write(4, 1, 0x08)  # OUT2 gates the IRQ line
    uart.pio_write(1, 1, 0x02)  # enable THRE interrupt: THR is empty, so it fires
    assert irqs[-1] == 1 and uart.pio_read(2, 1) & 0x0F == 0x02
    assert irqs[-1] == 0  # reading IIR cleared it
    uart.pio_write(1, 1, 0x01)  # RX interrupt
    assert uart.push_input(b"ab") == 2
    assert irqs[-1] == 1 and uart.pio_read(2, 1) & 0x0F == 0x04
    assert uart.pio_read(0, 1) == ord("a") and uart.pio_read(0, 1) == ord("b")
    assert irqs[-1] == 0


def test_acpi_pm_s5_powers_off():
    calls = []
    pm = AcpiPm(lambda: calls.append("off"))
    pm.pio_write(4, 2, (3 << 10) | layout.SLP_EN)  # S3: not supported, ignored
    assert calls == []
    pm.pio_write(4, 2, (5 << 10) | layout.SLP_EN)
    assert calls == ["off"]
    assert pm.pio_read(4, 2) & 1  # SCI_EN stays set


def test_acpi_pm_timer_advances():
    clock = FakeClock()
    pm = AcpiPm(lambda: None, GuestClock(host=clock))
    assert pm.pio_read(8, 4) == 0
    clock.advance(10_000_000)
    assert pm.pio_read(8, 4) == 35795         # 3.579545 MHz x 10 ms
    clock.advance(5 * 1_000_000_000)          # 24 bits wrap every ~4.7 s
    assert pm.pio_read(8, 4) == (3_579_545 * 5 + 35795) & 0xFFFFFF
    dilated = AcpiPm(lambda: None, GuestClock(1, 15, host=clock))
    clock.advance(150_000_000)                # 150 host ms are 10 guest ms at 15x dilation
    assert dilated.pio_read(8, 4) == 35795


def test_reset_paths():
    why = []
    ResetControl(why.append).pio_write(0, 1, 0x02)  # arming only
    assert why == []
    ResetControl(why.append).pio_write(0, 1, 0x06)
    I8042Reset(why.append).pio_write(4, 1, 0xFE)
    assert len(why) == 2


def test_rtc_reads_bcd_time_without_update_in_progress():
    rtc = CmosRtc()
    rtc.pio_write(0, 1, 0x0A)
    assert rtc.pio_read(1, 1) & 0x80 == 0  # UIP clear: Linux does not wait
    rtc.pio_write(0, 1, 0x09)
    year = rtc.pio_read(1, 1)
    assert (year >> 4) * 10 + (year & 0xF) == time.gmtime().tm_year % 100


def test_bus_unknown_ports_float_high():
    bus = PortBus()
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 2) == 0xFFFF and bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 1, 0)  # ignored


def test_bus_rejects_double_registration():
    bus = PortBus()
    bus.register(0x100, 4, CmosRtc())
    try:
        bus.register(0x102, 1, CmosRtc())
    except ValueError:
        return
    raise AssertionError("overlapping registration accepted")


def test_console_tail_is_bounded():
    sink = ConsoleSink(None, tail_bytes=100)
    for i in range(100):
        sink.write(f"line {i}\n".encode())
    assert len(sink.tail()) <= 110
    assert sink.last_lines(1) == ["line 99"]
