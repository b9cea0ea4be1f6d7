"""sched_op: yield, block, shutdown with every reason, and poll (xen/evtchn/poll.py: it waits on event channels)."""
from __future__ import annotations

import logging
from xenkvm.machine.status import ExitStatus
from xenkvm.xen.abi import DOMID_SELF, Errno, SchedOp, Shutdown, XenStruct
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval
from xenkvm.xen.evtchn.poll import sched_poll
from xenkvm.xen.suspend import guest_suspends


log = logging.getLogger(__name__)
SHUTDOWN = XenStruct("struct sched_shutdown")
REMOTE_SHUTDOWN = XenStruct("struct sched_remote_shutdown")


def shutdown_domain(call: Call, reason: int) -> int:
    """End the run with the status that matches ``reason``; the vCPUs stop at once."""
    try:
        why = Shutdown(reason)
    except ValueError:
        raise einval(f"shutdown reason {reason}") from None
    if why is Shutdown.suspend:
        return guest_suspends(call)       # saved if the toolstack asked, else cancelled (xen/suspend.py)
    machine = call.domain.machine
    status = {Shutdown.poweroff: ExitStatus.POWEROFF, Shutdown.reboot: ExitStatus.RESET,
              Shutdown.soft_reset: ExitStatus.RESET, Shutdown.crash: ExitStatus.GUEST_CRASH,
              Shutdown.watchdog: ExitStatus.GUEST_CRASH}[why]
    log.info("vcpu%d: SCHEDOP_shutdown(%s)", call.vcpu_id, why.name)
    machine.stop(status, f"guest shut down ({why.name}) via SCHEDOP_shutdown")
    return 0


def yield_(call: Call, arg: int) -> int:
    return 0


def block(call: Call, arg: int) -> int:
    return 0  # returning is a spurious wake-up, which the ABI allows


def shutdown(call: Call, arg: int) -> int:
    return shutdown_domain(call, call.guest.read_struct(SHUTDOWN, arg).reason)


def remote_shutdown(call: Call, arg: int) -> int:
    req = call.guest.read_struct(REMOTE_SHUTDOWN, arg)
    if req.domain_id not in (DOMID_SELF, call.domain.domid):
        raise HypercallError(Errno.EPERM, "only the toolstack shuts down other domains")
    return shutdown_domain(call, req.reason)


def shutdown_code(call: Call, arg: int) -> int:
    call.domain.shutdown_code = call.guest.read_struct(SHUTDOWN, arg).reason
    return 0


SUBOPS = {SchedOp["yield"]: yield_, SchedOp.block: block,
          SchedOp.shutdown: shutdown, SchedOp.remote_shutdown: remote_shutdown,
          SchedOp.shutdown_code: shutdown_code, SchedOp.poll: sched_poll}
