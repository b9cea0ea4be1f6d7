"""Pausing a running machine: every vCPU parked on its own thread, Xen system time stopped.

A vCPU is parked by work queued on it (``Machine.run_on_vcpu``): at its next
exit its thread waits until unpause (or until the machine stops, so a paused
domain can still be destroyed).  Once all are parked, the Xen personality's
clock is frozen, so system time, pvclock and Xen timer deadlines do not move
while paused (``XenDomain.freeze_clock``); unpause thaws it first (the pvclock
is republished) and then lets the vCPUs go.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.machine.machine import Machine
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PARK_TIMEOUT = 5.0     #: seconds to wait for every vCPU to reach its next exit
POLL = 0.2             #: how often a parked vCPU re-checks whether the machine is stopping


class Pauser:
    """Pause and unpause one machine (and its Xen clock, if it has one)."""

    def __init__(self, machine: "Machine", xen: "XenDomain | None"):
        self.machine = machine
        self.xen = xen
        self._cond = threading.Condition()
        self._paused = False
        self._parked = 0

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> bool:
        """Park every vCPU, then stop Xen time; False if some vCPU did not park in time
        (it parks at its next exit; time is stopped anyway)."""
        with self._cond:
            if self._paused:
                return True
            self._paused, self._parked = True, 0
        for runner in self.machine.runners:
            self.machine.run_on_vcpu(runner.id, self._park)
        with self._cond:
            all_parked = self._cond.wait_for(lambda: self._parked == len(self.machine.runners)
                                             or self.machine.stopping, PARK_TIMEOUT)
        if self.xen is not None:
            self.xen.freeze_clock()         # already done by the last vCPU to park, unless one did not
        if not all_parked:
            log.warning("pause: %d of %d vCPUs parked within %g s", self._parked, len(self.machine.runners),
                        PARK_TIMEOUT)
        return all_parked

    def unpause(self) -> None:
        """Restart Xen time (republishing pvclock), then release the vCPUs."""
        if self.xen is not None:
            self.xen.thaw_clock()
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def _park(self, vcpu: "Vcpu") -> None:
        """On the vCPU's thread: wait while paused (the machine stopping ends the wait)."""
        with self._cond:
            self._parked += 1
            if self._parked == len(self.machine.runners) and self.xen is not None:
                self.xen.freeze_clock()     # now, not when the pausing thread next gets the CPU
            self._cond.notify_all()
            while self._paused and not self.machine.stopping:
                self._cond.wait(POLL)
            self._parked -= 1
