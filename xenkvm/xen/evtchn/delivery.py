"""What both delivery ABIs offer (:class:`Delivery`) and what they share (:class:`Signal`).

The port table says *which* port fires; a delivery object says *how* the
guest learns of it.  A domain starts with 2-level delivery (``twolevel.py``);
EVTCHNOP_init_control swaps in FIFO delivery (``fifo.py``) and EVTCHNOP_reset
swaps 2-level back.  Nothing outside the two classes asks which one is in use.

Both end the same way, in Xen's ``vcpu_mark_events_pending``: set bit 0 of
the vCPU's ``vcpu_info.evtchn_upcall_pending`` and, on a 0 -> 1 change,
interrupt the vCPU (the upcall).  A vCPU with no usable vcpu_info yet keeps
its events pending; :meth:`Delivery.resend` delivers them once it has one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import ffi, lib

if TYPE_CHECKING:
    from xenkvm.xen.evtchn.poll import Pollers
    from xenkvm.xen.evtchn.ports import Port


VI_UPCALL_PENDING = ffi.offsetof("struct vcpu_info", "evtchn_upcall_pending")
VI_SIZE = ffi.sizeof("struct vcpu_info")
XK_NO_VCPU_INFO = lib.XK_2L_NO_VCPU_INFO   #: the codes from here up reached (or would reach) the vCPU
XK_UPCALL = lib.XK_UPCALL
assert lib.XK_2L_WAS_PENDING < lib.XK_2L_MASKED < lib.XK_2L_SEL_WAS_SET < XK_NO_VCPU_INFO
assert XK_NO_VCPU_INFO < lib.XK_UPCALL_WAS_PENDING < XK_UPCALL
_mark_upcall = lib.xk_evtchn_mark_upcall


class Delivery(Protocol):
    """How pending events reach the guest: 2-level bitmaps or FIFO queues."""

    name: str          #: "2l" or "fifo" (EventChannels.abi)
    nr_channels: int   #: ports the ABI can name

    def set_pending(self, p: "Port") -> bool:
        """Make ``p`` pending and deliver it if unmasked; True if it was newly pending."""

    def clear_pending(self, p: "Port") -> None: ...

    def is_pending(self, port: int) -> bool: ...

    def is_masked(self, port: int) -> bool: ...

    def is_busy(self, port: int) -> bool:
        """True while a free port may not be reused (a FIFO word still LINKED)."""

    def unmask(self, port: int, p: "Port | None") -> None:
        """EVTCHNOP_unmask: clear the mask; deliver the port if it is pending."""

    def rebind(self, p: "Port") -> None:
        """``p.vcpu`` changed (EVTCHNOP_bind_vcpu): deliver to the new vCPU what is owed."""

    def resend(self, vcpu: int) -> bool:
        """Re-deliver what ``vcpu`` could not take yet; True if it has events to look at."""

    def init_control(self, vcpu: int, gfn: int, offset: int) -> "Delivery":
        """EVTCHNOP_init_control for ``vcpu``: the delivery to use from now on."""

    def expand_array(self, gfn: int) -> None: ...

    def set_priority(self, p: "Port | None", priority: int) -> None: ...

    def guest_frames(self) -> set[int]:
        """Guest frames this ABI keeps words in (never to be released to the host)."""

    def describe(self, p: "Port", out: dict) -> None:
        """Add ABI-specific fields to ``EventChannels.status()``."""

    def to_state(self) -> dict | None:
        """Save-state of the ABI (None for 2-level, whose words live in shared_info)."""


class Signal:
    """The upcall: ``evtchn_upcall_pending`` in the vCPU's vcpu_info, then the interrupt.

    Each vcpu_info is reached through a C pointer taken once
    (``GuestMemory.cptr``), cached by address and dropped when a region leaves
    guest memory (``GuestMemory.generation``); the delivery rules themselves
    run in C (``lib.xk_evtchn_*``), which answer with one of the ``XK_*`` codes.
    """

    def __init__(self, domain, pollers: "Pollers"):
        self.d = domain
        self.mem = domain.mem
        self.pollers = pollers
        self.raised = 0                       #: upcalls raised (statistics; resend avoids doubles)
        self._ptrs: dict = {}                 #: vcpu_info gpa -> C pointer (checked to be in memory)
        self._gen = -1                        #: GuestMemory.generation the pointers are from

    def vcpu_info_ptr(self, vcpu: int):
        """A C pointer to the vCPU's vcpu_info if it has a usable one (aligned, in guest memory)."""
        gpa = self.d.vcpu_info_gpa(vcpu)
        if gpa is None:
            return None
        if self._gen != self.mem.generation:     # a region left: pointers may be stale
            self._ptrs.clear()
            self._gen = self.mem.generation
        ptr = self._ptrs.get(gpa)
        if ptr is None:
            if gpa & 7:
                return None
            try:
                ptr = self.mem.cptr(gpa, VI_SIZE)
            except GuestMemoryError:
                return None
            if len(self._ptrs) > 1024:
                self._ptrs.clear()
            self._ptrs[gpa] = ptr
        return ptr

    def vcpu_info(self, vcpu: int) -> int | None:
        """The vCPU's vcpu_info address if it has a usable one (aligned, in guest memory)."""
        return self.d.vcpu_info_gpa(vcpu) if self.vcpu_info_ptr(vcpu) is not None else None

    def upcall(self, vcpu: int) -> None:
        """Xen's vcpu_mark_events_pending: set upcall_pending; interrupt on 0 -> 1.

        Without a vcpu_info the event waits for :meth:`Delivery.resend`; a
        poller on the vCPU is woken either way (Xen wakes a vCPU polling when
        an event is sent to it).
        """
        vi = self.vcpu_info_ptr(vcpu)
        self.done(vcpu, XK_NO_VCPU_INFO if vi is None else _mark_upcall(vi))

    def done(self, vcpu: int, code: int) -> None:
        """Finish a delivery the C helpers began: ``code`` is how far the rule went."""
        if code >= XK_NO_VCPU_INFO:          # an event reached the vCPU (or would have)
            pollers = self.pollers
            if pollers.waiting:
                pollers.kick(vcpu)
            if code == XK_UPCALL:
                self.raised += 1
                self.d.upcalls.raise_(vcpu)

    def force(self, vcpu: int) -> None:
        """Raise the upcall again although upcall_pending may be set (resend_pending)."""
        vi = self.vcpu_info_ptr(vcpu)
        if vi is None:
            return
        _mark_upcall(vi)
        self.raised += 1
        self.d.upcalls.raise_(vcpu)

    def upcall_pending(self, vcpu: int) -> bool:
        vi = self.vcpu_info_ptr(vcpu)
        return vi is not None and vi[VI_UPCALL_PENDING] != b"\0"

    def forget(self) -> None:
        self._ptrs.clear()
