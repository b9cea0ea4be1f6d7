"""Notifies from C: a PV backend's thread signals its ring's port without Python's delivery.

``VmmPorts.notify`` (vmm.py) takes the domain's big lock and runs the delivery
rules through Python: on a machine where a backend's thread shares one CPU with
the vCPUs that is a GIL hand-off and hundreds of microseconds a request (issue
11, item 5).  :meth:`CDelivery.notify` does the same send in one C call
(``xkd_notify``, xen/xk_evtchn.h): the port made pending by the ABI in use
(2-level or FIFO), ``evtchn_upcall_pending`` marked, and the vCPU's upcall
vector sent as an MSI, all under a C mutex only.

What C must know is loaded from Python, under the big lock, by :meth:`reload`:
the ABI, where shared_info and each vcpu_info are, each vCPU's upcall vector
and each VMM port's vCPU and priority.  All of that changes only through a
hypercall (or a snapshot restore, a reset, a port bound or closed by the VMM):
the dispatcher holds C off (:meth:`hold`) around every hypercall that is not
known to leave it alone (:func:`changes_delivery`) and reloads after it.  The
FIFO queues' tails and each port's last queue live only in C, and Python's own
FIFO appends go through the same C function under the same mutex
(``fifo.Fifo._enqueue``), so a notify from C and a hypercall in Python never
append to one queue at once.

C declines (:data:`lib.XKD_PYTHON`) whatever it cannot do as the Python path
would: a vCPU whose upcall is the global callback or a GSI (the auto-EOI and
line handling are Python's), no vcpu_info yet, an event-array page not added
yet, a port not bound with a kick eventfd.  The caller then takes the Python
path, which is the reference.  Pollers (SCHEDOP_poll) count themselves in
before they look at their ports, so a C send either is seen by their look or
sees them and has Python wake them.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.xen.abi import lib as xlib
from xenkvm.xen._fast_cffi import ffi, lib

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PYTHON, POLLERS, RAISE, GAVE_UP = lib.XKD_PYTHON, lib.XKD_POLLERS, lib.XKD_RAISE, lib.XKD_GAVE_UP
NPORTS = lib.XKD_NPORTS

EVTCHNOP = xlib.__HYPERVISOR_event_channel_op
#: (hypercall, first argument) pairs that never change what C delivery was loaded with;
#: a hypercall listed with None is safe whatever its sub-op.
SAFE_CALLS: dict[int, frozenset[int] | None] = {
    xlib.__HYPERVISOR_sched_op: None,          # yield, block, poll, shutdown: no delivery state
    xlib.__HYPERVISOR_xen_version: None,
    xlib.__HYPERVISOR_console_io: None,
    xlib.__HYPERVISOR_grant_table_op: None,    # grant frames are not event state
    xlib.__HYPERVISOR_set_timer_op: None,
    xlib.__HYPERVISOR_vcpu_op: frozenset({      # the timers and queries, not register_vcpu_info
        xlib.VCPUOP_set_singleshot_timer, xlib.VCPUOP_stop_singleshot_timer,
        xlib.VCPUOP_set_periodic_timer, xlib.VCPUOP_stop_periodic_timer, xlib.VCPUOP_is_up,
        xlib.VCPUOP_get_runstate_info}),
    EVTCHNOP: frozenset({                       # not bind_vcpu, set_priority, init_control, reset, close
        xlib.EVTCHNOP_send, xlib.EVTCHNOP_unmask, xlib.EVTCHNOP_status, xlib.EVTCHNOP_alloc_unbound,
        xlib.EVTCHNOP_bind_virq, xlib.EVTCHNOP_bind_ipi}),
}


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
        self.fallbacks = 0              #: notifies C declined (statistics)

    # -- keeping C's copy current (caller holds the big lock) --------------------------------
    def hold(self) -> None:
        """A hypercall that may change the delivery state runs: C declines until :meth:`reload`."""
        lib.xkd_hold(self.c)

    def reload(self) -> None:
        """Load the ABI, shared_info, vcpu_infos, upcall vectors and kick ports into C."""
        d = self.d
        ch = d.evtchn
        load = ffi.new("struct xkd_load *")
        keep = []
        fifo = ch.delivery.name == "fifo"
        load.abi = 1 if fifo else 0
        if not fifo:
            sh = ch.delivery.shinfo_ptr()
            if sh is not None:
                keep.append(sh)
                load.shinfo = sh
        n = min(len(d.vcpus), lib.XKD_MAX_VCPUS)
        load.nvcpus = n
        for v in range(n):
            vi = ch.signal.vcpu_info_ptr(v)
            vector = d.vcpus[v].upcall_vector
            if vi is not None and vector:
                keep.append(vi)
                load.vcpu[v].vcpu_info, load.vcpu[v].vector = vi, vector
        for port in d.fast.ports:
            p = ch.table.get(port)
            if 0 <= port < NPORTS and p is not None and p.vmm is not None and p.vcpu < n:
                load.port_ok[port], load.port_vcpu[port], load.port_prio[port] = 1, p.vcpu, p.priority
        self._keep = keep
        lib.xkd_load(self.c, load, 1)

    def port_off(self, port: int) -> None:
        """The VMM withdrew ``port``: C declines it from now on."""
        lib.xkd_port_off(self.c, port)

    def close(self) -> None:
        """The VM goes (its fd is closed next): C never delivers again."""
        lib.xkd_close(self.c)

    # -- the notify (any thread, no lock) -------------------------------------------------------
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
            if r & GAVE_UP:
                log.warning("FIFO: could not link port %d after the tail (guest keeps changing it)", port)
            if r & POLLERS:
                d.evtchn.pollers.wake()
                d.evtchn.pollers.kick(v)
            if r & RAISE:
                d.evtchn.signal.raised += 1
                d.upcalls.raise_(v)

    @property
    def notifies(self) -> int:
        """Notifies C did (whether or not an interrupt was due)."""
        return int(self.c.notifies)

    @property
    def upcalls(self) -> int:
        """Upcall MSIs C injected."""
        return int(self.c.upcalls)
