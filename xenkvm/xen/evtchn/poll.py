"""SCHEDOP_poll: a vCPU blocks until one of a set of its ports is pending.

Xen's rules (``common/sched/core.c``, ``do_poll``): at most 128 ports
(-EINVAL past it, and for a port the ABI cannot name); the call returns at
once if one of them is pending, otherwise when one becomes pending, when an
event is delivered to the polling vCPU, or when the absolute ``timeout``
(system time, ns; 0 = none) passes.  Returning early is allowed: guests
re-check and poll again.

The vCPU thread waits on a condition of the domain's big lock (so the lock is
released while it waits), at most ``POLL_MAX_BLOCK_NS`` per call so a stopping
machine never waits long for it.
"""
from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from xenkvm.xen.abi import Errno, XenStruct, handle_offset
from xenkvm.xen.errors import HypercallError

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call

POLL_MAX_PORTS = 128            #: Xen's limit for SCHEDOP_poll
POLL_MAX_BLOCK_NS = 5_000_000   #: a polling vCPU thread blocks at most this long per call

SCHED_POLL = XenStruct("struct sched_poll")
_PORTS_HANDLE = handle_offset("sched_poll", "ports")   # XEN_GUEST_HANDLE: the compiler's offset


class Pollers:
    """vCPU threads blocked in SCHEDOP_poll, and the kicks that wake them."""

    def __init__(self, lock, nr_vcpus: int):
        self._cond = threading.Condition(lock)
        self._kicks = [0] * nr_vcpus
        self.waiting = 0              #: threads blocked now (a cheap test for the senders)
        #: told +1/-1 as ``waiting`` changes (C delivery's count: cdeliver.py), before the look
        self.on_count: Callable[[int], None] | None = None

    def wake(self) -> None:
        """A port became pending: every poller re-checks its ports (caller holds the lock)."""
        self._cond.notify_all()

    def kick(self, vcpu: int) -> None:
        """An event was delivered to ``vcpu``: its poll returns (caller holds the lock)."""
        if 0 <= vcpu < len(self._kicks):
            self._kicks[vcpu] += 1
        self._cond.notify_all()

    def kick_all(self) -> None:
        """Wake every poller (pause, shutdown; caller holds the lock)."""
        for v in range(len(self._kicks)):
            self._kicks[v] += 1
        self._cond.notify_all()

    def wait(self, vcpu: int, any_pending: Callable[[], bool], deadline_ns: int) -> int:
        """Block until ``any_pending()``, a kick of ``vcpu`` or ``deadline_ns`` (monotonic)."""
        kicks = self._kicks[vcpu] if 0 <= vcpu < len(self._kicks) else 0
        self.waiting += 1
        if self.on_count is not None:
            self.on_count(1)
        try:
            while True:
                left = deadline_ns - time.monotonic_ns()
                if left <= 0:
                    return 0
                self._cond.wait(left / 1e9)
                if (0 <= vcpu < len(self._kicks) and self._kicks[vcpu] != kicks) or any_pending():
                    return 0
        finally:
            self.waiting -= 1
            if self.on_count is not None:
                self.on_count(-1)


def poll(channels, vcpu: int, ports: Iterable[int], timeout_abs_ns: int = 0) -> int:
    """Block ``vcpu``'s thread until a port is pending, an upcall for it, or the timeout.

    Blocks at most POLL_MAX_BLOCK_NS per call (caller holds the big lock,
    which is released while waiting).
    """
    ports = tuple(ports)

    def any_pending() -> bool:
        return any(channels.is_pending(p) for p in ports)
    if any_pending():
        return 0
    deadline = time.monotonic_ns() + POLL_MAX_BLOCK_NS
    if timeout_abs_ns:
        deadline = min(deadline, channels.d.monotonic_at(timeout_abs_ns))
    return channels.pollers.wait(vcpu, any_pending, deadline)


def sched_poll(call: "Call", arg: int) -> int:
    """SCHEDOP_poll sub-op handler: decode ``struct sched_poll`` and its port list."""
    raw = call.guest.read(arg, SCHED_POLL.size)
    req = SCHED_POLL.from_bytes(raw)
    nr, gva = req.nr_ports, int.from_bytes(raw[_PORTS_HANDLE:_PORTS_HANDLE + 8], "little")
    if nr > POLL_MAX_PORTS:
        raise HypercallError(Errno.EINVAL, f"poll of {nr} ports")
    ports = struct.unpack(f"<{nr}I", call.guest.read(gva, 4 * nr)) if nr else ()
    channels = call.domain.evtchn
    limit = channels.nr_channels()
    for port in ports:
        if port >= limit:
            raise HypercallError(Errno.EINVAL, f"poll of port {port}")
    return channels.poll(call.vcpu_id, ports, req.timeout)
