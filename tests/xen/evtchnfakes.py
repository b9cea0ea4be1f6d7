"""A small fake domain for event-channel and timer tests: ``from evtchnfakes import ...``.

It has what ``EventChannels`` and ``VcpuTimers`` use: guest memory, the big
lock, a started ``IoLoop``, shared_info / vcpu_info locations, the guest
clock and an upcall recorder; hypercalls go through the real Dispatcher with
identity address translation (guest structs are written straight into RAM).
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from xenkvm.machine.ioloop import IoLoop
from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.dispatch import Dispatcher
from xenkvm.xen.evtchn import EventChannels
from xenkvm.xen.timers import VcpuTimers

SHINFO = 0x10000
DOMID = 1


class Caller:
    """The calling vCPU of a hypercall: identity translation below 1 TiB."""

    def __init__(self, vcpu_id: int = 0):
        self.id = vcpu_id

    def translate(self, gva: int):
        return gva if gva < 1 << 40 else None


class Upcalls:
    """Records each upcall: ``calls`` the vCPU ids, ``events`` (vcpu, monotonic ns)."""

    def __init__(self):
        self.calls: list[int] = []
        self.events: list[tuple[int, int]] = []
        self.cond = threading.Condition()

    def raise_(self, vcpu: int) -> None:
        with self.cond:
            self.calls.append(vcpu)
            self.events.append((vcpu, time.monotonic_ns()))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 2.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.calls) >= n, timeout)


class FakeDomain:
    def __init__(self, nvcpus: int = 2, shinfo: bool = True, ram: int = 16 << 20):
        self.mem = GuestMemory(ram)
        self.lock = threading.RLock()
        self.domid = DOMID
        self.vcpus = [SimpleNamespace(id=i, vcpu_info_gpa=None) for i in range(nvcpus)]
        self.io = IoLoop("test-io")
        self.io.start()
        self.boot_ns = time.monotonic_ns()
        self.shinfo = SimpleNamespace(gpa=SHINFO if shinfo else None)
        self.upcalls = Upcalls()
        self.dispatcher = Dispatcher(self)
        self.evtchn = EventChannels(self)
        self.timers = VcpuTimers(self)
        self.evtchn.register_hypercalls(self.dispatcher)
        self.timers.register_hypercalls(self.dispatcher)

    def now_ns(self) -> int:
        return time.monotonic_ns() - self.boot_ns

    def monotonic_at(self, system_ns: int) -> int:
        return self.boot_ns + system_ns

    def valid_vcpu(self, v: int) -> bool:
        return 0 <= v < len(self.vcpus)

    def vcpu_info_gpa(self, v: int):
        st = self.vcpus[v]
        if st.vcpu_info_gpa is not None:
            return st.vcpu_info_gpa
        if self.shinfo.gpa is not None and v < 32:
            return self.shinfo.gpa + 64 * v
        return None


def hc(d, nr, *args, vcpu=0, long_mode=True) -> int:
    """Issue hypercall ``nr`` from ``vcpu``; returns the signed result."""
    padded = tuple(args) + (0,) * (6 - len(args))
    r = d.dispatcher.dispatch(Caller(vcpu), int(nr), padded, long_mode)
    return r - (1 << 64) if r >> 63 else r
