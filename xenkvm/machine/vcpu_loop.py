"""The per-vCPU run loop: KVM_RUN, then one dispatch-table lookup per exit.

Exit handlers are plain callables ``handler(vcpu) -> None`` registered by exit
reason; the Xen layer adds its own (debug traps, MSR exits) to the same table.
``--trace`` wraps every handler so each exit prints one line; without it the
hot path has no tracing cost.

:class:`HaltWatch` notices a guest that has stopped for good (every vCPU halted
with interrupts disabled and nothing pending that could wake it), which with an
in-kernel LAPIC never shows as an exit: the vCPU just sleeps inside KVM_RUN.

:class:`VcpuRunner` is the thread side of one vCPU: the queue of work other
threads hand it and the id of the thread that runs it (the KVM binding object,
``kvm.vcpu.Vcpu``, holds only the file descriptor and its kvm_run area).
"""
from __future__ import annotations

import collections
import functools
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Callable

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.vcpu import Vcpu

log = logging.getLogger(__name__)
trace_log = logging.getLogger("xenkvm.trace")

ExitHandler = Callable[[Vcpu], None]
KICK_SIGNAL = signal.SIGUSR1   #: interrupts a vCPU thread's KVM_RUN (its handler does nothing)

EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
              if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT", "KVM_EXIT_XEN_HCALL")}


def describe_exit(vcpu: Vcpu, reason: int) -> str:
    """One line for --trace: the exit class and its salient fields."""
    name = EXIT_NAMES.get(reason, str(reason))
    if reason == lib.KVM_EXIT_IO:
        io = vcpu.exit_io
        d = "out" if io.direction == lib.KVM_EXIT_IO_OUT else "in"
        return f"vcpu{vcpu.id} IO {d} port={io.port:#x} size={io.size} count={io.count}"
    if reason == lib.KVM_EXIT_MMIO:
        m = vcpu.exit_mmio
        return f"vcpu{vcpu.id} MMIO {'write' if m.is_write else 'read'} gpa={m.phys_addr:#x} len={m.len}"
    if reason == lib.KVM_EXIT_DEBUG:
        return f"vcpu{vcpu.id} DEBUG pc={vcpu.exit_debug.pc:#x} exception={vcpu.exit_debug.exception}"
    if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
        m = vcpu.exit_msr
        return f"vcpu{vcpu.id} {name} msr={m.index:#x} data={m.data:#x}"
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        return f"vcpu{vcpu.id} INTERNAL_ERROR suberror={vcpu.exit_internal.suberror}"
    return f"vcpu{vcpu.id} {name}"


def traced(handler: ExitHandler, reason: int) -> ExitHandler:
    def wrapper(vcpu: Vcpu) -> None:
        trace_log.info("%s", describe_exit(vcpu, reason))
        handler(vcpu)
    return wrapper


class Hold:
    """Whether a vCPU is held out of KVM_RUN (Xen's VCPUOP_down: descheduled until VCPUOP_up).

    A held vCPU's thread still runs the work other threads queue for it (pause and
    snapshot parking, HaltWatch queries, ...): it waits here for work, a release or
    the machine stopping, whichever comes first.  ``wake`` is called after work is
    queued or a stop is asked for; the waiter checks under the same lock, so no wake-up
    is lost.
    """

    POLL = 0.2   #: seconds between re-checks of ``stopping`` (a safety net: stop() wakes it)

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def set(self, held: bool) -> None:
        with self._cond:
            self._held = held
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, work: collections.deque, stopping: Callable[[], bool]) -> None:
        """Until released, work is queued or the machine stops."""
        with self._cond:
            while self._held and not work and not stopping():
                self._cond.wait(self.POLL)


