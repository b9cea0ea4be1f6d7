"""2-level event delivery: the pending and mask bitmaps of shared_info.

Xen's rules (``common/event_2l.c``), kept here:

* a port is pending when its bit in ``shared_info.evtchn_pending`` is set and
  masked when its bit in ``evtchn_mask`` is; a 64-bit guest has 64 x 64 ports;
* ``evtchn_2l_set_pending``: setting an already-pending bit does nothing;
  a newly-pending, unmasked port sets bit ``port / 64`` of the target vCPU's
  ``evtchn_pending_sel`` and, when that bit is new, marks the upcall pending;
* ``evtchn_2l_unmask``: clearing the mask of a pending port re-delivers it
  (Xen only when the mask bit was set; we whenever it is pending: at worst
  one spurious upcall, never a lost one).

Events sent before shared_info is mapped are remembered on the port
(``saved_pending``) and raised once it is.  Every guest word is changed with
GuestMemory's atomic bit operations; plain reads use a view of the page.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import Errno, ffi
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.fifo import Fifo

if TYPE_CHECKING:
    from xenkvm.xen.evtchn.delivery import Delivery, Signal
    from xenkvm.xen.evtchn.ports import Port, PortTable

log = logging.getLogger(__name__)

NR_2L_CHANNELS = 64 * 64        #: 2-level ports for a 64-bit guest
SH_PENDING = ffi.offsetof("struct shared_info", "evtchn_pending")
SH_MASK = ffi.offsetof("struct shared_info", "evtchn_mask")
VI_SEL = ffi.offsetof("struct vcpu_info", "evtchn_pending_sel")
_BITMAP_BYTES = NR_2L_CHANNELS // 8


class TwoLevel:
    """2-level delivery of one domain (the default ABI)."""

    name = "2l"
    nr_channels = NR_2L_CHANNELS

    def __init__(self, domain, table: "PortTable", signal: "Signal"):
        self.d = domain
        self.mem = domain.mem
        self.table = table
        self.signal = signal
        self._sh_gpa: int | None = None
        self._bits = None       # (pending, mask) u64 views of shared_info; None while unmapped
        self._pending_gpa = 0   # where evtchn_pending is while _bits is not None

    # -- shared_info ------------------------------------------------------------
    def _shinfo(self):
        """(pending, mask) u64 views into shared_info, or None while it is not mapped."""
        gpa = self.d.shinfo.gpa
        if gpa != self._sh_gpa:
            self._sh_gpa, self._bits = gpa, None
            if gpa is not None:
                try:
                    pending = self.mem.view(gpa + SH_PENDING, _BITMAP_BYTES).cast("Q")
                    mask = self.mem.view(gpa + SH_MASK, _BITMAP_BYTES).cast("Q")
                except GuestMemoryError:
                    log.warning("shared_info at %#x is not in guest memory", gpa)
                    return None
                self._bits = (pending, mask)
                self._pending_gpa = gpa + SH_PENDING
                self._flush_saved()
        return self._bits

    def _flush_saved(self) -> None:
        """Raise the events sent while shared_info was not mapped."""
        for p in [p for p in self.table if p.saved_pending]:
            p.saved_pending = False
            self.set_pending(p)

    def _atomic(self, op, base: int, port: int) -> bool:
        try:
            return op(self._sh_gpa + base, port)
        except GuestMemoryError:    # shared_info moved away under us: forget the views
            self._sh_gpa, self._bits = None, None
            return True

    # -- the Delivery interface ---------------------------------------------------
    def set_pending(self, p: "Port") -> bool:
        bits = self._bits if self.d.shinfo.gpa == self._sh_gpa else self._shinfo()
        if bits is None:
            p.saved_pending = True
            return False
        port = p.port
        try:
            if self.mem.test_and_set_bit(self._pending_gpa, port):
                return False
        except GuestMemoryError:    # shared_info moved away under us: forget the views
            self._sh_gpa, self._bits = None, None
            return False
        if bits[1][port >> 6] >> (port & 63) & 1:
            return True                 # masked: the guest looks when it unmasks
        self._set_sel(p.vcpu, port >> 6)
        return True

    def _set_sel(self, vcpu: int, word: int) -> None:
        """Set bit ``word`` of the vCPU's evtchn_pending_sel; a new bit marks the upcall."""
        signal = self.signal
        vi = signal.vcpu_info(vcpu)
        if vi is None:
            signal.upcall(vcpu)    # wakes a poller; the bits wait for resend()
            return
        try:
            was = self.mem.test_and_set_bit(vi + VI_SEL, word)
        except GuestMemoryError:   # its vcpu_info left guest memory: as if it had none
            signal.forget()
            return
        if not was:
            signal.upcall(vcpu, vi)

    def clear_pending(self, p: "Port") -> None:
        p.saved_pending = False
        if self._shinfo() is not None:
            self._atomic(self.mem.test_and_clear_bit, SH_PENDING, p.port)

    def _bit(self, which: int, port: int) -> bool:
        return bool(self._bits[which][port >> 6] >> (port & 63) & 1)

    def is_pending(self, port: int) -> bool:
        return self._shinfo() is not None and 0 <= port < NR_2L_CHANNELS and self._bit(0, port)

    def is_masked(self, port: int) -> bool:
        return self._shinfo() is None or not 0 <= port < NR_2L_CHANNELS or self._bit(1, port)

    def is_busy(self, port: int) -> bool:
        return False

    def unmask(self, port: int, p: "Port | None") -> None:
        if self._shinfo() is None or not 0 <= port < NR_2L_CHANNELS:
            return
        self._atomic(self.mem.test_and_clear_bit, SH_MASK, port)
        if p is not None and self._bits is not None and self._bit(0, port):
            self._set_sel(p.vcpu, port >> 6)

    def rebind(self, p: "Port") -> None:
        # Deliver to the new vCPU what was pending and unmasked (Linux masks
        # around a rebind, so normally nothing happens here).
        if self.is_pending(p.port) and not self.is_masked(p.port):
            self._set_sel(p.vcpu, p.port >> 6)

    def resend(self, vcpu: int) -> bool:
        """Set sel bits for pending, unmasked ports of ``vcpu``; True if its sel is non-zero."""
        bits = self._shinfo()             # (flushes events remembered while it was unmapped)
        vi = self.signal.vcpu_info(vcpu)
        if bits is None or vi is None:
            return False
        pending, mask = bits
        for i in range(NR_2L_CHANNELS // 64):
            word = pending[i] & ~mask[i]
            while word:
                low = word & -word
                word ^= low
                p = self.table.get(i * 64 + low.bit_length() - 1)
                if p is not None and p.vcpu == vcpu:
                    self.mem.test_and_set_bit(vi + VI_SEL, i)
                    break
        return self.mem.read_u64(vi + VI_SEL) != 0

    def init_control(self, vcpu: int, gfn: int, offset: int) -> "Delivery":
        """Switch to FIFO.  Ports keep their bindings; pending bits are carried over
        (queued once their event-array page exists)."""
        fifo = Fifo(self.d, self.table, self.signal)
        fifo.map_control(vcpu, gfn, offset)          # raises: stay 2-level
        bits = self._shinfo()
        for p in self.table:
            if bits is not None and p.port < NR_2L_CHANNELS and self._bit(0, p.port):
                p.saved_pending = True
            p.priority = p.last_prio = Fifo.PRIORITY_DEFAULT
            p.last_vcpu = p.vcpu
        return fifo

    def expand_array(self, gfn: int) -> None:
        raise HypercallError(Errno.EOPNOTSUPP, "expand_array before init_control")

    def set_priority(self, p: "Port | None", priority: int) -> None:
        raise HypercallError(Errno.ENOSYS, "set_priority needs the FIFO ABI")

    def guest_frames(self) -> set[int]:
        return set()            # shared_info is the domain's, not this ABI's

    def describe(self, p: "Port", out: dict) -> None:
        pass

    def to_state(self) -> None:
        return None
