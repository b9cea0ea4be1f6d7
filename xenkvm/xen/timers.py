"""Per-vCPU Xen timers: the single-shot timer, the periodic timer and set_timer_op.

Both timers raise the vCPU's VIRQ_TIMER.  Deadlines are Xen system time
(``domain.now_ns()``, the clock pvclock shows the guest); they run on the
machine's I/O thread at ``domain.monotonic_at(deadline)``.

Each armed timer is an ``_Arm``; the I/O-thread callback checks it is still
the current one (stop and re-arm just replace it), so a stale callback is a
no-op.

Xen behaviour reproduced (``common/domain.c`` VCPUOP_*, ``common/sched/core.c``;
the hypercalls are decoded in ``xen/hypercalls/vcpu.py``, which calls the VMM API here):

* a bad vCPU id is -ENOENT; the single-shot sub-ops act on the calling vCPU
  only (-EINVAL for another one);
* ``set_singleshot_timer`` with a deadline already past fires at once, or
  returns -ETIME when the guest asked for ``VCPU_SSHOTTMR_future`` (compared
  unsigned; a deadline >= 2^63 is then a negative system time: fires at once);
* ``set_periodic_timer`` needs 1 ms <= period <= 2^62-1 ns (-EINVAL), may name
  any vCPU, and always restarts: first tick one period from now; each
  expiry re-arms at expiry time + period; ``stop_periodic_timer`` returns 0
  (which is what makes Linux choose the vcpuop clockevent);
* ``set_timer_op(0)`` stops the single-shot timer; a deadline more than 2^50 ns
  ahead (wrapped guest arithmetic) is replaced by now + 100 ms; otherwise it
  is the single-shot timer with flags 0.  It never fails.

With the fast path (xen/fastpath.py, ``use_fast``) a vCPU's own ``set_singleshot_timer``
and ``stop_singleshot_timer`` are done in C on its thread: C records the deadline and
arms the vCPU's timerfd, which a thread of the domain's watches in C (:class:`CTimerThread`:
it claims the expired deadline and raises VIRQ_TIMER through C delivery, 2-level channels,
so a guest tick costs no Python; what C delivery declines comes back to :meth:`_check_fast`,
Python's path, which takes the domain's lock as every other firing does).  Python's
own arming (the other hypercalls, deadlines already past, a paused clock, restore)
first clears C's, and C's set/stop makes an older Python arm stale (``timer_gen``), so
one timer is armed per vCPU, whichever side armed it.

What a guest can make us hold is bounded by its vCPU count: each vCPU has one
single-shot and one periodic timer (as in Xen), arming replaces the armed one,
and each armed timer has at most one live I/O-loop entry (cancelled ones are
compacted away by the loop), however often the guest re-arms.
"""
from __future__ import annotations

import logging
import os
import threading

from xenkvm.xen._fast_cffi import ffi as fast_ffi, lib as fast_lib
from xenkvm.xen.abi import lib


log = logging.getLogger(__name__)

PERIOD_MIN_NS = 1_000_000               #: Xen: MILLISECS(1)
PERIOD_MAX_NS = (1 << 62) - 1           #: Xen: STIME_DELTA_MAX
HUGE_TIMEOUT_NS = 1 << 50               #: set_timer_op "Linux workaround" threshold
HUGE_TIMEOUT_REPLACEMENT_NS = 100_000_000
#: I/O-thread timers are armed at most this far ahead and chained on: a cancelled
#: entry stays in the I/O loop's heap until its time, so a guest re-arming
#: far-future deadlines must not pile them up.
HORIZON_NS = 1_000_000_000


class _Arm:
    """One armed timer; stale I/O-thread callbacks see they are no longer current."""

    __slots__ = ("deadline", "handle", "period", "gen")

    def __init__(self, deadline: int, period: int = 0, gen: int = 0):
        self.deadline = deadline
        self.period = period
        self.handle = None
        self.gen = gen          #: C's timer_gen when armed (fast path): a later C set/stop replaced it