def run_vcpu(vcpu: Vcpu, handlers: dict[int, ExitHandler], stopping: Callable[[], bool],
             on_unhandled: Callable[[Vcpu, int], None], work: collections.deque,
             before_run: Callable[[Vcpu], None] | None = None, hold: Hold | None = None,
             run: Callable[[], int] | None = None) -> None:
    """Run ``vcpu`` until ``stopping()`` (handlers end a run by asking the machine to stop).

    ``work`` holds callables other threads queued for this vCPU.  They kick it
    with ``immediate_exit`` set before the signal (Machine.run_on_vcpu), so a
    kick that lands while this thread is outside KVM_RUN is not lost: the next
    KVM_RUN returns at once.  After such a return the flag is cleared *before*
    the queue is drained; work queued after the drain sets it again, so a
    halted guest can never sleep on a non-empty queue.  ``before_run`` (tests
    only) runs just before each KVM_RUN, after the drain: the worst moment for
    a kick to arrive.

    While ``hold`` is held the vCPU does not run guest code, but its thread runs the
    queued work.  Its last exit is first completed by one KVM_RUN with ``immediate_exit``
    set (KVM finishes the exit userspace handled, e.g. an OUT's instruction end, and
    returns EINTR without entering the guest), so work that reads its state (snapshot
    parking) sees it consistent and after a KVM_EXIT_INTR, as for any parked vCPU.

    ``run()``, when given, replaces ``vcpu.run()`` (a personality's C loop that
    completes some exits itself, xen/fastpath.py); it returns the exits it leaves to us.
    """
    if run is None:
        run = vcpu.run
    get = handlers.get
    intr = lib.KVM_EXIT_INTR
    while not stopping():
        if hold is not None and hold.held:
            if vcpu.run_struct.exit_reason == intr:
                hold.wait(work, stopping)
                while work:
                    work.popleft()(vcpu)
                continue
            vcpu.set_immediate_exit(True)   # complete the last exit; a real one is handled below
        if before_run is not None:
            before_run(vcpu)
        reason = run()
        if reason == intr:
            vcpu.set_immediate_exit(False)  # a stop() re-checks stopping() at the loop head
        while work:
            work.popleft()(vcpu)
        if reason == intr:
            continue
        handler = get(reason)
        if handler is None:
            on_unhandled(vcpu, reason)
            return
        handler(vcpu)


class VcpuRunner:
    """One vCPU's thread-side state: the work queued for it and the thread that runs it."""

    def __init__(self, vcpu: Vcpu):
        self.vcpu = vcpu
        self.id = vcpu.id
        #: callables run on this vCPU's own thread at its next exit (vCPU ioctls must be)
        self.work: collections.deque[Callable[[Vcpu], None]] = collections.deque()
        self.thread_id: int | None = None
        #: held out of KVM_RUN (e.g. Xen's VCPUOP_down) while still running queued work
        self.hold = Hold()

    @property
    def held(self) -> bool:
        return self.hold.held

    def set_held(self, held: bool) -> None:
        """Hold the vCPU out of KVM_RUN from its next exit on (True), or let it run again."""
        self.hold.set(held)
        if held:
            self.kick()

    def queue(self, fn: Callable[[Vcpu], None]) -> None:
        """Run ``fn(vcpu)`` on this vCPU's thread at its next exit, kicking it out of KVM_RUN.

        ``immediate_exit`` is set before the signal, as :meth:`kick` does: a signal
        that lands while the thread is outside KVM_RUN is consumed there, but the
        flag makes its next KVM_RUN return at once (run_vcpu clears it, then drains).
        """
        self.work.append(fn)
        self.kick()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now, or return from its next one at once."""
        self.vcpu.set_immediate_exit(True)
        self.hold.wake()
        tid = self.thread_id
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def run(self, handlers: dict[int, ExitHandler], stopping: Callable[[], bool],
            on_unhandled: Callable[[Vcpu, int], None], before_run: Callable[[Vcpu], None] | None,
            run: Callable[[], int] | None = None) -> None:
        """The thread body: run the vCPU until ``stopping()`` (see :func:`run_vcpu`)."""
        self.thread_id = threading.get_ident()
        run_vcpu(self.vcpu, handlers, stopping, on_unhandled, self.work, before_run, self.hold, run)


RFLAGS_IF = 1 << 9


@dataclass(frozen=True)
class VcpuState:
    """What decides whether a vCPU can ever run again by itself."""

    mp_state: int
    interrupts_enabled: bool
    pending_event: bool   #: an exception, NMI or interrupt KVM has queued or is injecting

    @property
    def stopped_for_good(self) -> bool:
        """Halted with IF=0 (only an NMI, INIT or SMI wakes it: SDM, HLT), or waiting for an
        INIT/SIPI that only another vCPU can send; and no event queued."""
        if self.pending_event:
            return False
        if self.mp_state == lib.KVM_MP_STATE_HALTED:
            return not self.interrupts_enabled
        return self.mp_state in (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED)


def read_state(vcpu: Vcpu) -> VcpuState:
    """The vCPU's state, read on its own thread while it is out of KVM_RUN."""
    ev = vcpu.get_events()
    pending = bool(ev.exception.injected or ev.exception.pending or ev.nmi.injected or ev.nmi.pending
                   or ev.interrupt.injected)
    return VcpuState(vcpu.get_mp_state(), bool(vcpu.get_regs().rflags & RFLAGS_IF), pending)


