"""Notifies from C: a PV backend's thread signals its ring's port without Python's delivery.

``VmmPorts.notify`` (vmm.py) takes the domain's big lock and runs the delivery objects in
Python; in the rig's one-CPU L1 that is ~0.4 ms of a ~1.4 ms disk round trip.
:meth:`CDelivery.notify` makes the same send in one C call (``xkd_notify``,
xen/_fast_build.py), and the vbd's C serve loop calls it without returning to Python at all.

**2-level only.**  Xen's 2-level rule is atomic bit operations on shared_info and the target
vCPU's vcpu_info (the guest's own operations on them are atomic too), so C and Python may
deliver at once with no lock between them.  FIFO delivery appends to per-queue tails the
hypervisor keeps; sharing those with Python's appends needs a lock both take (an attempt that
moved the tails into C was reverted: docs/pv-backends.md), so a FIFO guest keeps the Python path
(C declines).  So xenkvm offers only 2-level by default (``xen.fifo_events: false``, as QEMU's
Xen emulation); ``true`` offers FIFO as Xen does, and Linux then takes it.

What C needs is loaded from Python under the big lock (:meth:`reload`): shared_info, each
vCPU's vcpu_info and per-vCPU upcall vector, each VMM kick port's vCPU, and each vCPU's
VIRQ_TIMER port (the timer thread fires the single-shot timers C armed: xen/timers.py).  All of
it changes only through a hypercall, a VMM port bound or closed, or a restore: the dispatcher holds C off
(:meth:`hold`) around every hypercall not known to leave it alone (:func:`changes_delivery`) and
reloads after it; binding reloads, closing withdraws the port.  C declines
(``XKD_PYTHON``) whatever it cannot do as the Python path would (FIFO, shared_info not mapped,
no vcpu_info, the global callback or a GSI instead of a per-vCPU vector, a port it was not
given), and the caller takes the Python path, which stays the reference.  Pollers
(SCHEDOP_poll) are counted in C before they look at their ports, so a C send either is seen by
their look or sees them and has Python wake them (``XKD_POLLERS``).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.xen.abi import lib as xlib
from xenkvm.xen._fast_cffi import ffi, lib

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PYTHON, POLLERS, RAISE, KICK = lib.XKD_PYTHON, lib.XKD_POLLERS, lib.XKD_RAISE, lib.XKD_KICK
NPORTS = lib.XKD_NPORTS
#: ``xkd_notify`` as a ``void *`` for a backend's C loop (``fn(ctx, port)``, ctx the struct xkd)
NOTIFY_FN = ffi.cast("void *", ffi.addressof(lib, "xkd_notify"))

EVTCHNOP = xlib.__HYPERVISOR_event_channel_op
#: (hypercall, first argument) pairs that never change what :meth:`CDelivery.reload` loads;
#: a hypercall listed with None is safe whatever its sub-op.
SAFE_CALLS: dict[int, frozenset[int] | None] = {
    xlib.__HYPERVISOR_sched_op: frozenset({     # not shutdown (a soft reset resets the channels)
        xlib.SCHEDOP_yield, xlib.SCHEDOP_block, xlib.SCHEDOP_poll}),
    xlib.__HYPERVISOR_xen_version: None,
    xlib.__HYPERVISOR_console_io: None,
    xlib.__HYPERVISOR_grant_table_op: None,     # grant frames are not event state
    xlib.__HYPERVISOR_set_timer_op: None,
    xlib.__HYPERVISOR_vcpu_op: frozenset({       # the timers and queries, not register_vcpu_info
        xlib.VCPUOP_set_singleshot_timer, xlib.VCPUOP_stop_singleshot_timer,
        xlib.VCPUOP_set_periodic_timer, xlib.VCPUOP_stop_periodic_timer, xlib.VCPUOP_is_up,
        xlib.VCPUOP_get_runstate_info}),
    EVTCHNOP: frozenset({                        # not bind_vcpu, close, reset, init_control...
        xlib.EVTCHNOP_send, xlib.EVTCHNOP_unmask, xlib.EVTCHNOP_status, xlib.EVTCHNOP_alloc_unbound,
        xlib.EVTCHNOP_bind_ipi}),                # (bind_virq binds VIRQ_TIMER: C fires it)
}


def notify(domain, port: int) -> None:
    """A backend signals its VMM port: in C where the domain has C delivery, else in Python."""
    cdeliver = getattr(domain, "cdeliver", None)
    if cdeliver is not None:
        cdeliver.notify(port)
    else:
        domain.evtchn.notify(port)


def changes_delivery(nr: int, args: tuple[int, ...]) -> bool:
    """Whether hypercall ``nr`` may change what :meth:`CDelivery.reload` loads."""
    if nr not in SAFE_CALLS:
        return True
    subops = SAFE_CALLS[nr]
    return subops is not None and (args[0] & 0xFFFFFFFF if args else -1) not in subops


class CDelivery:
    """One domain's ``struct xkd``: what C needs to deliver on the VMM's kick ports."""

    def __init__(self, domain: "XenDomain", vm_fd: int):
        self.d = domain
        self.c = ffi.gc(lib.xkd_new(vm_fd), lib.xkd_free)
        if self.c == ffi.NULL:
            raise MemoryError("struct xkd")
        self._keep: list = []           #: the C pointers loaded (they hold their mappings)
        self.loaded = False             #: reloaded at least once (a VMM kick port exists)
        self.fallbacks = 0              #: notifies C declined (statistics)

    # -- keeping C's copy current (caller holds the big lock) --------------------------------
    def hold(self) -> None:
        """A hypercall that may change the delivery state runs: C declines until :meth:`reload`."""
        lib.xkd_hold(self.c)

    def reload(self) -> None:
        """Load shared_info, the vcpu_infos and upcall vectors and the kick ports into C."""
        d = self.d
        ch = d.evtchn
        load = ffi.new("struct xkd_load *")
        keep = []
        sh = ch.delivery.c_shinfo() if ch.delivery.name == "2l" else None
        if sh is not None:
            keep.append(sh)
            load.shinfo = sh
        n = min(len(d.vcpus), lib.XKD_MAX_VCPUS)
        load.nvcpus = n
        for v in range(n):
            vi = ch.signal.vcpu_info_ptr(v)
            vector = d.vcpu_state(v).upcall_vector
            if vi is not None and vector:
                keep.append(vi)
                load.vcpu_info[v], load.vector[v] = vi, vector
        for port in d.fast.ports:
            p = ch.table.get(port)
            if 0 <= port < NPORTS and p is not None and p.vmm is not None and p.vcpu < n:
                load.port_vcpu[port] = p.vcpu + 1
        for v in range(n):          # the timer thread's VIRQ_TIMERs (xen/timers.py CTimerThread)
            p = ch.table.virq_port(xlib.VIRQ_TIMER, v)
            if p is not None and p.vcpu < n:
                load.timer_port[v], load.timer_vcpu[v] = p.port, p.vcpu + 1
        self._keep = keep
        self.loaded = True
        lib.xkd_load(self.c, load)

    def port_off(self, port: int) -> None:
        """The VMM withdrew ``port``: C declines it from now on."""
        lib.xkd_port_off(self.c, port)

    def pollers(self, delta: int) -> None:
        """A vCPU thread starts (+1) or stops (-1) waiting in SCHEDOP_poll."""
        lib.xkd_pollers(self.c, delta)

    def close(self) -> None:
        """The VM goes (its fd is closed next): C never delivers again."""
        lib.xkd_close(self.c)

    # -- the notify (any thread, no lock) ---------------------------------------------------
    def notify(self, port: int) -> None:
        """Signal the guest on VMM port ``port``: in C, or through Python if C declines."""
        r = lib.xkd_notify(self.c, port)
        if r:
            self.finish(port, r)

    def finish(self, port: int, r: int) -> None:
        """What a non-zero ``xkd_notify`` answer leaves to Python."""
        d = self.d
        if r & PYTHON:
            self.fallbacks += 1
            d.evtchn.notify(port)
            return
        v = r >> 8
        with d.lock:
            pollers = d.evtchn.pollers
            if r & POLLERS:
                pollers.wake()
            if r & KICK:
                pollers.kick(v)
            if r & RAISE:
                d.upcalls.raise_(v)

    def for_c(self) -> tuple:
        """(function, context) ``void *`` pair a backend's C loop notifies with."""
        return NOTIFY_FN, ffi.cast("void *", self.c)

    @property
    def notifies(self) -> int:
        """Notifies C delivered (whether or not an interrupt was due)."""
        return int(lib.xkd_count(self.c, 0))

    @property
    def upcalls(self) -> int:
        """Upcall MSIs C injected."""
        return int(lib.xkd_count(self.c, 1))

    @property
    def declined(self) -> int:
        """Notifies C left to Python."""
        return int(lib.xkd_count(self.c, 2))
