"""The one fake domain of the Xen service tests: ``from evtchnfakes import FakeDomain, hc``.

The Xen services (``EventChannels``, ``VcpuTimers``, ``GrantTable``,
``PrimaryConsole``, ``StoreService``) take their domain as an argument; what
they use of it is :class:`XenServiceDomain`.  ``XenDomain`` is the real one;
:class:`FakeDomain` is a small stand-in built from real parts (guest memory,
the big lock, an ``IoLoop``, the real Dispatcher and the real services) minus
the machine's vCPUs: upcalls are recorded instead of injected, and hypercalls
are issued from the test thread with identity address translation (guest
structs are written straight into RAM).  ``test_fakes.py`` checks that both
satisfy the Protocol, so the fake cannot drift from the real domain.

Timer tests pass a ``FakeClock`` (tests/fakeclock.py): the guest clock, the
I/O loop's waits and the upcall record then all follow the test's clock.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

from xenkvm.config import XenConfig
from xenkvm.machine.clock import MONOTONIC, GuestClock, HostClock
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.layout import HYPERCALL_PORT
from xenkvm.machine.ioloop import IoLoop
from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.dispatch import Dispatcher
from xenkvm.xen.domain import CONSOLE_PAGE, SPECIAL_PAGES, SPECIAL_PAGES_GPA, STORE_PAGE, InputQueue
from xenkvm.xen.evtchn import EventChannels
from xenkvm.xen.fastpath import FastSend
from xenkvm.xen.hypercalls import table
from xenkvm.xen.limits import Limits
from xenkvm.xen.timers import VcpuTimers

SHINFO = 0x10000
DOMID = 1


@runtime_checkable
class XenServiceDomain(Protocol):
    """What the Xen services use of their domain (``XenDomain`` and ``FakeDomain`` alike)."""

    mem: GuestMemory
    lock: Any               #: the big lock (an RLock)
    domid: int
    vcpus: list
    params: dict
    cfg: XenConfig
    machine: Any            #: .console (the guest console sink), .cfg (name, console), .io
    io: IoLoop
    dispatcher: Dispatcher
    evtchn: EventChannels
    timers: VcpuTimers
    shinfo: Any             #: .gpa: where shared_info is mapped (None: not yet)
    upcalls: Any            #: .raise_(vcpu)
    console_input: InputQueue

    def now_ns(self) -> int: ...
    def monotonic_at(self, system_ns: int) -> int: ...
    def valid_vcpu(self, vcpu_id: int) -> bool: ...
    def vcpu_info_gpa(self, vcpu_id: int) -> int | None: ...
    def special_pfn(self, index: int) -> int: ...


class Caller:
    """The calling vCPU of a hypercall: identity translation below 1 TiB."""

    def __init__(self, vcpu_id: int = 0):
        self.id = vcpu_id

    def translate(self, gva: int):
        return gva if gva < 1 << 40 else None


class Upcalls:
    """Records each upcall: ``calls`` the vCPU ids, ``events`` (vcpu, host-clock ns)."""

    def __init__(self, clock: HostClock = MONOTONIC):
        self.clock = clock
        self.calls: list[int] = []
        self.events: list[tuple[int, int]] = []
        self.cond = threading.Condition()

    def raise_(self, vcpu: int) -> None:
        with self.cond:
            self.calls.append(vcpu)
            self.events.append((vcpu, self.clock.now_ns()))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.calls) >= n, timeout)


class FakeDomain:
    """A domain with real memory, lock, I/O loop, dispatcher, event channels and timers.

    ``gnttab``, ``console`` and ``store`` add those real services (the console
    and the store also get the special pages and their HVM params, as
    ``XenDomain`` sets them up); ``clock`` is the host clock of everything.
    """

    def __init__(self, nvcpus: int = 2, shinfo: bool = True, ram: int = 16 << 20, *,
                 clock: HostClock = MONOTONIC, mem: GuestMemory | None = None, params: dict | None = None,
                 gnttab: bool = False, console: bool = False, store: bool = False, name: str = "guest1",
                 domid: int = DOMID, limits: Limits | None = None):
        self.mem = mem or GuestMemory(ram)
        self.limits = limits or Limits()
        self.lock = threading.RLock()
        self.domid = domid
        # FIFO offered (the default is 2-level only): these tests drive both ABIs
        self.cfg = XenConfig(domid=domid, hypervisor_log="none", fifo_events=True)
        self.vcpus = [SimpleNamespace(id=i, vcpu_info_gpa=None, up=i == 0) for i in range(nvcpus)]
        self.params: dict[int, int] = dict(params or {})
        self.clock = GuestClock(host=clock)
        self.io = IoLoop("test-io", clock=clock)
        self.io.start()
        self.machine = SimpleNamespace(console=ConsoleSink(None), cfg=SimpleNamespace(name=name, console="none"),
                                       io=self.io)
        self.console_input = InputQueue()
        # a stable-TSC host: no pvclock to resync (tests/xen/test_core_hypercalls.py has the real one)
        self.shinfo = SimpleNamespace(gpa=SHINFO if shinfo else None, resync=lambda vcpu: None)
        self.upcalls = Upcalls(clock)
        self.dispatcher = Dispatcher(self)
        self.fast = FastSend(self.mem, HYPERCALL_PORT)
        self.evtchn = EventChannels(self)
        self.timers = VcpuTimers(self)
        table.install(self.dispatcher)   # the real hypercall table; services this fake lacks
                                         # (gnttab unless asked for) fail those calls with -EINVAL
        if console or store:
            self.mem.add_region(SPECIAL_PAGES_GPA, SPECIAL_PAGES * 4096, "xen-special-pages", reserved=True)
            self.params[HvmParam.STORE_PFN] = self.special_pfn(STORE_PAGE)
            self.params[HvmParam.CONSOLE_PFN] = self.special_pfn(CONSOLE_PAGE)
        if gnttab:
            from xenkvm.xen.gnttab import GrantTable
            self.gnttab = GrantTable(self)
        if console:
            from xenkvm.xen.console import PrimaryConsole
            self.console = PrimaryConsole.attach(self)
        if store:
            from xenkvm.xen.store import StoreService
            self.store = StoreService.attach(self)

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        self.io.stop()

    def now_ns(self) -> int:
        return self.clock.ns()

    def monotonic_at(self, system_ns: int) -> int:
        return self.clock.monotonic_at(system_ns)

    def valid_vcpu(self, v: int) -> bool:
        return 0 <= v < len(self.vcpus)

    def vcpu_info_gpa(self, v: int):
        st = self.vcpus[v]
        if st.vcpu_info_gpa is not None:
            return st.vcpu_info_gpa
        if self.shinfo.gpa is not None and v < 32:
            return self.shinfo.gpa + 64 * v
        return None

    def special_pfn(self, index: int) -> int:
        return (SPECIAL_PAGES_GPA >> 12) + index


def hc(d, nr, *args, vcpu=0, long_mode=True) -> int:
    """Issue hypercall ``nr`` from ``vcpu``; returns the signed result."""
    padded = tuple(args) + (0,) * (6 - len(args))
    r = d.dispatcher.dispatch(Caller(vcpu), int(nr), padded, long_mode)
    return r - (1 << 64) if r >> 63 else r