class HaltWatch:
    """Detects a guest whose every vCPU has stopped for good, from the machine's waiting thread.

    Every ``PERIOD`` seconds :meth:`tick` looks at the answers to the previous
    round and starts a new one: each vCPU is kicked out of KVM_RUN (a halted
    vCPU sleeps in it) and reads its own state (:func:`read_state`).  A round
    where every vCPU answers "stopped for good" is confirmed by a *synchronized*
    round: each vCPU first waits at a barrier, so all are out of KVM_RUN at once
    when they read their state; a vCPU that still runs afterwards either was
    not stopped (the verdict is "alive") or cannot wake anyone.  Only then is
    the guest declared dead.  A vCPU busy in an exit handler, or with other
    work queued, does not answer in time and keeps the guest alive.  Cost on a
    live guest: one kick and three ioctls per vCPU per period.  ``runners``
    are the vCPUs' :class:`VcpuRunner` (their ``id`` and ``work``).
    """

    PERIOD = 0.25
    SYNC_TIMEOUT = 0.2

    def __init__(self, runners: list[VcpuRunner], run_on_vcpu: Callable[[int, Callable[[Vcpu], None]], None]):
        self.runners = runners
        self.run_on_vcpu = run_on_vcpu
        self._answers: dict[int, VcpuState | None] | None = None
        self._synced = False

    def _all_stopped(self) -> bool:
        a = self._answers
        return a is not None and len(a) == len(self.runners) and all(s is not None and s.stopped_for_good
                                                                 for s in a.values())

    def tick(self) -> str | None:
        """A one-line verdict once the guest is known to have stopped for good, else None."""
        stopped = self._all_stopped()
        if stopped and self._synced:
            return ("every vCPU is halted with interrupts disabled and nothing can wake it: "
                    "the guest stopped for good")
        self._start_round(synced=stopped)
        return None

    def _start_round(self, synced: bool) -> None:
        answers: dict[int, VcpuState | None] = {}   # a new dict per round: late answers land in the old one
        barrier = threading.Barrier(len(self.runners), timeout=self.SYNC_TIMEOUT) if synced else None

        def query(runner: VcpuRunner, vcpu: Vcpu) -> None:
            if barrier is not None:
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    answers[vcpu.id] = None
                    return
            # Only a vCPU kicked out of KVM_RUN (KVM_EXIT_INTR) may be asleep; one that made a real
            # exit is running, and its exit (pending I/O completion...) is left alone.
            asleep = vcpu.run_struct.exit_reason == lib.KVM_EXIT_INTR and not runner.work
            answers[vcpu.id] = read_state(vcpu) if asleep else None

        self._answers, self._synced = answers, synced
        for r in self.runners:
            self.run_on_vcpu(r.id, functools.partial(query, r))
