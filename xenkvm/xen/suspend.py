"""Cooperative suspend, as ``xl save`` does it: the guest suspends itself, the VMM saves it.

The toolstack asks for a save (:meth:`SaveRequest`, ``XenDomain.suspend_request``) and
writes ``control/shutdown = suspend``; the guest (Linux: drivers/xen/manage.c) acknowledges
it, quiesces and calls ``SCHEDOP_shutdown(SHUTDOWN_suspend)``.  Xen's rule for the result
(the ``cancelled`` flag Linux reads from HYPERVISOR_suspend): 0 in the restored domain, 1 when
the suspend was cancelled and the same domain runs on (libxc's xc_domain_resume "fast" path).

So the hypercall returns 1 here (what this domain sees if the save fails and it carries on)
and a snapshot is requested at once: every vCPU parks at its next exit, the caller right
after this hypercall.  The snapshot records the suspending vCPU; when its files are written
the machine stops before any vCPU runs again.  A restore of such a snapshot builds what
Xen's restore gives a guest: a new domain (xen/snapshot.py ``resume_new_domain``), whose
suspending vCPU sees 0 and re-registers shared info, vcpu_info, event channels, grant frames
and xenstore watches, as Linux's resume path does.

A ``SHUTDOWN_suspend`` with no save asked for is cancelled at once (returns 1): nobody is
there to save the guest, and it runs on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.machine.status import ExitStatus

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call

log = logging.getLogger(__name__)

CANCELLED = 1     #: SCHEDOP_shutdown(SHUTDOWN_suspend)'s result in a domain that runs on
RESUMED = 0       #: its result in the restored domain


@dataclass
class SaveRequest:
    """A save the toolstack asked for, completed when the guest has suspended and been saved."""

    path: str
    done: threading.Event = field(default_factory=threading.Event)
    outcome: object = None          #: SnapshotInfo, or SnapshotError when the save failed

    def finish(self, outcome: object) -> None:
        self.outcome = outcome
        self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    @property
    def failed(self) -> bool:
        return isinstance(self.outcome, SnapshotError)


def guest_suspends(call: "Call") -> int:
    """SCHEDOP_shutdown(SHUTDOWN_suspend) on the calling vCPU's thread (module docstring)."""
    d = call.domain
    with d.lock:
        req, d.suspend_request = d.suspend_request, None
        if req is not None:
            d.suspended_vcpu = call.vcpu_id
    if req is None:
        log.info("vcpu%d: SHUTDOWN_suspend with no save asked for: cancelled", call.vcpu_id)
        return CANCELLED
    machine = d.machine
    log.info("vcpu%d: SHUTDOWN_suspend: saving to %s", call.vcpu_id, req.path)

    def saved() -> None:            # the files are written, the vCPUs still parked
        machine.stop(ExitStatus.INTERRUPTED, f"saved to {req.path} (suspended)")

    def done(outcome: object) -> None:
        d.suspended_vcpu = None
        if isinstance(outcome, SnapshotError):
            log.error("suspend: the save failed, the guest resumes (cancelled): %s", outcome)
        req.finish(outcome)
    machine.request_snapshot(req.path, done, on_saved=saved)
    return CANCELLED
