"""The hypercall fast path: ring kicks and single-shot timers completed in C, on the vCPU's thread (``_fast_build.py``).

A PV backend binds its ring's event channel with a *kick eventfd*
(``evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)``); the port is then
registered here.  When the vCPU runs under :meth:`FastSend.run` (``xkf_run``),
a guest ``EVTCHNOP_send`` on that port never reaches Python: C writes the
eventfd, stamps the send's time and re-enters the guest, and the backend's
worker, blocked reading that eventfd, wakes.  The Python hypercall path does
exactly the same for such a port (:meth:`FastSend.signal`), so a send that C
leaves to Python (an argument it cannot read, a vCPU not yet up, ``--trace``)
behaves alike.  This is what KVM_XEN does in the kernel for a port bound to an
eventfd; here it serves hosts without KVM_XEN (Debian's kernels, PVM) and the
port traps (hypercall page, patch).

Eventfds are never closed while the machine lives: a vCPU may have read a
port's fd just before Python withdrew it, and its write must not land in a
file that reused the number.  A withdrawn fd goes back to a pool
(:meth:`lease_fd` / :meth:`release_fd`) and the next backend reuses it; a late
write then only wakes that backend once for nothing.  They are closed with
the domain.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from xenkvm.xen._fast_cffi import ffi, lib

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.machine.memory import GuestMemory

log = logging.getLogger(__name__)

NPORTS = 4096           #: ports 0..4095 can be fast (2-level's whole space; a FIFO guest's first ones)


class FastSend:
    """One domain's table of fast ports, its eventfd pool, and the C run loop over it."""

    def __init__(self, mem: "GuestMemory", hypercall_port: int):
        ram = mem.ram_regions()
        if len(ram) > lib.XKF_MAX_REGIONS:
            raise ValueError(f"{len(ram)} RAM regions, the fast path takes {lib.XKF_MAX_REGIONS}")
        self._fds = ffi.new("int32_t[]", [-1] * NPORTS)
        self._ns = ffi.new("uint64_t[]", NPORTS)
        self._regions = ffi.new("struct xkf_region[]", len(ram))
        for i, r in enumerate(ram):
            self._regions[i].gpa, self._regions[i].size, self._regions[i].hva = r.gpa, r.size, r.host_addr
        c = self.c = ffi.new("struct xkf_domain *")
        c.hcall_port, c.nports, c.send_fd, c.send_ns = hypercall_port, NPORTS, self._fds, self._ns
        c.nregions, c.regions = len(ram), self._regions
        self._ram = ram                      #: keeps the mappings referenced as long as C may read them
        self._lock = threading.Lock()
        self._pool: list[int] = []           #: released eventfds, reused before new ones
        self._leased: set[int] = set()
        self.ports: dict[int, int] = {}      #: registered port -> eventfd (under the domain lock)
        self._runs: dict[int, object] = {}   #: vCPU id -> its ``struct kvm_run *``
        self.timer_fds: list[int] = []       #: per vCPU: the timerfd C arms (empty: timers in Python)
        self._kvm = None                     #: (Vm, I/O port) once kicks are matched in KVM (sendstub.py)
        self.in_kernel: dict[int, int] = {}  #: port -> eventfd with a KVM_IOEVENTFD now
        self.kernel_binds = 0                #: ioeventfds made (statistics)
        self.on_register = None              #: called after each register (the pending send stub's try)

    # -- eventfds ------------------------------------------------------------------------
    def lease_fd(self) -> int:
        """A non-blocking eventfd for a backend's worker to wait on (reused from the pool if any)."""
        with self._lock:
            fd = self._pool.pop() if self._pool else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._leased.add(fd)
        drain(fd)
        return fd

    def release_fd(self, fd: int) -> None:
        """The backend is done with ``fd`` (its ports withdrawn): back to the pool, still open."""
        with self._lock:
            if fd in self._leased:
                self._leased.discard(fd)
                self._pool.append(fd)

    def close(self) -> None:
        """The domain is gone (no vCPU runs): close every eventfd and timerfd."""
        with self._lock:
            for fd in list(self._pool) + list(self._leased):
                os.close(fd)
            self._pool.clear()
            self._leased.clear()
            if self.timer_fds:
                self.publish_clock(None)
                self.c.nvcpus = 0
                for fd in self.timer_fds:
                    os.close(fd)
                self.timer_fds = []

    # -- the port table (callers hold the domain lock) -------------------------------------------
    def register(self, port: int, fd: int) -> None:
        self.ports[port] = fd
        if 0 <= port < NPORTS:
            lib.xkf_set_port(self.c, port, fd)
        self._bind_kernel(port, fd)
        if self.on_register is not None:
            self.on_register()

    def withdraw(self, port: int) -> None:
        if self.ports.pop(port, None) is not None and 0 <= port < NPORTS:
            lib.xkf_set_port(self.c, port, -1)
        self._unbind_kernel(port)

    # -- kicks matched inside KVM (xen/sendstub.py; callers hold the domain lock) ---------------
    def use_kernel_kicks(self, vm, io_port: int) -> None:
        """The guest's send stub writes port numbers to ``io_port``: give every registered port
        (now and later) a KVM_IOEVENTFD there.  A send KVM matches to none (another port, a
        binding KVM refused) exits to Python (traps.stub_send), which signals the same
        eventfd for a registered port: rare enough to leave out of the C loop."""
        self._kvm = (vm, io_port)
        for port, fd in self.ports.items():
            self._bind_kernel(port, fd)

    def _bind_kernel(self, port: int, fd: int) -> None:
        if self._kvm is None or self.in_kernel.get(port) == fd or not 0 <= port <= 0xFFFFFFFF:
            return
        self._unbind_kernel(port)
        vm, io_port = self._kvm
        try:
            vm.port_eventfd(io_port, 4, port, fd)
        except OSError as e:      # KvmError; e.g. KVM's 1000 I/O devices: the kick exits to the VMM
            log.warning("port %d: no in-kernel kick (%s); its sends exit to the VMM", port, e)
            return
        self.in_kernel[port] = fd
        self.kernel_binds += 1

    def _unbind_kernel(self, port: int) -> None:
        fd = self.in_kernel.pop(port, None)
        if fd is None:
            return
        vm, io_port = self._kvm
        try:
            vm.port_eventfd(io_port, 4, port, fd, assign=False)
        except OSError as e:
            log.warning("port %d: removing its in-kernel kick: %s", port, e)

    def clear(self) -> None:
        for port in list(self.ports):
            self.withdraw(port)

    def signal(self, port: int) -> None:
        """A send on a registered port made through Python: what C does (stamp, eventfd)."""
        fd = self.ports.get(port)
        if fd is None:
            return
        if 0 <= port < NPORTS:
            self._ns[port] = lib.xkf_monotonic_ns()
        os.eventfd_write(fd, 1)

    def last_send_ns(self, port: int) -> int:
        """CLOCK_MONOTONIC ns of the port's last send (0: none yet), the clock of ``time.perf_counter_ns``."""
        return int(self._ns[port]) if 0 <= port < NPORTS else 0

    @property
    def sends(self) -> int:
        """Sends completed in C (each also an ``event_channel_op``/``send`` in the dispatcher's view)."""
        return int(lib.xkf_sends(self.c))

    # -- the vCPUs' single-shot timers (before any vCPU runs in C) ---------------------------
    def enable_timers(self, nvcpus: int) -> list[int]:
        """A timerfd per vCPU that C may arm for its own single-shot timer; the caller watches
        them (``VcpuTimers.use_fast``).  Idempotent; C arms nothing until ``publish_clock``."""
        if not self.timer_fds:
            fds = [lib.xkf_timerfd() for _ in range(nvcpus)]
            if min(fds) < 0:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
                raise OSError(ffi.errno, f"timerfd_create: {os.strerror(ffi.errno)}")
            self._tfds = ffi.new("int32_t[]", fds)
            self._deadlines = ffi.new("int64_t[]", [lib.XKF_NO_DEADLINE] * nvcpus)
            self._gens = ffi.new("uint64_t[]", nvcpus)
            c = self.c
            c.timer_fd, c.timer_deadline, c.timer_gen = self._tfds, self._deadlines, self._gens
            c.nvcpus = nvcpus
            self.timer_fds = fds
        return self.timer_fds

    def publish_clock(self, clock: tuple[int, int, int, int] | None) -> None:
        """How C turns Xen system time into host CLOCK_MONOTONIC: (boot_ns, paused_ns, num,
        den) as in ``(monotonic - boot_ns) * num // den - paused_ns``; None: C arms no timer."""
        boot, paused, num, den = clock if clock is not None else (0, 0, 1, 1)
        lib.xkf_timer_publish(self.c, clock is not None, boot, paused, num, den)

    def timer_deadline(self, vcpu: int) -> int | None:
        """The deadline C armed for ``vcpu`` (system time), or None."""
        dl = lib.xkf_timer_deadline(self.c, vcpu)
        return None if dl == lib.XKF_NO_DEADLINE else int(dl)

    def timer_gen(self, vcpu: int) -> int:
        """How many set/stop calls C has completed for ``vcpu`` (a Python arm older than the
        last one is stale)."""
        return int(lib.xkf_timer_gen(self.c, vcpu))

    def take_timer(self, vcpu: int, deadline: int) -> bool:
        """Claim C's expired ``deadline`` for firing: False if the vCPU re-armed or stopped it."""
        return bool(lib.xkf_timer_take(self.c, vcpu, deadline))

    def clear_timer(self, vcpu: int) -> None:
        """Python arms or stops ``vcpu``'s timer itself: forget C's."""
        lib.xkf_timer_clear(self.c, vcpu)

    @property
    def timer_ops(self) -> int:
        """Single-shot timer sets and stops completed in C."""
        return int(lib.xkf_timer_ops(self.c))

    # -- the run loop ------------------------------------------------------------------------
    def run(self, vcpu: "Vcpu") -> int:
        """Like ``Vcpu.run``, with registered sends and own timers completed in C between KVM_RUNs."""
        run = self._runs.get(vcpu.id)
        if run is None:
            run = self._runs[vcpu.id] = ffi.cast("struct kvm_run *", vcpu.run_address)
        return vcpu.exit_of(lib.xkf_run(vcpu.fd, run, self.c, vcpu.id))


def drain(fd: int) -> int:
    """Read and reset a non-blocking eventfd's count (0 if it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
