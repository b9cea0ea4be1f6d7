"""Event channels: the port table, the 2-level ABI, EVTCHNOP_*, SCHEDOP_poll, and the VMM side.

A port is a numbered endpoint in the guest; its state is one of closed
(free), unbound (waiting for a remote domain to bind), interdomain (bound to a
remote end: another guest port for loopback, or a VMM service), virq or ipi.
Each port notifies one vCPU (``vcpu``).  Delivery depends on the ABI the
guest chose:

* **2-level** (the default): a pending bit and a mask bit per port in
  ``shared_info.evtchn_pending/evtchn_mask`` (4096 ports of 64-bit words);
  an unmasked newly-pending port sets bit ``port/64`` of the target vCPU's
  ``evtchn_pending_sel``, then ``evtchn_upcall_pending``, then the upcall.
* **FIFO** (after EVTCHNOP_init_control; see ``evtchn_fifo.py``).

Delivery never loses an event: a port notified before the guest mapped
shared_info (or before its FIFO event-array page exists) is remembered and
made pending when the page appears; a vCPU with no vcpu_info / upcall vector
yet keeps its bits pending and gets them again from :meth:`resend_pending`,
which the domain calls when the vCPU registers them.

Xen behaviour reproduced (Xen 4.17 ``common/event_channel.c``): lowest free
port first, port 0 reserved; ``send`` on an unbound port is dropped silently
and on virq/closed ports is -EINVAL; ``bind_interdomain`` marks the new local
port pending (notifications sent to the unbound remote may have been lost);
closing one end of an interdomain pair leaves the other unbound to the
closer; ``bind_vcpu`` works on unbound, interdomain and global-virq ports
only; per-vCPU VIRQs are TIMER, DEBUG, XENOPROF and XENPMU, the rest are
global and bind on vCPU 0 only; a bad vCPU id is -ENOENT.

The VMM plays domain 0: services (console, xenstore, backends) own "VMM ends"
bound to guest ports.  A guest ``send`` on such a port runs the service's
``on_notify`` on the I/O thread (coalesced: at most one queued call per end);
the service signals the guest with :meth:`notify`.

Everything here runs under ``domain.lock`` (hypercalls via the dispatcher;
VMM calls take it).
"""
from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from xenkvm.kvm._kvm_cffi import ffi as kffi
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import DOMID_SELF, Errno, EvtchnOp, EvtchnStat, Hypercall, SchedOp, ffi, handle_offset, lib
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn_fifo import NR_CHANNELS as FIFO_NR_CHANNELS
from xenkvm.xen.evtchn_fifo import NR_PRIORITIES, PRIORITY_DEFAULT, FifoEvents
from xenkvm.xen.limits import of as limits_of

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call, Dispatcher

log = logging.getLogger(__name__)

NR_2L_CHANNELS = 64 * 64        #: 2-level ports for a 64-bit guest
NR_VIRQS = lib.NR_VIRQS
PER_VCPU_VIRQS = frozenset({lib.VIRQ_TIMER, lib.VIRQ_DEBUG, lib.VIRQ_XENOPROF, lib.VIRQ_XENPMU})
POLL_MAX_PORTS = 128            #: Xen's limit for SCHEDOP_poll
POLL_MAX_BLOCK_NS = 5_000_000   #: a polling vCPU thread blocks at most this long per call

ST_CLOSED = int(EvtchnStat.closed)
ST_UNBOUND = int(EvtchnStat.unbound)
ST_INTERDOMAIN = int(EvtchnStat.interdomain)
ST_VIRQ = int(EvtchnStat.virq)
ST_IPI = int(EvtchnStat.ipi)

_SHINFO_PENDING = ffi.offsetof("struct shared_info", "evtchn_pending")
_SHINFO_MASK = ffi.offsetof("struct shared_info", "evtchn_mask")
_VI_SEL = ffi.offsetof("struct vcpu_info", "evtchn_pending_sel")
_VI_SIZE = ffi.sizeof("struct vcpu_info")

# Hot-path C helpers, bound once.
_test_and_set = klib.xk_test_and_set_bit
_test_and_clear = klib.xk_test_and_clear_bit
_test = klib.xk_test_bit
_xchg8 = klib.xk_xchg8


def _off(st: str, field: str) -> int:
    return ffi.offsetof(f"struct {st}", field)


def _size(st: str) -> int:
    return ffi.sizeof(f"struct {st}")


class EvtchnError(ValueError):
    """A VMM-side request that the port table cannot honour (bad or busy port)."""


