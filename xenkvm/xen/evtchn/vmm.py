"""The VMM side of event channels: the API the VMM's services and PV backends use.

The VMM plays domain 0.  A service (console, xenstore, a block or network
backend) owns the "VMM end" of an interdomain channel whose other end is a
guest port; the guest sees the port as interdomain with remote domain 0 and
remote port the end's id.  Reached as ``domain.evtchn.<name>``:

``alloc_vmm_port(on_notify, vcpu=0, *, on_close=None) -> port``
    A new guest port bound to the service (the console and xenstore rings,
    whose port the guest learns from HVM params / start info).
``bind_vmm_to_guest_port(port, on_notify, *, on_close=None, direct=False, kick_fd=None) -> port``
    Bind to a port the guest allocated with EVTCHNOP_alloc_unbound(remote_dom=0)
    and published in xenstore (the PV frontend protocol).  As Xen's
    bind_interdomain does for the binder, the service's ``on_notify`` runs once
    right away (sends to the unbound port were dropped).  Also re-attaches a
    service to a port restored by ``from_state``.  With ``direct`` the
    service's ``on_notify`` is called in the sender's own thread (below).
    With ``kick_fd`` (an eventfd from ``domain.fast.lease_fd()``, no
    ``on_notify``) a send writes that eventfd, which the service's thread
    waits on: in C on the vCPU's thread when the fast path runs
    (xen/fastpath.py), else in the hypercall's Python.
``close_vmm_port(port)``
    The service closes its end; the guest port becomes unbound to domain 0.
``notify(port)``
    Signal the guest (EVTCHNOP_send from domain 0).  Cheap; coalesces in the
    guest's pending bit.
``raise_virq(virq, vcpu) -> bool``
    Raise a VIRQ (per-vCPU ones on ``vcpu``); False if the guest has not bound it.
``status(port) -> dict | None``
    A plain description of a port (tests, monitor).

Threads and locking: every call takes the domain's big lock (an RLock), so
they may be made from any thread (the I/O thread, a backend worker, a vCPU
thread inside a hypercall) and hold it only briefly.  A guest EVTCHNOP_send
on a VMM port does not call the service: it queues ``on_notify()`` on the
domain's I/O thread, at most one queued call per end (sends while one is
queued coalesce).  An end bound ``direct`` skips that hop (issue 11 item 5:
backends get their kicks with the least hops): its ``on_notify`` runs right
in the sending vCPU's hypercall, under the big lock, so it must only hand
the kick to the service's own thread (a queue put, an event set) and
return; a PV backend's kick is exactly that, and saves the I/O thread's
selector wake-up and a GIL hand-off per request.  Otherwise ``on_notify``
and ``on_close`` run on the I/O thread *without* the big lock.  They must not block (the I/O thread also runs the
timers and every other service): a backend with slow work (disk I/O) hands it
to its own worker and returns; they may call :func:`notify` and the other
methods here (which take the lock themselves).  ``on_close`` runs when the
guest closes its port or resets its event channels; the end is gone then.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from xenkvm.xen.abi import EvtchnStat
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.ports import Port, PortState, VmmEnd

if TYPE_CHECKING:
    from xenkvm.xen.evtchn.channels import EventChannels

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class EvtchnError(ValueError):
    """A VMM-side request that the port table cannot honour (bad or busy port)."""


class VmmPorts:
    """The VMM ends of one domain's channels (``EventChannels.vmm``)."""

    def __init__(self, channels: "EventChannels"):
        self.ch = channels
        self.ends: dict[int, VmmEnd] = {}
        self.next_id = 1

    # -- the API (EventChannels forwards to these) ---------------------------------
    def alloc(self, on_notify: Callback, vcpu: int, on_close: Callback | None) -> int:
        ch = self.ch
        with ch.d.lock:
            if not ch.d.valid_vcpu(vcpu):
                raise EvtchnError(f"no vcpu {vcpu}")
            try:
                p = ch.alloc(PortState.INTERDOMAIN, vcpu)
            except HypercallError:
                raise EvtchnError("no free event channel") from None
            self.attach(p, on_notify, on_close)
            return p.port

    def bind(self, port: int, on_notify: Callback | None, on_close: Callback | None, direct: bool = False,
             kick_fd: int | None = None) -> int:
        if (on_notify is None) == (kick_fd is None):
            raise EvtchnError("bind a VMM end with on_notify or with kick_fd, not both or neither")
        with self.ch.d.lock:
            p = self.ch.table.get(port) if isinstance(port, int) else None
            if p is not None and p.state == PortState.INTERDOMAIN and p.vmm is not None \
                    and p.vmm.on_notify is None:           # restored, re-attaching
                self._callbacks(p.vmm, on_notify, on_close, direct, kick_fd)
                if p.vmm.queued:
                    p.vmm.queued = False
                    self.queue_notify(p.vmm)
                return port
            if p is None or p.state != PortState.UNBOUND or p.remote_dom != 0:
                raise EvtchnError(f"guest port {port!r} is not unbound to domain 0")
            p.state = PortState.INTERDOMAIN
            end = self.attach(p, None, None)
            self._callbacks(end, on_notify, on_close, direct, kick_fd)
            self.queue_notify(end)
            return port

    def _callbacks(self, end: VmmEnd, on_notify: Callback | None, on_close: Callback | None, direct: bool,
                   kick_fd: int | None) -> None:
        """Give ``end`` its service: a callback, or an eventfd registered with the fast path."""
        end.on_close, end.direct, end.kick_fd = on_close, direct, kick_fd
        if kick_fd is None:
            end.on_notify = on_notify
            return
        fast, port = self.ch.d.fast, end.port
        end.on_notify, end.direct = (lambda: fast.signal(port)), True
        fast.register(port, kick_fd)
        cdeliver = getattr(self.ch.d, "cdeliver", None)
        if cdeliver is not None:
            cdeliver.reload()       # the service's notifies on it may now be C's

    def _withdraw(self, port: int) -> None:
        """The VMM end of ``port`` is gone: neither the C send path nor C delivery has it."""
        cdeliver = getattr(self.ch.d, "cdeliver", None)
        if cdeliver is not None:
            cdeliver.port_off(port)
        self.ch.d.fast.withdraw(port)

    def close(self, port: int) -> None:
        """Xen's rule for closing one end: the other becomes unbound (to the closer)."""
        with self.ch.d.lock:
            p = self.ch.table.get(port)
            if p is None or p.vmm is None:
                return
            self.ends.pop(p.vmm.id, None)
            p.vmm = None
            self._withdraw(port)
            p.state, p.remote_dom, p.remote_port = PortState.UNBOUND, 0, 0

    def notify(self, port: int) -> None:
        """A VMM service signals the guest on its port (ignored unless bound to the VMM)."""
        ch = self.ch
        with ch.d.lock:
            p = ch.table.ports.get(port)
            if p is None or p.vmm is None:
                log.debug("notify on port %r which is not bound to the VMM", port)
                return
            if ch.delivery.set_pending(p) and ch.pollers.waiting:   # ch.set_pending(), inline
                ch.pollers.wake()

    def raise_virq(self, virq: int, vcpu_id: int) -> bool:
        """Raise a VIRQ (per-vCPU ones on ``vcpu_id``); False if the guest has not bound it."""
        with self.ch.d.lock:
            p = self.ch.table.virq_port(virq, vcpu_id)
            if p is None:
                return False
            self.ch.set_pending(p)
            return True

    def status(self, port: int) -> dict | None:
        ch = self.ch
        with ch.d.lock:
            p = ch.table.get(port)
            if p is None:
                return None
            out = {"port": p.port, "state": EvtchnStat(p.state).name, "vcpu": p.vcpu,
                   "pending": ch.is_pending(port), "masked": ch.is_masked(port)}
            if p.state in (PortState.UNBOUND, PortState.INTERDOMAIN):
                out["remote_dom"] = p.remote_dom
            if p.state == PortState.INTERDOMAIN:
                out["remote_port"] = p.remote_port
                out["vmm"] = p.vmm is not None
            if p.state == PortState.VIRQ:
                out["virq"] = p.virq
            ch.delivery.describe(p, out)
            return out

    # -- the core's side (caller holds the lock) ------------------------------------------
    def attach(self, p: Port, on_notify: Callback | None, on_close: Callback | None) -> VmmEnd:
        end = VmmEnd(self.next_id, on_notify, on_close, p.port)
        self.next_id += 1
        self.ends[end.id] = end
        p.vmm = end
        p.remote_dom, p.remote_port = 0, end.id
        return end

    def queue_notify(self, end: VmmEnd) -> None:
        """A guest send to ``end``: run its on_notify on the I/O thread (one queued at a time),
        or right here if the end is ``direct`` (caller holds the lock)."""
        if end.direct and end.on_notify is not None and not end.queued:
            end.on_notify()
            return
        if end.queued:
            return
        end.queued = True
        if end.on_notify is None:
            return          # restored, not yet re-attached: owed on attach

        def run() -> None:
            with self.ch.d.lock:
                end.queued = False
                fn = end.on_notify if self.ends.get(end.id) is end else None
            if fn is not None:
                fn()
        self.ch.d.io.call_soon(run)

    def detach(self, p: Port, *, from_guest: bool) -> None:
        """``p``'s guest end is closing: the VMM end goes; on_close runs if the guest closed it."""
        end, p.vmm = p.vmm, None
        self.ends.pop(end.id, None)
        self._withdraw(p.port)
        if from_guest and end.on_close is not None:
            self.ch.d.io.call_soon(end.on_close)

    def restore(self, p: Port, end_id: int, queued: bool) -> None:
        """A restored port's end, without callbacks until the service re-attaches."""
        end = VmmEnd(end_id, None, None, p.port, queued=queued)
        self.ends[end.id] = end
        p.vmm = end

    def clear(self) -> None:
        self.ends.clear()
        self.ch.d.fast.clear()