class VcpuTimers:
    """Xen timers of one domain (``domain.timers``)."""

    def __init__(self, domain):
        self.d = domain
        n = len(domain.vcpus)
        self._oneshot: list[_Arm | None] = [None] * n
        self._periodic: list[_Arm | None] = [None] * n
        self._fired = [0] * n       #: VIRQ_TIMER raises per vCPU through Python (statistics)
        self.fast = None            #: the domain's FastSend once C keeps single-shot timers
        self._thread: CTimerThread | None = None     #: fires C's timers (with ``fast``)
        self._on_io = False         #: the I/O thread watches the timerfds (the timer thread failed)

    @property
    def fired(self) -> list[int]:
        """VIRQ_TIMER raises per vCPU, Python's and the timer thread's."""
        c = self._thread.fired if self._thread is not None else None
        return [n + (c[v] if c is not None else 0) for v, n in enumerate(self._fired)]

    def fired_in_c(self) -> int:
        """VIRQ_TIMER raises the timer thread made in C (all vCPUs)."""
        return sum(self.fired) - sum(self._fired)

    # -- the fast path -----------------------------------------------------------------
    def use_fast(self, fast) -> None:
        """Let C keep each vCPU's own single-shot timer (before the vCPUs run in C): a thread
        fires the timerfds it arms.  C arms nothing until the domain publishes its clock."""
        cdeliver = getattr(self.d, "cdeliver", None)
        if cdeliver is not None:
            with self.d.lock:
                cdeliver.reload()      # loaded: hypercalls that bind VIRQ_TIMER reload it from now on
        if self.fast is fast:
            return
        fast.enable_timers(len(self._oneshot))
        self.fast = fast
        self._thread = CTimerThread(self, fast, cdeliver)

    def detach_fast(self) -> None:
        """The domain closes: stop the timer thread (FastSend.close closes the timerfds)."""
        if self._thread is not None:
            self._thread.stop()
            fired, self._thread = self.fired, None
            self._fired = fired
        if self.fast is not None and self._on_io:
            for fd in self.fast.timer_fds:
                self.d.io.remove_reader(fd)
        self._on_io = False
        self.fast = None

    def _watch_on_io(self) -> None:
        """The timer thread failed: the I/O thread watches the timerfds instead."""
        for vcpu, fd in enumerate(self.fast.timer_fds if self.fast is not None else ()):
            self.d.io.add_reader(fd, lambda v=vcpu, f=fd: self._fast_expired(v, f))
        self._on_io = True

    def _finish_fire(self, vcpu: int, answer: int) -> None:
        """The timer thread fired ``vcpu``'s timer; C delivery left ``answer`` (the upcall it
        could not inject, pollers to wake) to Python."""
        self.d.cdeliver.finish(0, answer)

    def _fast_expired(self, vcpu: int, fd: int) -> None:
        """I/O thread: a timerfd C armed has expired."""
        try:
            os.read(fd, 8)
        except (BlockingIOError, OSError):
            pass
        self._check_fast(vcpu)

    def _check_fast(self, vcpu: int) -> None:
        """Fire C's timer of ``vcpu`` if due (claimed by compare-and-swap: the vCPU may re-arm
        it meanwhile); if not due by system time (paused, the clock re-published), look again
        when it is."""
        fast = self.fast
        if fast is None:
            return
        with self.d.lock:
            deadline = fast.timer_deadline(vcpu)
            if deadline is None:
                return
            if deadline > self.d.now_ns():
                self._look_at(deadline, lambda: self._check_fast(vcpu))
                return
            if fast.take_timer(vcpu, deadline):
                self._fire(vcpu)

    def _clear_fast(self, vcpu: int) -> None:
        if self.fast is not None:
            self.fast.clear_timer(vcpu)

    def _fast_gen(self, vcpu: int) -> int:
        return self.fast.timer_gen(vcpu) if self.fast is not None else 0

    # -- VMM API -------------------------------------------------------------------
    def set_singleshot(self, vcpu: int, deadline_ns: int) -> None:
        """Arm vCPU ``vcpu``'s single-shot timer (system time); a past deadline fires now."""
        with self.d.lock:
            self._cancel(self._oneshot, vcpu)
            self._clear_fast(vcpu)
            if deadline_ns <= self.d.now_ns():
                self._fire(vcpu)
                return
            arm = self._oneshot[vcpu] = _Arm(deadline_ns, gen=self._fast_gen(vcpu))
            self._schedule(arm, lambda: self._expire_oneshot(vcpu, arm))

    def stop_singleshot(self, vcpu: int) -> None:
        with self.d.lock:
            self._cancel(self._oneshot, vcpu)
            self._clear_fast(vcpu)

    def set_periodic(self, vcpu: int, period_ns: int) -> None:
        """Start (or restart) vCPU ``vcpu``'s periodic timer; the first tick is one period away."""
        with self.d.lock:
            self._cancel(self._periodic, vcpu)
            self._arm_periodic(vcpu, self.d.now_ns() + period_ns, period_ns)

    def stop_periodic(self, vcpu: int) -> None:
        with self.d.lock:
            self._cancel(self._periodic, vcpu)

    def stop_vcpu(self, vcpu: int) -> None:
        """Stop both timers of a vCPU (VCPUOP_down, reset)."""
        with self.d.lock:
            self._cancel(self._oneshot, vcpu)
            self._clear_fast(vcpu)
            self._cancel(self._periodic, vcpu)

    def reset(self) -> None:
        with self.d.lock:
            for v in range(len(self._oneshot)):
                self.stop_vcpu(v)

    def singleshot_deadline(self, vcpu: int) -> int | None:
        arm = self._current_oneshot(vcpu)
        if arm is not None:
            return arm.deadline
        return self.fast.timer_deadline(vcpu) if self.fast is not None else None

    def _current_oneshot(self, vcpu: int) -> _Arm | None:
        """Python's single-shot arm of ``vcpu``, unless C has set or stopped the timer since."""
        arm = self._oneshot[vcpu]
        return arm if arm is not None and arm.gen == self._fast_gen(vcpu) else None

    def periodic_period(self, vcpu: int) -> int:
        arm = self._periodic[vcpu]
        return arm.period if arm else 0

    def to_state(self) -> dict:
        with self.d.lock:
            return {"singleshot": [self.singleshot_deadline(v) for v in range(len(self._oneshot))],
                    "periodic": [[a.period, a.deadline] if a else None for a in self._periodic]}

    def from_state(self, state: dict) -> None:
        """Re-arm saved timers (deadlines in system time; past ones fire at once)."""
        with self.d.lock:
            self.reset()
            for v, dl in enumerate(state.get("singleshot", [])[:len(self._oneshot)]):
                if dl is not None:
                    self.set_singleshot(v, int(dl))
            for v, pd in enumerate(state.get("periodic", [])[:len(self._periodic)]):
                if pd:
                    self._arm_periodic(v, int(pd[1]), int(pd[0]))

    # -- internals -------------------------------------------------------------------
    @staticmethod
    def _cancel(table: list, vcpu: int) -> None:
        arm = table[vcpu]
        if arm is not None:
            table[vcpu] = None
            if arm.handle is not None:
                arm.handle.cancel()

    def _arm_periodic(self, vcpu: int, deadline: int, period: int) -> None:
        arm = self._periodic[vcpu] = _Arm(deadline, period)
        self._schedule(arm, lambda: self._expire_periodic(vcpu, arm))

    def _schedule(self, arm: _Arm, fn) -> None:
        arm.handle = self._look_at(arm.deadline, fn)

    def _look_at(self, deadline: int, fn):
        """Run ``fn`` on the I/O thread when system time reaches ``deadline``, or a horizon
        step before it (``fn`` looks again then); the loop's handle."""
        at = min(deadline, self.d.now_ns() + HORIZON_NS)
        return self.d.io.call_at(self.d.monotonic_at(at), fn)

    def _fire(self, vcpu: int) -> None:
        self._fired[vcpu] += 1
        self.d.evtchn.raise_virq(lib.VIRQ_TIMER, vcpu)

    def _expire_oneshot(self, vcpu: int, arm: _Arm) -> None:
        with self.d.lock:
            if self._oneshot[vcpu] is not arm or arm.gen != self._fast_gen(vcpu):
                return              # stopped or re-armed meanwhile (by Python or in C)
            if arm.deadline > self.d.now_ns():
                self._schedule(arm, lambda: self._expire_oneshot(vcpu, arm))
                return              # a horizon step: not due yet
            self._oneshot[vcpu] = None
            self._fire(vcpu)

    def _expire_periodic(self, vcpu: int, arm: _Arm) -> None:
        with self.d.lock:
            if self._periodic[vcpu] is not arm:
                return
            if arm.deadline > self.d.now_ns():
                self._schedule(arm, lambda: self._expire_periodic(vcpu, arm))
                return
            self._fire(vcpu)
            # Xen re-anchors at the expiry time: no burst of catch-up ticks.
            self._arm_periodic(vcpu, self.d.now_ns() + arm.period, arm.period)


