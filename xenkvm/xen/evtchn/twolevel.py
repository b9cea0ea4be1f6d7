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
(``saved_pending``) and raised once it is.  Every guest word is changed
atomically: on the send path by the C helpers (``lib.xk_evtchn_2l_*``, on a
pointer to shared_info taken once), elsewhere with GuestMemory's atomic bit
operations; plain reads use a view of the page.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import Errno, ffi, lib
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.delivery import XK_NO_VCPU_INFO
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
SH_SIZE = ffi.sizeof("struct shared_info")
_set_pending = lib.xk_evtchn_2l_set_pending
_set_sel = lib.xk_evtchn_2l_set_sel
_WAS_PENDING = lib.XK_2L_WAS_PENDING
_MASKED = lib.XK_2L_MASKED


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
        self._sh = None         # C pointer to shared_info while _bits is not None
        self._gen = -1          # GuestMemory.generation when _sh was taken

    # -- shared_info ------------------------------------------------------------
    def _shinfo(self):
        """(pending, mask) u64 views into shared_info, or None while it is not mapped.

        Also refreshes ``_sh``, the C pointer to shared_info the delivery
        helper uses, whenever shared_info moved or a region left memory.
        """
        gpa = self.d.shinfo.gpa
        if gpa != self._sh_gpa or self.mem.generation != self._gen:
            self._sh_gpa, self._gen, self._bits, self._sh = gpa, self.mem.generation, None, None
            if gpa is not None:
                try:
                    pending = self.mem.view(gpa + SH_PENDING, _BITMAP_BYTES).cast("Q")
                    mask = self.mem.view(gpa + SH_MASK, _BITMAP_BYTES).cast("Q")
                    sh = self.mem.cptr(gpa, SH_SIZE)
                except GuestMemoryError:
                    log.warning("shared_info at %#x is not in guest memory", gpa)
                    return None
                self._bits, self._sh = (pending, mask), sh
                self._pending_gpa = gpa + SH_PENDING
                self._flush_saved()
        return self._bits

    def c_shinfo(self):
        """The C pointer to shared_info C delivery uses (cdeliver.py), or None while unmapped."""
        return self._sh if self._shinfo() is not None else None

    def _flush_saved(self) -> None:
        """Raise the events sent while shared_info was not mapped."""
        for p in [p for p in self.table if p.saved_pending]:
            p.saved_pending = False
            self.set_pending(p)

    def _atomic(self, op, base: int, port: int) -> bool:
        try:
            return op(self._sh_gpa + base, port)
        except GuestMemoryError:    # shared_info moved away under us: forget the views
            self._sh_gpa, self._bits, self._sh = None, None, None
            return True

    # -- the Delivery interface ---------------------------------------------------
    def set_pending(self, p: "Port") -> bool:
        # evtchn_2l_set_pending in C (pending bit, mask test); the vcpu_info half only
        # when the port is newly pending and unmasked, so a repeated send is one C call.
        if self.d.shinfo.gpa == self._sh_gpa and self.mem.generation == self._gen:
            sh = self._sh
        else:
            sh = self._sh if self._shinfo() is not None else None
        if sh is None:
            p.saved_pending = True
            return False
        code = _set_pending(sh, ffi.NULL, p.port)
        if code == _WAS_PENDING:
            return False
        if code != _MASKED:         # masked: the guest looks when it unmasks
            self._set_sel(p.vcpu, p.port >> 6)
        return True

    def _set_sel(self, vcpu: int, word: int) -> None:
        """Set bit ``word`` of the vCPU's evtchn_pending_sel; a new bit marks the upcall."""
        signal = self.signal
        vi = signal.vcpu_info_ptr(vcpu)
        # No vcpu_info: wake a poller; the bits wait for resend().
        signal.done(vcpu, XK_NO_VCPU_INFO if vi is None else _set_sel(vi, word))

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
