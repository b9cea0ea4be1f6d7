"""Bring every vCPU to a consistent stop, run work there, and let them go again.

Each vCPU is handed a *park* callable through its ``VcpuRunner`` work queue (the only way
to run vCPU ioctls on its thread).  The queue kicks it out of KVM_RUN with
``immediate_exit``; KVM first completes the exit userspace was handling (a port IN's data,
an OUT's instruction end: api.rst, "KVM_RUN ... immediate_exit"), then returns EINTR, so
the state read there is consistent.  A park that finds the vCPU after a *real* exit (its
handler has not run yet: the work queue is drained before the handler) reports "not yet"
and is queued again, so it lands after the handler and the next, immediate, KVM_RUN.

Parked vCPUs wait for work (:meth:`Parking.run_parked` runs a callable on each one's own
thread, e.g. reading its state once the caller holds the locks that keep the rest of the
machine still) until :meth:`Parking.release` lets them go.  A vCPU that does not park in time (blocked in a handler, e.g. a guest's SCHEDOP_poll without a timeout)
makes :meth:`Parking.wait` raise SnapshotError after releasing the others.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.vcpu import Vcpu
from xenkvm.machine.snapshot.format import SnapshotError

RETRY_S = 0.001


class Parking:
    """One round of parking every vCPU; work handed to :meth:`run_parked` runs on each one's thread."""

    def __init__(self, runners: list):
        self.runners = runners
        self.parked: set[int] = set()
        self._cond = threading.Condition()
        self._retry: list[int] = []
        self._job: tuple[int, Callable[[Vcpu], Any]] | None = None   #: (round, work) for every parked vCPU
        self._round = 0
        self._results: dict[int, tuple[Any, str | None]] = {}
        self._released = False

    def start(self) -> None:
        """Queue a park on every vCPU (any thread; a vCPU's own exit handler may call it)."""
        for r in self.runners:
            r.queue(self._park)

    def _park(self, vcpu: Vcpu) -> None:
        if vcpu.run_struct.exit_reason != lib.KVM_EXIT_INTR:
            with self._cond:            # a real exit: its handler runs after this; come back later
                self._retry.append(vcpu.id)
                self._cond.notify_all()
            return
        with self._cond:
            self.parked.add(vcpu.id)
            self._cond.notify_all()
        done = 0
        while (job := self._next_job(done)) is not None:
            done, work = job
            try:
                result = (work(vcpu), None)
            except Exception as e:  # reported by run_parked; the vCPU stays parked
                result = (None, f"vcpu{vcpu.id}: {e}")
            with self._cond:
                self._results[vcpu.id] = result
                self._cond.notify_all()

    def _next_job(self, done: int) -> tuple[int, Callable[[Vcpu], Any]] | None:
        """The next round of work after round ``done``; None once released."""
        with self._cond:
            while not self._released and (self._job is None or self._job[0] == done):
                self._cond.wait()
            return None if self._released else self._job

    def run_parked(self, work: Callable[[Vcpu], Any]) -> dict[int, Any]:
        """``work(vcpu)`` on every parked vCPU's own thread; their results by vCPU id.
        SnapshotError (the vCPUs stay parked) when any of them raised."""
        with self._cond:
            self._round += 1
            self._results = {}
            self._job = (self._round, work)
            self._cond.notify_all()
            while len(self._results) < len(self.runners):
                self._cond.wait()
            results = self._results
        errors = [err for _, err in results.values() if err]
        if errors:
            raise SnapshotError("; ".join(errors))
        return {vid: value for vid, (value, _) in results.items()}

    def wait(self, timeout: float) -> None:
        """Until every vCPU is parked (re-queuing those caught after a real exit)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.parked) < len(self.runners):
                for vid in self._retry:
                    self._requeue(vid)
                self._retry.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(len(self.runners))) - self.parked)
                    self._release_locked()
                    raise SnapshotError(f"vCPU(s) {missing} did not stop within {timeout:g} s "
                                        "(blocked in a handler?): no snapshot taken")
                self._cond.wait(min(left, RETRY_S * 10))

    def _requeue(self, vid: int) -> None:
        time.sleep(RETRY_S)   # let the vCPU finish its drain and reach its handler
        self.runners[vid].queue(self._park)

    def release(self) -> None:
        """Let every parked vCPU run again."""
        with self._cond:
            self._release_locked()

    def _release_locked(self) -> None:
        self._released = True
        self._cond.notify_all()