class CTimerThread:
    """The thread that fires the single-shot timers C armed (``xkt_wait``, xen/_fast_build.py):
    it sleeps in C on every vCPU's timerfd and raises VIRQ_TIMER there (``xkd_virq_timer``);
    Python runs only for an expiry C leaves (:meth:`VcpuTimers._check_fast`) or an upcall C
    delivery could not finish.  (Not the I/O thread: in the rig's one-CPU L1 a tick there cost
    ~0.9 ms of Python, a tenth of the CPU while a disk streams.)"""

    def __init__(self, timers: VcpuTimers, fast, cdeliver):
        self.timers = timers
        self._ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fired = fast_ffi.new("uint64_t[]", max(len(fast.timer_fds), 1))
        self.c = fast_ffi.new("struct xkt *", {
            "d": fast.c, "x": cdeliver.c if cdeliver is not None else fast_ffi.NULL,
            "ctl_fd": self._ctl, "fired": self.fired})
        self._thread = threading.Thread(target=self._run, name=f"d{timers.d.domid}-timers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.eventfd_write(self._ctl, 1)
        self._thread.join()
        os.close(self._ctl)

    def _run(self) -> None:
        c, timers = self.c, self.timers
        try:
            while True:
                code = fast_lib.xkt_wait(c)
                if code == fast_lib.XKT_EVENT:
                    return
                if code == fast_lib.XKT_CHECK:
                    timers._check_fast(c.vcpu)
                elif code == fast_lib.XKT_FIRE:
                    timers._finish_fire(c.vcpu, c.answer)
                else:
                    raise OSError(c.err, f"the timer thread's poll: {os.strerror(c.err)}")
        except Exception:
            log.exception("d%d: timer thread failed; the I/O thread fires the timers", timers.d.domid)
            timers._watch_on_io()
