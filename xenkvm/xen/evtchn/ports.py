"""The port table: which ports exist, their state and binding (no delivery here).

A port is a numbered endpoint in the guest.  Its state is one of closed
(free: absent from the table), unbound (waiting for a remote domain to bind),
interdomain (bound to a remote end: another port of the same domain for a
loopback, or a VMM service), virq or ipi.  Each port notifies one vCPU.

Xen rules kept here (``common/event_channel.c``): port 0 is reserved and never
handed out; ``get_free_port`` returns the lowest free port and -ENOSPC past the
domain's ``max_evtchn_port`` (``xen/limits.py``) or the ABI's port count; a
VIRQ is bound at most once per (vCPU, VIRQ), the global ones on vCPU 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator

from xenkvm.xen.abi import Errno, EvtchnStat, lib
from xenkvm.xen.errors import HypercallError

NR_VIRQS = lib.NR_VIRQS
#: Xen's virq_is_global() is false for these: they bind on any vCPU, the rest on vCPU 0 only.
PER_VCPU_VIRQS = frozenset({lib.VIRQ_TIMER, lib.VIRQ_DEBUG, lib.VIRQ_XENOPROF, lib.VIRQ_XENPMU})
PRIORITY_DEFAULT = lib.EVTCHN_FIFO_PRIORITY_DEFAULT


class PortState(IntEnum):
    """A port's state, numbered as EVTCHNOP_status reports it (EVTCHNSTAT_*)."""

    CLOSED = int(EvtchnStat.closed)
    UNBOUND = int(EvtchnStat.unbound)
    INTERDOMAIN = int(EvtchnStat.interdomain)
    VIRQ = int(EvtchnStat.virq)
    IPI = int(EvtchnStat.ipi)


@dataclass(eq=False)
class VmmEnd:
    """The VMM ("domain 0") end of an interdomain channel."""

    id: int                                          #: reported to the guest as the remote port
    on_notify: Callable[[], None] | None
    on_close: Callable[[], None] | None = None
    port: int = 0                                    #: the guest port it is bound to
    queued: bool = False                             #: an on_notify call is queued (or owed)
    direct: bool = False                             #: on_notify runs in the sender's thread
    kick_fd: int | None = None                       #: a send writes this eventfd (xen/fastpath.py)


@dataclass(eq=False, slots=True)
class Port:
    """One allocated port (free ports are absent from the table)."""

    port: int
    state: PortState
    vcpu: int = 0                      #: the vCPU it notifies
    remote_dom: int = 0                #: unbound: who may bind; interdomain: the peer domain
    remote_port: int = 0               #: interdomain: the peer port (VMM end id for remote 0)
    virq: int = -1
    vmm: VmmEnd | None = None          #: the VMM end of a port bound to a VMM service
    priority: int = PRIORITY_DEFAULT   #: FIFO priority
    saved_pending: bool = False        #: pending while its bit/word had nowhere to go
    last_vcpu: int = 0                 #: FIFO: the queue it was last linked on
    last_prio: int = PRIORITY_DEFAULT

    def to_state(self) -> dict:
        return {"port": self.port, "state": int(self.state), "vcpu": self.vcpu,
                "remote_dom": self.remote_dom, "remote_port": self.remote_port, "virq": self.virq,
                "vmm": self.vmm.id if self.vmm else None, "priority": self.priority,
                "saved_pending": self.saved_pending, "last": [self.last_vcpu, self.last_prio]}

    @classmethod
    def from_state(cls, s: dict) -> "Port":
        p = cls(int(s["port"]), PortState(int(s["state"])), int(s["vcpu"]))
        p.remote_dom, p.remote_port, p.virq = int(s["remote_dom"]), int(s["remote_port"]), int(s["virq"])
        p.priority = int(s.get("priority", PRIORITY_DEFAULT))
        p.saved_pending = bool(s.get("saved_pending", False))
        p.last_vcpu, p.last_prio = (int(x) for x in s.get("last", [p.vcpu, p.priority]))
        return p


def virq_key(virq: int, vcpu: int) -> tuple[int, int]:
    """The (vcpu, virq) slot of a binding: global VIRQs live on vCPU 0."""
    return (vcpu if virq in PER_VCPU_VIRQS else 0, virq)


@dataclass
class PortTable:
    """The ports of one domain, lowest-free-first allocation, and the VIRQ bindings."""

    max_port: int                                       #: the domain's highest usable port
    ports: dict[int, Port] = field(default_factory=dict)
    virqs: dict[tuple[int, int], int] = field(default_factory=dict)   #: (vcpu, virq) -> port
    _free_hint: int = 1

    def __contains__(self, port: int) -> bool:
        return port in self.ports

    def __len__(self) -> int:
        return len(self.ports)

    def __iter__(self) -> Iterator[Port]:
        return iter(list(self.ports.values()))

    def get(self, port: int) -> Port | None:
        return self.ports.get(port)

    def limit(self, abi_channels: int) -> int:
        """Port numbers below this are valid: the domain's limit within the ABI's."""
        return min(self.max_port + 1, abi_channels)

    def alloc(self, state: PortState, vcpu: int, abi_channels: int, busy: Callable[[int], bool]) -> Port:
        """The lowest free port not ``busy`` (a FIFO word still LINKED), or -ENOSPC."""
        limit = self.limit(abi_channels)
        port = max(1, self._free_hint)
        first_busy = 0      # the first free port still busy: the hint stays there
        while port < limit:
            if port not in self.ports:
                if not busy(port):
                    p = self.ports[port] = Port(port, state, vcpu)
                    self._free_hint = first_busy or port + 1
                    return p
                first_busy = first_busy or port
            port += 1
        if first_busy:
            self._free_hint = first_busy
        raise HypercallError(Errno.ENOSPC, "no free event channel")

    def free(self, p: Port) -> None:
        """Forget ``p`` (its VIRQ binding too)."""
        if p.state == PortState.VIRQ:
            key = virq_key(p.virq, p.vcpu)
            if self.virqs.get(key) == p.port:
                del self.virqs[key]
        self.ports.pop(p.port, None)
        if p.port < self._free_hint:
            self._free_hint = p.port

    def bind_virq(self, p: Port, virq: int) -> None:
        p.virq = virq
        self.virqs[virq_key(virq, p.vcpu)] = p.port

    def virq_port(self, virq: int, vcpu: int) -> Port | None:
        port = self.virqs.get(virq_key(virq, vcpu))
        return self.ports.get(port) if port is not None else None

    def insert(self, p: Port) -> None:
        """Put a restored port back (save/restore)."""
        self.ports[p.port] = p
        if p.state == PortState.VIRQ:
            self.virqs[virq_key(p.virq, p.vcpu)] = p.port

    def clear(self) -> None:
        self.ports.clear()
        self.virqs.clear()
        self._free_hint = 1