class Port:
    """One allocated port (free ports are simply absent from the table)."""

    __slots__ = ("port", "state", "vcpu", "remote_dom", "remote_port", "virq", "vmm",
                 "priority", "saved_pending", "last_vcpu", "last_prio")

    def __init__(self, port: int, state: int, vcpu: int = 0):
        self.port = port
        self.state = state
        self.vcpu = vcpu                  #: the vCPU it notifies
        self.remote_dom = 0               #: unbound: who may bind; interdomain: the peer domain
        self.remote_port = 0              #: interdomain: the peer port (VMM end id for remote 0)
        self.virq = -1
        self.vmm: VmmEnd | None = None    #: the VMM end of a port bound to a VMM service
        self.priority = PRIORITY_DEFAULT  #: FIFO priority
        self.saved_pending = False        #: pending while its bit/word had nowhere to go
        self.last_vcpu = 0                #: FIFO: the queue it was last linked on
        self.last_prio = PRIORITY_DEFAULT

    def to_state(self) -> dict:
        return {"port": self.port, "state": self.state, "vcpu": self.vcpu,
                "remote_dom": self.remote_dom, "remote_port": self.remote_port, "virq": self.virq,
                "vmm": self.vmm.id if self.vmm else None, "priority": self.priority,
                "saved_pending": self.saved_pending, "last": [self.last_vcpu, self.last_prio]}


@dataclass(eq=False)
class VmmEnd:
    """The VMM ("domain 0") end of an interdomain channel."""

    id: int                                          #: reported to the guest as the remote port
    on_notify: Callable[[], None] | None
    on_close: Callable[[], None] | None = None
    port: int = 0                                    #: the guest port it is bound to
    queued: bool = False                             #: an on_notify call is queued (or owed)


