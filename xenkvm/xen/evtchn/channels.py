"""EventChannels: one domain's event channels, composed of the pieces of this package.

* ``ports.py``: the port table (states, lowest-free allocation, VIRQ bindings);
* ``twolevel.py`` / ``fifo.py``: the two delivery ABIs behind ``delivery.Delivery``;
  ``self.delivery`` is one of them, swapped only by EVTCHNOP_init_control
  (to FIFO) and EVTCHNOP_reset / :meth:`reset` (back to 2-level);
* ``ops.py``: EVTCHNOP decoding, calling the methods of the "guest operations"
  section below; ``poll.py``: SCHEDOP_poll; ``vmm.py``: the VMM services' API.

Xen behaviour reproduced here (``common/event_channel.c``): ``send`` on an
unbound port is dropped silently and on virq/closed ports is -EINVAL;
``bind_interdomain`` marks the new local port pending (notifications sent to
the unbound remote may have been lost); closing one end of an interdomain
pair leaves the other unbound to the closer; ``bind_vcpu`` works on unbound,
interdomain and global-virq ports only; per-vCPU VIRQs are TIMER, DEBUG,
XENOPROF and XENPMU, the rest are global and bind on vCPU 0 only; a bad vCPU
id is -ENOENT; ``dom`` fields must name the caller (we are never privileged:
-EPERM for domain 0, -ESRCH for others).

Delivery never loses an event: a port notified before its words exist
(shared_info not mapped, FIFO page not added) is remembered on the port and
made pending when they appear; a vCPU with no vcpu_info yet gets its events
from :meth:`resend_pending`, which the domain calls when the vCPU registers one.

Everything here runs under ``domain.lock`` (hypercalls via the dispatcher;
the VMM-side methods take it).
"""
from __future__ import annotations

from typing import Callable, Iterable

from xenkvm.xen.abi import DOMID_SELF, Errno, EvtchnStat, ffi
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn import poll as _poll
from xenkvm.xen.evtchn.delivery import Delivery, Signal
from xenkvm.xen.evtchn.fifo import NR_CHANNELS as FIFO_NR_CHANNELS
from xenkvm.xen.evtchn.fifo import Fifo
from xenkvm.xen.evtchn.ports import NR_VIRQS, PER_VCPU_VIRQS, Port, PortState, PortTable, VmmEnd
from xenkvm.xen.evtchn.twolevel import TwoLevel
from xenkvm.xen.evtchn.vmm import VmmPorts
from xenkvm.xen.limits import of as limits_of


CB_SIZE = ffi.sizeof("struct evtchn_fifo_control_block")
Publish = Callable[[int], None]
# Members bound once for the send path (an enum attribute lookup costs more than the compare).
_UNBOUND, _INTERDOMAIN, _IPI = PortState.UNBOUND, PortState.INTERDOMAIN, PortState.IPI


