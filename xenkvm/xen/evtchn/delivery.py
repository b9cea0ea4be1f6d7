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
from xenkvm.xen.abi import ffi

if TYPE_CHECKING:
    from xenkvm.xen.evtchn.poll import Pollers
    from xenkvm.xen.evtchn.ports import Port


VI_UPCALL_PENDING = ffi.offsetof("struct vcpu_info", "evtchn_upcall_pending")
VI_SIZE = ffi.sizeof("struct vcpu_info")


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
    """The upcall: ``evtchn_upcall_pending`` in the vCPU's vcpu_info, then the interrupt."""

    def __init__(self, domain, pollers: "Pollers"):
        self.d = domain
        self.mem = domain.mem
        self.pollers = pollers
        self.raised = 0                       #: upcalls raised (statistics; resend avoids doubles)
        self._usable: set[int] = set()        #: vcpu_info addresses checked to be in memory

    def vcpu_info(self, vcpu: int) -> int | None:
        """The vCPU's vcpu_info address if it has a usable one (aligned, in guest memory)."""
        gpa = self.d.vcpu_info_gpa(vcpu)
        if gpa is None or gpa in self._usable:
            return gpa
        if gpa & 7 or not self.mem.contains(gpa, VI_SIZE):
            return None
        if len(self._usable) > 1024:
            self._usable.clear()
        self._usable.add(gpa)
        return gpa

    def upcall(self, vcpu: int, vi: int | None = None) -> None:
        """Xen's vcpu_mark_events_pending: set upcall_pending; interrupt on 0 -> 1.

        Without a vcpu_info the event waits for :meth:`Delivery.resend`; a
        poller on the vCPU is woken either way (Xen wakes a vCPU polling when
        an event is sent to it).
        """
        pollers = self.pollers
        if pollers.waiting:
            pollers.kick(vcpu)
        if vi is None:
            vi = self.vcpu_info(vcpu)
            if vi is None:
                return
        try:
            was = self.mem.test_and_set_bit(vi + VI_UPCALL_PENDING, 0)
        except GuestMemoryError:
            self._usable.discard(vi)
            return
        if not was:
            self.raised += 1
            self.d.upcalls.raise_(vcpu)

    def force(self, vcpu: int) -> None:
        """Raise the upcall again although upcall_pending may be set (resend_pending)."""
        vi = self.vcpu_info(vcpu)
        if vi is None:
            return
        try:
            self.mem.test_and_set_bit(vi + VI_UPCALL_PENDING, 0)
        except GuestMemoryError:
            return
        self.raised += 1
        self.d.upcalls.raise_(vcpu)

    def upcall_pending(self, vcpu: int) -> bool:
        vi = self.vcpu_info(vcpu)
        return vi is not None and self.mem.read(vi + VI_UPCALL_PENDING, 1)[0] != 0

    def forget(self) -> None:
        self._usable.clear()

