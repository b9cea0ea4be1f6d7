"""Bring every vCPU to a consistent stop, run work there, and let them go again.

Each vCPU is handed a *park* callable through its ``VcpuRunner`` work queue (the only way
to run vCPU ioctls on its thread).  The queue kicks it out of KVM_RUN with
``immediate_exit``; KVM first completes the exit userspace was handling (a port IN's data,
an OUT's instruction end: api.rst, "KVM_RUN ... immediate_exit"), then returns EINTR, so
the state read there is consistent.  A park that finds the vCPU after a *real* exit (its
handler has not run yet: the work queue is drained before the handler) reports "not yet"
and is queued again, so it lands after the handler and the next, immediate, KVM_RUN.

Parked vCPUs wait on an Event; :meth:`Parking.release` lets them go.  A vCPU that does
not park in time (blocked in a handler, e.g. a guest's SCHEDOP_poll without a timeout)
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
    """One round of parking every vCPU; ``on_parked(vcpu)`` runs on each one's own thread."""

    def __init__(self, runners: list, on_parked: Callable[[Vcpu], Any]):
        self.runners = runners
        self.on_parked = on_parked
        self.results: dict[int, Any] = {}
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._retry: list[int] = []
        self._go = threading.Event()

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
        try:
            result = self.on_parked(vcpu)
        except Exception as e:  # reported by wait(); the vCPU still parks so the others stay consistent
            result, err = None, f"vcpu{vcpu.id}: {e}"
        else:
            err = None
        with self._cond:
            self.results[vcpu.id] = result
            if err:
                self.errors.append(err)
            self._cond.notify_all()
        self._go.wait()

    def wait(self, timeout: float) -> dict[int, Any]:
        """Until every vCPU is parked (re-queuing those caught after a real exit); their results."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.results) < len(self.runners):
                for vid in self._retry:
                    self._requeue(vid)
                self._retry.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(len(self.runners))) - set(self.results))
                    self.release()
                    raise SnapshotError(f"vCPU(s) {missing} did not stop within {timeout:g} s "
                                        "(blocked in a handler?): no snapshot taken")
                self._cond.wait(min(left, RETRY_S * 10))
        if self.errors:
            self.release()
            raise SnapshotError("; ".join(self.errors))
        return self.results

    def _requeue(self, vid: int) -> None:
        time.sleep(RETRY_S)   # let the vCPU finish its drain and reach its handler
        self.runners[vid].queue(self._park)

    def release(self) -> None:
        """Let every parked vCPU run again."""
        self._go.set()
