"""A 16550A UART (COM1 at 0x3f8): transmit to the console, receive host input.

Enough of the chip for Linux's 8250 driver: scratch and loopback probes
(MSR mirrors MCR in loopback), FIFO detection via FCR/IIR, divisor latch,
and the THRE/RDA interrupts on IRQ 4, gated by MCR.OUT2 as on a PC.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from xenkvm.machine.devices.console import ConsoleSink

# Register offsets (DLAB=0 unless noted)
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

RX_QUEUE_MAX = 64 * 1024  # host input waiting for the guest; beyond this, input is refused


class Serial16550:
    def __init__(self, sink: ConsoleSink, set_irq: Callable[[int], None] | None = None):
        self.sink = sink
        self._set_irq = set_irq or (lambda level: None)
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x01, 0x00
        self._thre_pending = False
        self._irq_level = 0

    # -- snapshots ---------------------------------------------------------
    _STATE = ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm")

    def to_state(self) -> dict:
        """The registers, pending input and interrupt state (machine/snapshot)."""
        with self._lock:
            st = {k: getattr(self, k) for k in self._STATE}
            st.update(rx=list(self._rx), thre_pending=self._thre_pending, irq_level=self._irq_level)
            return st

    def from_state(self, st: dict) -> None:
        with self._lock:
            for k in self._STATE:
                setattr(self, k, int(st[k]) & 0xFF)
            self._rx = collections.deque(int(b) & 0xFF for b in st["rx"][:RX_QUEUE_MAX])
            self._thre_pending = bool(st["thre_pending"])
            self._irq_level = int(bool(st["irq_level"]))

    # -- host side ---------------------------------------------------------
    def push_input(self, data: bytes) -> int:
        """Queue host keystrokes for the guest; returns how many were accepted."""
        with self._lock:
            room = RX_QUEUE_MAX - len(self._rx)
            self._rx.extend(data[:room])
            self._update_irq()
            return min(len(data), room)

    # -- guest side ----------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        out = None
        with self._lock:
            out = self._write(offset, value & 0xFF)
            self._update_irq()
        if out is not None:
            self.sink.write(out)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self._thre_pending = False  # reading IIR clears a THRE interrupt
            return iir | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            return self._msr()
        return self.scr

    def _write(self, offset: int, value: int) -> bytes | None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.dll = value
                return None
            self._thre_pending = True  # transmitted at once: THR is empty again
            if self.mcr & MCR_LOOP:
                self._rx.append(value)
                return None
            return bytes([value])
        if offset == IER:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRE and not self.ier & IER_THRE:
                    self._thre_pending = True
                self.ier = value & 0x0F
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self.fcr = value
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return None

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:  # outputs loop back onto the modem-status inputs
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _iir(self) -> int:
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 1 if self._iir() != IIR_NONE and self.mcr & MCR_OUT2 else 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)