class EventChannels:
    """Event channels of one domain (``domain.evtchn``)."""

    def __init__(self, domain, *, max_port: int | None = None):
        self.d = domain
        self.mem = domain.mem
        if max_port is None:   # Xen's get_free_port: -ENOSPC for a port past the domain's max
            max_port = limits_of(domain).max_evtchn_port
        self.table = PortTable(max(1, min(int(max_port), FIFO_NR_CHANNELS - 1)))
        self.pollers = _poll.Pollers(domain.lock, len(domain.vcpus))
        self.signal = Signal(domain, self.pollers)
        self.vmm = VmmPorts(self)
        self.delivery: Delivery = TwoLevel(domain, self.table, self.signal)
        # The services' per-event calls go straight to vmm.py (no forwarding frame).
        self.notify = self.vmm.notify
        self.raise_virq = self.vmm.raise_virq

    # -- views -------------------------------------------------------------------------
    @property
    def ports(self) -> dict[int, Port]:
        return self.table.ports

    @property
    def virqs(self) -> dict[tuple[int, int], int]:
        return self.table.virqs

    @property
    def vmm_ends(self) -> dict[int, VmmEnd]:
        return self.vmm.ends

    @property
    def max_port(self) -> int:
        return self.table.max_port

    @max_port.setter
    def max_port(self, value: int) -> None:
        self.table.max_port = max(1, min(int(value), FIFO_NR_CHANNELS - 1))

    @property
    def abi(self) -> str:
        return self.delivery.name

    @property
    def raised(self) -> int:
        return self.signal.raised

    def nr_channels(self) -> int:
        """Port numbers below this are valid for the current ABI."""
        return self.table.limit(self.delivery.nr_channels)

    def valid(self, port: int) -> bool:
        return 0 <= port < self.nr_channels()

    def guest_frames(self) -> set[int]:
        """Guest frames the current ABI keeps event words in (never to be released)."""
        return self.delivery.guest_frames()

    # -- the table and delivery together --------------------------------------------------
    def alloc(self, state: PortState, vcpu: int = 0) -> Port:
        d = self.delivery
        return self.table.alloc(state, vcpu, d.nr_channels, d.is_busy)

    def free(self, p: Port) -> None:
        self.delivery.clear_pending(p)
        self.table.free(p)

    def set_pending(self, p: Port) -> None:
        """Make ``p`` pending and deliver it; wake pollers when it is newly pending."""
        if self.delivery.set_pending(p) and self.pollers.waiting:
            self.pollers.wake()

    def is_pending(self, port: int) -> bool:
        p = self.table.ports.get(port)
        return (p is not None and p.saved_pending) or self.delivery.is_pending(port)

    def is_masked(self, port: int) -> bool:
        return self.delivery.is_masked(port)

    def check_vcpu(self, vcpu: int) -> None:
        if not self.d.valid_vcpu(vcpu):
            raise HypercallError(Errno.ENOENT, f"no vcpu {vcpu}")

    def is_self(self, dom: int) -> bool:
        return dom == DOMID_SELF or dom == self.d.domid

    def check_self(self, dom: int) -> None:
        """``dom`` of a hypercall struct must name the caller (we are never privileged)."""
        if not self.is_self(dom):
            raise HypercallError(Errno.EPERM if dom == 0 else Errno.ESRCH, f"domain {dom}")

    def _publish(self, p: Port, publish: Publish) -> None:
        """Hand the new port to the guest; if that faults, the port is closed again."""
        try:
            publish(p.port)
        except HypercallError:
            self.close_port(p, from_guest=True)
            raise

    # -- guest operations (ops.py decodes, these decide) ----------------------------------
    def alloc_unbound(self, dom: int, remote_dom: int, publish: Publish) -> None:
        self.check_self(dom)
        p = self.alloc(PortState.UNBOUND)
        p.remote_dom = self.d.domid if remote_dom == DOMID_SELF else remote_dom
        self._publish(p, publish)

    def bind_interdomain(self, remote_dom: int, remote_port: int, publish: Publish) -> None:
        """Only loopback (our own unbound port) can be bound: the VMM keeps no unbound ports."""
        if self.is_self(remote_dom):
            peer = self.table.get(remote_port) if self.valid(remote_port) else None
            if peer is None or peer.state != PortState.UNBOUND or peer.remote_dom != self.d.domid:
                raise HypercallError(Errno.EINVAL, f"loopback remote port {remote_port} is not unbound to us")
            p = self.alloc(PortState.INTERDOMAIN)
            p.remote_dom, p.remote_port = self.d.domid, remote_port
            peer.state, peer.remote_dom, peer.remote_port = PortState.INTERDOMAIN, self.d.domid, p.port
        elif remote_dom == 0:
            raise HypercallError(Errno.EINVAL, f"domain 0 port {remote_port} is not unbound to us")
        else:
            raise HypercallError(Errno.ESRCH, f"no domain {remote_dom}")
        self._publish(p, publish)
        self.set_pending(p)

    def bind_virq(self, virq: int, vcpu: int, publish: Publish) -> None:
        if virq >= NR_VIRQS:
            raise HypercallError(Errno.EINVAL, f"virq {virq}")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise HypercallError(Errno.EINVAL, f"global virq {virq} on vcpu {vcpu}")
        self.check_vcpu(vcpu)
        if self.table.virq_port(virq, vcpu) is not None:
            raise HypercallError(Errno.EEXIST, f"virq {virq} already bound on vcpu {vcpu}")
        p = self.alloc(PortState.VIRQ, vcpu)
        self.table.bind_virq(p, virq)
        self._publish(p, publish)

    def bind_ipi(self, vcpu: int, publish: Publish) -> None:
        self.check_vcpu(vcpu)
        self._publish(self.alloc(PortState.IPI, vcpu), publish)

    def close(self, port: int) -> None:
        p = self.table.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"close of free port {port}")
        self.close_port(p, from_guest=True)

    def close_port(self, p: Port, *, from_guest: bool) -> None:
        """Close ``p``; an interdomain peer becomes unbound to us (a VMM end goes away)."""
        if p.state == PortState.INTERDOMAIN:
            if p.vmm is not None:
                self.vmm.detach(p, from_guest=from_guest)
            else:
                peer = self.table.get(p.remote_port)
                if peer is not None and peer.state == PortState.INTERDOMAIN \
                        and peer.remote_port == p.port and peer.vmm is None:
                    peer.state, peer.remote_dom, peer.remote_port = PortState.UNBOUND, self.d.domid, 0
        self.free(p)

    def send(self, port: int) -> int:
        """EVTCHNOP_send on ``port`` (caller holds the lock)."""
        p = self.table.ports.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"send on free port {port}")
        st = p.state
        if st == _INTERDOMAIN:
            if p.vmm is not None:
                self.vmm.queue_notify(p.vmm)
            else:
                peer = self.table.ports.get(p.remote_port)
                if peer is not None:
                    self.set_pending(peer)
        elif st == _IPI:
            if self.delivery.set_pending(p) and self.pollers.waiting:   # set_pending(), inline
                self.pollers.wake()
        elif st != _UNBOUND:      # unbound: dropped silently, as Xen
            raise HypercallError(Errno.EINVAL, f"send on {EvtchnStat(st).name} port {port}")
        return 0

    def port_status(self, dom: int, port: int) -> Port | None:
        """EVTCHNOP_status: the port (None: closed) after checking the caller may ask."""
        self.check_self(dom)
        if not self.valid(port):
            raise HypercallError(Errno.EINVAL, f"status of port {port}")
        return self.table.get(port)

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        self.check_vcpu(vcpu)
        p = self.table.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"bind_vcpu of free port {port}")
        if p.state in (PortState.UNBOUND, PortState.INTERDOMAIN) or \
                (p.state == PortState.VIRQ and p.virq not in PER_VCPU_VIRQS):
            if p.vcpu != vcpu:
                p.vcpu = vcpu
                self.delivery.rebind(p)
            return
        raise HypercallError(Errno.EINVAL, f"bind_vcpu of {EvtchnStat(p.state).name} port {port}")

    def unmask(self, port: int) -> None:
        if not self.valid(port):
            raise HypercallError(Errno.EINVAL, f"unmask of port {port}")
        self.delivery.unmask(port, self.table.get(port))

    def guest_reset(self) -> None:
        """EVTCHNOP_reset: close every port (VMM services see on_close) and return to 2-level."""
        with self.d.lock:
            for p in sorted(self.table, key=lambda q: q.port):
                if p.port in self.table:
                    self.close_port(p, from_guest=True)
            self.table.clear()
            self.delivery = TwoLevel(self.d, self.table, self.signal)

    def init_control(self, gfn: int, offset: int, vcpu: int) -> None:
        """EVTCHNOP_init_control: the delivery object decides (2-level switches to FIFO)."""
        self.check_vcpu(vcpu)
        if offset > 4096 - CB_SIZE or offset & 7:
            raise HypercallError(Errno.EINVAL, f"control block offset {offset:#x}")
        self.delivery = self.delivery.init_control(vcpu, gfn, offset)

    def expand_array(self, gfn: int) -> None:
        self.delivery.expand_array(gfn)

    def set_priority(self, port: int, priority: int) -> None:
        if not self.valid(port):
            raise HypercallError(Errno.EINVAL, f"set_priority of port {port}")
        self.delivery.set_priority(self.table.get(port), priority)

    # -- the domain's side ----------------------------------------------------------------
    def resend_pending(self, vcpu_id: int) -> None:
        """Deliver events that became pending before ``vcpu_id`` could take them.

        Called by the domain when the vCPU registers its vcpu_info or upcall
        vector (and safe to call at any time: at worst a spurious upcall).
        """
        with self.d.lock:
            if not self.d.valid_vcpu(vcpu_id):
                return
            raised = self.signal.raised
            want = self.delivery.resend(vcpu_id)
            if (want or self.signal.upcall_pending(vcpu_id)) and self.signal.raised == raised:
                self.signal.force(vcpu_id)

    def poll(self, vcpu: int, ports: Iterable[int], timeout_abs_ns: int = 0) -> int:
        """SCHEDOP_poll for ``vcpu`` (see poll.py); caller holds the lock."""
        return _poll.poll(self, vcpu, ports, timeout_abs_ns)

    def kick_pollers(self) -> None:
        """Wake every vCPU blocked in SCHEDOP_poll (pause, shutdown)."""
        with self.d.lock:
            self.pollers.kick_all()

    def reset(self) -> None:
        """Forget every port and go back to 2-level (domain reset; no callbacks run)."""
        with self.d.lock:
            self.table.clear()
            self.vmm.clear()
            self.signal.forget()
            self.delivery = TwoLevel(self.d, self.table, self.signal)

    # -- the VMM services' API (vmm.py documents it) ---------------------------------------
    def alloc_vmm_port(self, on_notify: Callable[[], None], vcpu: int = 0, *,
                       on_close: Callable[[], None] | None = None) -> int:
        """A guest port bound to a VMM service (status: interdomain, remote domain 0)."""
        return self.vmm.alloc(on_notify, vcpu, on_close)

    def bind_vmm_to_guest_port(self, port: int, on_notify: Callable[[], None] | None = None, *,
                               on_close: Callable[[], None] | None = None, direct: bool = False,
                               kick_fd: int | None = None) -> int:
        """Bind a VMM service to a guest port unbound to domain 0; returns ``port``.

        ``direct``: ``on_notify`` runs in the sender's thread; ``kick_fd``: instead of
        ``on_notify``, a send writes that eventfd, in C where it can (see vmm.py)."""
        return self.vmm.bind(port, on_notify, on_close, direct, kick_fd)

    def close_vmm_port(self, port: int) -> None:
        """The VMM closes its end: the guest port becomes unbound (to domain 0), as in Xen."""
        self.vmm.close(port)

    # notify(port) and raise_virq(virq, vcpu_id) are VmmPorts' methods, bound in __init__.

    def status(self, port: int) -> dict | None:
        """A plain description of a port (None if it is not allocated)."""
        return self.vmm.status(port)

    # -- save / restore -------------------------------------------------------------------
    def to_state(self) -> dict:
        """Plain-data snapshot (guest-memory bits are saved with guest memory)."""
        with self.d.lock:
            return {
                "version": 1,
                "max_port": self.table.max_port,
                "ports": [p.to_state() for p in sorted(self.table, key=lambda q: q.port)],
                "vmm_next": self.vmm.next_id,
                "vmm_queued": sorted(e.id for e in self.vmm.ends.values() if e.queued),
                "fifo": self.delivery.to_state(),
            }

    def from_state(self, state: dict) -> None:
        """Restore a :meth:`to_state` snapshot; VMM services re-attach with bind_vmm_to_guest_port()."""
        with self.d.lock:
            self.reset()
            self.table.max_port = int(state.get("max_port", self.table.max_port))
            self.vmm.next_id = int(state.get("vmm_next", 1))
            queued = set(state.get("vmm_queued", []))
            for s in state.get("ports", []):
                p = Port.from_state(s)
                if s.get("vmm") is not None:
                    self.vmm.restore(p, int(s["vmm"]), int(s["vmm"]) in queued)
                self.table.insert(p)
            if state.get("fifo") is not None:
                self.delivery = Fifo.from_state(self.d, self.table, self.signal, state["fifo"])