class EventChannels:
    """Event channels of one domain (``domain.evtchn``)."""

    def __init__(self, domain, *, max_port: int | None = None):
        self.d = domain
        self.mem = domain.mem
        if max_port is None:   # Xen's get_free_port: -ENOSPC for a port past the domain's max
            max_port = limits_of(domain).max_evtchn_port
        self.max_port = max(1, min(int(max_port), FIFO_NR_CHANNELS - 1))
        self.ports: dict[int, Port] = {}
        #: (vcpu, virq) -> port; global VIRQs are kept under vCPU 0.
        self.virqs: dict[tuple[int, int], int] = {}
        self.vmm_ends: dict[int, VmmEnd] = {}
        self.fifo: FifoEvents | None = None
        self._next_vmm_id = 1
        self._free_hint = 1
        self._sh_gpa: int | None = None
        self._sh = None          # (pending, mask) as uint64_t *; None while unmapped
        self._vi_cache: dict[int, object] = {}
        self._poll = threading.Condition(domain.lock)
        self._pollers = 0
        self._kicks = [0] * len(domain.vcpus)
        self.raised = 0          #: upcalls raised (statistics; resend_pending avoids doubles)
        self._status_u = lib.XK_OFF_evtchn_status__u
        self._ido_port = ffi.offsetof("xk_evtchn_interdomain_status", "port")

    # ======================================================================
    # hypercall registration
    # ======================================================================
    def register_hypercalls(self, dispatcher: "Dispatcher") -> None:
        ops = {
            EvtchnOp.alloc_unbound: self._op_alloc_unbound,
            EvtchnOp.bind_interdomain: self._op_bind_interdomain,
            EvtchnOp.bind_virq: self._op_bind_virq,
            EvtchnOp.bind_ipi: self._op_bind_ipi,
            EvtchnOp.close: self._op_close,
            EvtchnOp.send: self._op_send,
            EvtchnOp.status: self._op_status,
            EvtchnOp.bind_vcpu: self._op_bind_vcpu,
            EvtchnOp.unmask: self._op_unmask,
            EvtchnOp.reset: self._op_reset,
            EvtchnOp.init_control: self._op_init_control,
            EvtchnOp.expand_array: self._op_expand_array,
            EvtchnOp.set_priority: self._op_set_priority,
        }
        for op, fn in ops.items():
            dispatcher.register_subop(Hypercall.event_channel_op, op, fn)
        dispatcher.register_subop(Hypercall.sched_op, SchedOp.poll, self._op_poll)

    # ======================================================================
    # the port table
    # ======================================================================
    @property
    def abi(self) -> str:
        return "fifo" if self.fifo is not None else "2l"

    def nr_channels(self) -> int:
        """Port numbers below this are valid for the current ABI."""
        cap = FIFO_NR_CHANNELS if self.fifo is not None else NR_2L_CHANNELS
        return min(self.max_port + 1, cap)

    def _valid(self, port: int) -> bool:
        return 0 <= port < self.nr_channels()

    def _alloc(self, state: int, vcpu: int = 0) -> Port:
        limit = self.nr_channels()
        fifo = self.fifo
        port = max(1, self._free_hint)
        busy = 0        # the first free port still LINKED on a FIFO queue: the hint stays there
        while port < limit:
            if port not in self.ports:
                if fifo is None or not fifo.is_busy(port):
                    p = self.ports[port] = Port(port, state, vcpu)
                    self._free_hint = busy or port + 1
                    return p
                busy = busy or port
            port += 1
        if busy:
            self._free_hint = busy
        raise HypercallError(Errno.ENOSPC, "no free event channel")

    def _free(self, p: Port) -> None:
        self._clear_pending(p)
        self.ports.pop(p.port, None)
        if p.port < self._free_hint:
            self._free_hint = p.port

    def _check_vcpu(self, vcpu: int) -> None:
        if not self.d.valid_vcpu(vcpu):
            raise HypercallError(Errno.ENOENT, f"no vcpu {vcpu}")

    def _check_self(self, dom: int) -> None:
        """``dom`` of a hypercall struct must name the caller (we are never privileged)."""
        if dom == DOMID_SELF or dom == self.d.domid:
            return
        raise HypercallError(Errno.EPERM if dom == 0 else Errno.ESRCH, f"domain {dom}")

    def _is_self(self, dom: int) -> bool:
        return dom == DOMID_SELF or dom == self.d.domid

    # ======================================================================
    # delivery: 2-level bits, FIFO, upcalls
    # ======================================================================
    def _shinfo(self):
        """(pending, mask) ``uint64_t *`` into shared_info, or None while it is not mapped."""
        gpa = self.d.shinfo.gpa
        if gpa != self._sh_gpa:
            self._sh_gpa = gpa
            self._sh = None
            if gpa is not None:
                try:
                    host = self.mem.host_address(gpa + _SHINFO_PENDING, _SHINFO_MASK + NR_2L_CHANNELS // 8 - _SHINFO_PENDING)
                except GuestMemoryError:
                    log.warning("shared_info at %#x is not in guest memory", gpa)
                    return None
                base = kffi.cast("uint64_t *", host)
                self._sh = (base, base + (_SHINFO_MASK - _SHINFO_PENDING) // 8)
                if self.fifo is None:
                    self._flush_saved()
        return self._sh

    def _flush_saved(self) -> None:
        for p in [p for p in self.ports.values() if p.saved_pending]:
            p.saved_pending = False
            self._set_pending(p)

    def _vcpu_info(self, vcpu: int):
        """(``uint8_t *`` vcpu_info, ``void *`` evtchn_pending_sel), or None if it has none usable yet."""
        gpa = self.d.vcpu_info_gpa(vcpu)
        if gpa is None:
            return None
        ptrs = self._vi_cache.get(gpa)
        if ptrs is None:
            if gpa & 7:
                return None
            try:
                host = self.mem.host_address(gpa, _VI_SIZE)
            except GuestMemoryError:
                return None
            if len(self._vi_cache) > 1024:
                self._vi_cache.clear()
            ptrs = self._vi_cache[gpa] = (kffi.cast("uint8_t *", host), kffi.cast("void *", host + _VI_SEL))
        return ptrs

    def _mark_upcall(self, vcpu: int) -> None:
        """Set the vCPU's evtchn_upcall_pending; raise the upcall on a 0 -> 1 change."""
        ptrs = self._vcpu_info(vcpu)
        if ptrs is None:
            if self._pollers:
                self._kick_poller(vcpu)
            return              # resend_pending() delivers it once the vCPU has a vcpu_info
        self._upcall(vcpu, ptrs[0])

    def _upcall(self, vcpu: int, vi) -> None:
        if self._pollers:
            self._kick_poller(vcpu)
        if not _xchg8(vi, 1):
            self.raised += 1
            self.d.upcalls.raise_(vcpu)

    def _kick_poller(self, vcpu: int) -> None:
        if 0 <= vcpu < len(self._kicks):
            self._kicks[vcpu] += 1
        self._poll.notify_all()

    def _set_pending(self, p: Port) -> None:
        """Make ``p`` pending and deliver it to its vCPU if unmasked."""
        if self.fifo is not None:
            if self.fifo.set_pending(p) and self._pollers:
                self._poll.notify_all()
            return
        sh = self._sh if self.d.shinfo.gpa == self._sh_gpa else self._shinfo()
        if sh is None:
            p.saved_pending = True
            return
        port = p.port
        if _test_and_set(sh[0], port):
            return
        if not _test(sh[1], port):
            self._set_sel(p.vcpu, port >> 6)
        if self._pollers:
            self._poll.notify_all()

    def _set_sel(self, vcpu: int, word: int) -> None:
        ptrs = self._vcpu_info(vcpu)
        if ptrs is None:
            if self._pollers:
                self._kick_poller(vcpu)
            return              # bits stay pending; resend_pending() sets sel later
        if not _test_and_set(ptrs[1], word):
            self._upcall(vcpu, ptrs[0])

    def _clear_pending(self, p: Port) -> None:
        p.saved_pending = False
        if self.fifo is not None:
            self.fifo.clear_pending(p)
            return
        sh = self._shinfo()
        if sh is not None:
            klib.xk_test_and_clear_bit(sh[0], p.port)

    def is_pending(self, port: int) -> bool:
        p = self.ports.get(port)
        if p is not None and p.saved_pending:
            return True
        if self.fifo is not None:
            return self.fifo.is_pending(port)
        sh = self._shinfo()
        return sh is not None and 0 <= port < NR_2L_CHANNELS and bool(klib.xk_test_bit(sh[0], port))

    def is_masked(self, port: int) -> bool:
        if self.fifo is not None:
            return self.fifo.is_masked(port)
        sh = self._shinfo()
        return sh is None or not 0 <= port < NR_2L_CHANNELS or bool(klib.xk_test_bit(sh[1], port))

    def _unmask(self, port: int) -> None:
        p = self.ports.get(port)
        if self.fifo is not None:
            if p is not None:
                self.fifo.unmask(p)
            else:
                w = self.fifo.word(port)
                if w is not None:
                    klib.xk_fetch_and32(w, ~(1 << lib.EVTCHN_FIFO_MASKED) & 0xFFFFFFFF)
            return
        sh = self._shinfo()
        if sh is None:
            return
        pending, mask = sh
        klib.xk_test_and_clear_bit(mask, port)
        # Xen re-raises only when the mask bit was set; doing it whenever the
        # port is pending costs at most a spurious upcall and never loses one.
        if p is not None and klib.xk_test_bit(pending, port):
            self._set_sel(p.vcpu, port >> 6)

    def resend_pending(self, vcpu_id: int) -> None:
        """Deliver events that became pending before ``vcpu_id`` could take them.

        Called by the domain when the vCPU registers its vcpu_info or upcall
        vector (and safe to call at any time: at worst a spurious upcall).
        """
        with self.d.lock:
            if not self.d.valid_vcpu(vcpu_id):
                return
            raised = self.raised
            if self.fifo is not None:
                want = self.fifo.requeue(vcpu_id)
            else:
                want = self._resend_2l(vcpu_id)
            ptrs = self._vcpu_info(vcpu_id)
            vi = ptrs[0] if ptrs is not None else None
            if vi is not None and (want or vi[0]) and self.raised == raised:
                _xchg8(vi, 1)
                self.raised += 1
                self.d.upcalls.raise_(vcpu_id)

    def _resend_2l(self, vcpu_id: int) -> bool:
        """Set sel bits for pending, unmasked ports of ``vcpu_id``; True if its sel is non-zero."""
        sh = self._shinfo()             # (flushes events remembered while it was unmapped)
        ptrs = self._vcpu_info(vcpu_id)
        if sh is None or ptrs is None:
            return False
        pending, mask = sh
        sel = kffi.cast("uint64_t *", ptrs[1])
        for i in range(NR_2L_CHANNELS // 64):
            bits = pending[i] & ~mask[i] & 0xFFFFFFFFFFFFFFFF
            while bits:
                low = bits & -bits
                port = i * 64 + low.bit_length() - 1
                bits ^= low
                p = self.ports.get(port)
                if p is not None and p.vcpu == vcpu_id:
                    klib.xk_test_and_set_bit(sel, i)
                    break
        return sel[0] != 0

    # ======================================================================
    # VMM-side API
    # ======================================================================
    def alloc_vmm_port(self, on_notify: Callable[[], None], vcpu: int = 0, *,
                       on_close: Callable[[], None] | None = None) -> int:
        """A guest port bound to a VMM service (status: interdomain, remote domain 0).

        A guest EVTCHNOP_send on it runs ``on_notify()`` on the I/O thread;
        ``on_close()`` runs there too if the guest closes the port.
        """
        with self.d.lock:
            if not self.d.valid_vcpu(vcpu):
                raise EvtchnError(f"no vcpu {vcpu}")
            try:
                p = self._alloc(ST_INTERDOMAIN, vcpu)
            except HypercallError:
                raise EvtchnError("no free event channel") from None
            self._attach_vmm(p, on_notify, on_close)
            return p.port

    def bind_vmm_to_guest_port(self, port: int, on_notify: Callable[[], None], *,
                               on_close: Callable[[], None] | None = None) -> int:
        """Bind a VMM backend to a guest port allocated with EVTCHNOP_alloc_unbound(remote_dom=0).

        Returns ``port``.  Raises :class:`EvtchnError` unless the port is unbound to domain 0.

        Also re-attaches callbacks to a port restored by :meth:`from_state`.
        As in Xen's bind_interdomain, the binder's end is notified once (events
        the guest sent while the port was unbound were dropped).
        """
        with self.d.lock:
            p = self.ports.get(port) if isinstance(port, int) else None
            if p is not None and p.state == ST_INTERDOMAIN and p.vmm is not None and p.vmm.on_notify is None:
                p.vmm.on_notify, p.vmm.on_close = on_notify, on_close
                if p.vmm.queued:
                    p.vmm.queued = False
                    self._queue_notify(p.vmm)
                return port
            if p is None or p.state != ST_UNBOUND or p.remote_dom != 0:
                raise EvtchnError(f"guest port {port!r} is not unbound to domain 0")
            p.state = ST_INTERDOMAIN
            end = self._attach_vmm(p, on_notify, on_close)
            self._queue_notify(end)
            return port

    def close_vmm_port(self, port: int) -> None:
        """The VMM closes its end: the guest port becomes unbound (to domain 0), as in Xen."""
        with self.d.lock:
            p = self.ports.get(port)
            if p is None or p.vmm is None:
                return
            self.vmm_ends.pop(p.vmm.id, None)
            p.vmm = None
            p.state, p.remote_dom, p.remote_port = ST_UNBOUND, 0, 0

    def notify(self, port: int) -> None:
        """A VMM service signals the guest on its port (ignored unless bound to the VMM)."""
        with self.d.lock:
            p = self.ports.get(port)
            if p is None or p.vmm is None:
                log.debug("notify on port %r which is not bound to the VMM", port)
                return
            self._set_pending(p)

    def raise_virq(self, virq: int, vcpu_id: int) -> bool:
        """Raise a VIRQ (per-vCPU ones on ``vcpu_id``); False if the guest has not bound it."""
        with self.d.lock:
            key = (vcpu_id if virq in PER_VCPU_VIRQS else 0, virq)
            port = self.virqs.get(key)
            if port is None:
                return False
            p = self.ports.get(port)
            if p is None:
                return False
            self._set_pending(p)
            return True

    def status(self, port: int) -> dict | None:
        """A plain description of a port (None if it is not allocated)."""
        with self.d.lock:
            p = self.ports.get(port)
            if p is None:
                return None
            out = {"port": p.port, "state": EvtchnStat(p.state).name, "vcpu": p.vcpu,
                   "pending": self.is_pending(port), "masked": self.is_masked(port)}
            if p.state in (ST_UNBOUND, ST_INTERDOMAIN):
                out["remote_dom"] = p.remote_dom
            if p.state == ST_INTERDOMAIN:
                out["remote_port"] = p.remote_port
                out["vmm"] = p.vmm is not None
            if p.state == ST_VIRQ:
                out["virq"] = p.virq
            if self.fifo is not None:
                out["priority"] = p.priority
            return out

    def kick_pollers(self) -> None:
        """Wake every vCPU blocked in SCHEDOP_poll (pause, shutdown)."""
        with self.d.lock:
            for v in range(len(self._kicks)):
                self._kicks[v] += 1
            self._poll.notify_all()

    def reset(self) -> None:
        """Forget every port and go back to 2-level (domain reset; no callbacks run)."""
        with self.d.lock:
            self.ports.clear()
            self.virqs.clear()
            self.vmm_ends.clear()
            self.fifo = None
            self._free_hint = 1
            self._sh_gpa = None
            self._sh = None
            self._vi_cache.clear()

    def _attach_vmm(self, p: Port, on_notify, on_close) -> VmmEnd:
        end = VmmEnd(self._next_vmm_id, on_notify, on_close, p.port)
        self._next_vmm_id += 1
        self.vmm_ends[end.id] = end
        p.vmm = end
        p.remote_dom, p.remote_port = 0, end.id
        return end

    def _queue_notify(self, end: VmmEnd) -> None:
        if end.queued:
            return
        end.queued = True
        if end.on_notify is None:
            return          # restored, not yet re-attached: owed on attach

        def run() -> None:
            with self.d.lock:
                end.queued = False
                fn = end.on_notify if self.vmm_ends.get(end.id) is end else None
            if fn is not None:
                fn()
        self.d.io.call_soon(run)

    def _vmm_closed(self, end: VmmEnd) -> None:
        self.vmm_ends.pop(end.id, None)
        if end.on_close is not None:
            self.d.io.call_soon(end.on_close)

    # ======================================================================
    # EVTCHNOP_*
    # ======================================================================
    _AU = ("evtchn_alloc_unbound", _off("evtchn_alloc_unbound", "dom"),
           _off("evtchn_alloc_unbound", "remote_dom"), _off("evtchn_alloc_unbound", "port"))

    def _op_alloc_unbound(self, call: "Call", arg: int) -> int:
        _, o_dom, o_rdom, o_port = self._AU
        raw = call.guest.read(arg, _size("evtchn_alloc_unbound"))
        dom, rdom = _u16(raw, o_dom), _u16(raw, o_rdom)
        self._check_self(dom)
        if rdom == DOMID_SELF:
            rdom = self.d.domid
        p = self._alloc(ST_UNBOUND)
        p.remote_dom = rdom
        try:
            call.guest.write_u32(arg + o_port, p.port)
        except HypercallError:
            self._free(p)
            raise
        return 0

    def _op_bind_interdomain(self, call: "Call", arg: int) -> int:
        st = "evtchn_bind_interdomain"
        raw = call.guest.read(arg, _size(st))
        rdom = _u16(raw, _off(st, "remote_dom"))
        rport = _u32(raw, _off(st, "remote_port"))
        if self._is_self(rdom):
            peer = self.ports.get(rport) if self._valid(rport) else None
            if peer is None or peer.state != ST_UNBOUND or peer.remote_dom != self.d.domid:
                raise HypercallError(Errno.EINVAL, f"loopback remote port {rport} is not unbound to us")
            p = self._alloc(ST_INTERDOMAIN)
            p.remote_dom, p.remote_port = self.d.domid, rport
            peer.state, peer.remote_dom, peer.remote_port = ST_INTERDOMAIN, self.d.domid, p.port
        elif rdom == 0:
            # The VMM keeps no unbound ports of its own for guests to bind.
            raise HypercallError(Errno.EINVAL, f"domain 0 port {rport} is not unbound to us")
        else:
            raise HypercallError(Errno.ESRCH, f"no domain {rdom}")
        try:
            call.guest.write_u32(arg + _off(st, "local_port"), p.port)
        except HypercallError:
            self._close(p, from_guest=True)
            raise
        self._set_pending(p)
        return 0

    def _op_bind_virq(self, call: "Call", arg: int) -> int:
        st = "evtchn_bind_virq"
        raw = call.guest.read(arg, _size(st))
        virq, vcpu = _u32(raw, _off(st, "virq")), _u32(raw, _off(st, "vcpu"))
        if virq >= NR_VIRQS:
            raise HypercallError(Errno.EINVAL, f"virq {virq}")
        per_vcpu = virq in PER_VCPU_VIRQS
        if not per_vcpu and vcpu != 0:
            raise HypercallError(Errno.EINVAL, f"global virq {virq} on vcpu {vcpu}")
        self._check_vcpu(vcpu)
        key = (vcpu, virq)
        if key in self.virqs:
            raise HypercallError(Errno.EEXIST, f"virq {virq} already bound on vcpu {vcpu}")
        p = self._alloc(ST_VIRQ, vcpu)
        p.virq = virq
        self.virqs[key] = p.port
        try:
            call.guest.write_u32(arg + _off(st, "port"), p.port)
        except HypercallError:
            self._close(p, from_guest=True)
            raise
        return 0

    def _op_bind_ipi(self, call: "Call", arg: int) -> int:
        st = "evtchn_bind_ipi"
        raw = call.guest.read(arg, _size(st))
        vcpu = _u32(raw, _off(st, "vcpu"))
        self._check_vcpu(vcpu)
        p = self._alloc(ST_IPI, vcpu)
        try:
            call.guest.write_u32(arg + _off(st, "port"), p.port)
        except HypercallError:
            self._free(p)
            raise
        return 0

    def _op_close(self, call: "Call", arg: int) -> int:
        port = call.guest.read_u32(arg + _off("evtchn_close", "port"))
        p = self.ports.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"close of free port {port}")
        self._close(p, from_guest=True)
        return 0

    def _close(self, p: Port, *, from_guest: bool) -> None:
        if p.state == ST_VIRQ:
            key = (p.vcpu if p.virq in PER_VCPU_VIRQS else 0, p.virq)
            if self.virqs.get(key) == p.port:
                del self.virqs[key]
        elif p.state == ST_INTERDOMAIN:
            if p.vmm is not None:
                end, p.vmm = p.vmm, None
                if from_guest:
                    self._vmm_closed(end)
                else:
                    self.vmm_ends.pop(end.id, None)
            else:
                peer = self.ports.get(p.remote_port)
                if peer is not None and peer.state == ST_INTERDOMAIN and peer.remote_port == p.port and peer.vmm is None:
                    peer.state, peer.remote_dom, peer.remote_port = ST_UNBOUND, self.d.domid, 0
        self._free(p)

    def _op_send(self, call: "Call", arg: int) -> int:
        return self._send(call.guest.read_u32(arg))

    def _send(self, port: int) -> int:
        """EVTCHNOP_send on ``port`` (caller holds the lock)."""
        p = self.ports.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"send on free port {port}")
        st = p.state
        if st == ST_INTERDOMAIN:
            if p.vmm is not None:
                self._queue_notify(p.vmm)
            else:
                peer = self.ports.get(p.remote_port)
                if peer is not None:
                    self._set_pending(peer)
        elif st == ST_IPI:
            self._set_pending(p)
        elif st != ST_UNBOUND:      # unbound: dropped silently, as Xen
            raise HypercallError(Errno.EINVAL, f"send on {EvtchnStat(st).name} port {port}")
        return 0

    _ST = "evtchn_status"

    def _op_status(self, call: "Call", arg: int) -> int:
        st = self._ST
        size = _size(st)
        raw = bytearray(call.guest.read(arg, size))
        self._check_self(_u16(raw, _off(st, "dom")))
        port = _u32(raw, _off(st, "port"))
        if not self._valid(port):
            raise HypercallError(Errno.EINVAL, f"status of port {port}")
        p = self.ports.get(port)
        u = self._status_u
        raw[u:size] = bytes(size - u)
        state, vcpu = ST_CLOSED, 0
        if p is not None:
            state, vcpu = p.state, p.vcpu
            if state == ST_UNBOUND:
                struct.pack_into("<H", raw, u, p.remote_dom)
            elif state == ST_INTERDOMAIN:
                struct.pack_into("<H", raw, u, p.remote_dom)
                struct.pack_into("<I", raw, u + self._ido_port, p.remote_port)
            elif state == ST_VIRQ:
                struct.pack_into("<I", raw, u, p.virq)
        struct.pack_into("<I", raw, _off(st, "status"), state)
        struct.pack_into("<I", raw, _off(st, "vcpu"), vcpu)
        call.guest.write(arg, raw)
        return 0

    def _op_bind_vcpu(self, call: "Call", arg: int) -> int:
        st = "evtchn_bind_vcpu"
        raw = call.guest.read(arg, _size(st))
        port, vcpu = _u32(raw, _off(st, "port")), _u32(raw, _off(st, "vcpu"))
        self._check_vcpu(vcpu)
        p = self.ports.get(port)
        if p is None:
            raise HypercallError(Errno.EINVAL, f"bind_vcpu of free port {port}")
        if p.state in (ST_UNBOUND, ST_INTERDOMAIN) or (p.state == ST_VIRQ and p.virq not in PER_VCPU_VIRQS):
            if p.vcpu != vcpu:
                p.vcpu = vcpu
                # Deliver to the new vCPU what was pending and unmasked (Linux
                # masks around a rebind, so normally nothing happens here).
                if self.fifo is None and self.is_pending(port) and not self.is_masked(port):
                    self._set_sel(vcpu, port >> 6)
            return 0
        raise HypercallError(Errno.EINVAL, f"bind_vcpu of {EvtchnStat(p.state).name} port {port}")

    def _op_unmask(self, call: "Call", arg: int) -> int:
        port = call.guest.read_u32(arg + _off("evtchn_unmask", "port"))
        if not self._valid(port):
            raise HypercallError(Errno.EINVAL, f"unmask of port {port}")
        self._unmask(port)
        return 0

    def _op_reset(self, call: "Call", arg: int) -> int:
        dom = _u16(call.guest.read(arg, _size("evtchn_reset")), _off("evtchn_reset", "dom"))
        self._check_self(dom)
        self.guest_reset()
        return 0

    def guest_reset(self) -> None:
        """EVTCHNOP_reset: close every port (VMM services see on_close) and return to 2-level."""
        with self.d.lock:
            for p in sorted(self.ports.values(), key=lambda q: q.port):
                if p.port in self.ports:
                    self._close(p, from_guest=True)
            self.virqs.clear()
            self.fifo = None
            self._free_hint = 1

    def _op_init_control(self, call: "Call", arg: int) -> int:
        st = "evtchn_init_control"
        raw = call.guest.read(arg, _size(st))
        gfn = struct.unpack_from("<Q", raw, _off(st, "control_gfn"))[0]
        offset, vcpu = _u32(raw, _off(st, "offset")), _u32(raw, _off(st, "vcpu"))
        self._check_vcpu(vcpu)
        if offset > 4096 - ffi.sizeof("struct evtchn_fifo_control_block") or offset & 7:
            raise HypercallError(Errno.EINVAL, f"control block offset {offset:#x}")
        if self.fifo is None:
            fifo = FifoEvents(self, len(self.d.vcpus))
            fifo.map_control(vcpu, gfn, offset)      # raises: stay 2-level
            # Switch: ports keep their bindings; 2-level pending bits are
            # carried over (queued once their event-array page exists).
            sh = self._shinfo()
            for p in self.ports.values():
                if sh is not None and p.port < NR_2L_CHANNELS and klib.xk_test_bit(sh[0], p.port):
                    p.saved_pending = True
                p.priority = p.last_prio = PRIORITY_DEFAULT
                p.last_vcpu = p.vcpu
            self.fifo = fifo
        else:
            self.fifo.map_control(vcpu, gfn, offset)
            if self.fifo.requeue(vcpu):
                self._mark_upcall(vcpu)
        # Xen copies the struct back (link_bits is an output) only on success.
        call.guest.write(arg + _off(st, "link_bits"), bytes([lib.EVTCHN_FIFO_LINK_BITS]))
        return 0

    def _op_expand_array(self, call: "Call", arg: int) -> int:
        gfn = call.guest.read_u64(arg + _off("evtchn_expand_array", "array_gfn"))
        if self.fifo is None:
            raise HypercallError(Errno.EOPNOTSUPP, "expand_array before init_control")
        self.fifo.add_array_page(gfn)
        return 0

    def _op_set_priority(self, call: "Call", arg: int) -> int:
        st = "evtchn_set_priority"
        raw = call.guest.read(arg, _size(st))
        port, prio = _u32(raw, _off(st, "port")), _u32(raw, _off(st, "priority"))
        if not self._valid(port):
            raise HypercallError(Errno.EINVAL, f"set_priority of port {port}")
        if self.fifo is None:
            raise HypercallError(Errno.ENOSYS, "set_priority needs the FIFO ABI")
        if prio >= NR_PRIORITIES:
            raise HypercallError(Errno.EINVAL, f"priority {prio}")
        p = self.ports.get(port)
        if p is not None:
            p.priority = prio      # takes effect the next time it is queued
        return 0

    # ======================================================================
    # SCHEDOP_poll
    # ======================================================================
    _POLL_SIZE = _size("sched_poll")
    _POLL_PORTS = handle_offset("sched_poll", "ports")
    _POLL_NR = _off("sched_poll", "nr_ports")
    _POLL_TIMEOUT = _off("sched_poll", "timeout")

    def _op_poll(self, call: "Call", arg: int) -> int:
        raw = call.guest.read(arg, self._POLL_SIZE)
        nr = _u32(raw, self._POLL_NR)
        timeout = struct.unpack_from("<Q", raw, self._POLL_TIMEOUT)[0]
        gva = struct.unpack_from("<Q", raw, self._POLL_PORTS)[0]
        if nr > POLL_MAX_PORTS:
            raise HypercallError(Errno.EINVAL, f"poll of {nr} ports")
        ports = struct.unpack(f"<{nr}I", call.guest.read(gva, 4 * nr)) if nr else ()
        limit = self.nr_channels()
        for port in ports:
            if port >= limit:
                raise HypercallError(Errno.EINVAL, f"poll of port {port}")
        return self.poll(call.vcpu_id, ports, timeout)

    def poll(self, vcpu: int, ports, timeout_abs_ns: int = 0) -> int:
        """Block the calling vCPU thread until a port is pending, an upcall for it, or the timeout.

        Blocks at most POLL_MAX_BLOCK_NS per call (returning early is allowed:
        guests re-check and poll again) and releases the big lock while waiting.
        """
        if any(self.is_pending(p) for p in ports):
            return 0
        now_mono = time.monotonic_ns()
        deadline = now_mono + POLL_MAX_BLOCK_NS
        if timeout_abs_ns:
            deadline = min(deadline, self.d.monotonic_at(timeout_abs_ns))
        kicks = self._kicks[vcpu] if 0 <= vcpu < len(self._kicks) else 0
        self._pollers += 1
        try:
            while True:
                left = deadline - time.monotonic_ns()
                if left <= 0:
                    return 0
                self._poll.wait(left / 1e9)
                if (0 <= vcpu < len(self._kicks) and self._kicks[vcpu] != kicks) \
                        or any(self.is_pending(p) for p in ports):
                    return 0
        finally:
            self._pollers -= 1

    # ======================================================================
    # save / restore
    # ======================================================================
    def to_state(self) -> dict:
        """Plain-data snapshot (guest-memory bits are saved with guest memory)."""
        with self.d.lock:
            return {
                "version": 1,
                "max_port": self.max_port,
                "ports": [p.to_state() for p in sorted(self.ports.values(), key=lambda q: q.port)],
                "vmm_next": self._next_vmm_id,
                "vmm_queued": sorted(e.id for e in self.vmm_ends.values() if e.queued),
                "fifo": self.fifo.to_state() if self.fifo is not None else None,
            }

    def from_state(self, state: dict) -> None:
        """Restore a :meth:`to_state` snapshot; VMM services re-attach with bind_vmm_to_guest_port()."""
        with self.d.lock:
            self.reset()
            self.max_port = int(state.get("max_port", self.max_port))
            self._next_vmm_id = int(state.get("vmm_next", 1))
            queued = set(state.get("vmm_queued", []))
            for s in state.get("ports", []):
                p = Port(int(s["port"]), int(s["state"]), int(s["vcpu"]))
                p.remote_dom, p.remote_port, p.virq = int(s["remote_dom"]), int(s["remote_port"]), int(s["virq"])
                p.priority = int(s.get("priority", PRIORITY_DEFAULT))
                p.saved_pending = bool(s.get("saved_pending", False))
                p.last_vcpu, p.last_prio = (int(x) for x in s.get("last", [p.vcpu, p.priority]))
                if s.get("vmm") is not None:
                    end = VmmEnd(int(s["vmm"]), None, None, p.port, queued=int(s["vmm"]) in queued)
                    self.vmm_ends[end.id] = end
                    p.vmm = end
                if p.state == ST_VIRQ:
                    self.virqs[(p.vcpu if p.virq in PER_VCPU_VIRQS else 0, p.virq)] = p.port
                self.ports[p.port] = p
            if state.get("fifo") is not None:
                self.fifo = FifoEvents.from_state(self, len(self.d.vcpus), state["fifo"])
            self._free_hint = 1


def _u16(raw, off: int) -> int:
    return raw[off] | raw[off + 1] << 8


def _u32(raw, off: int) -> int:
    return int.from_bytes(raw[off:off + 4], "little")
