"""vcpu_op: where a vCPU's vcpu_info, runstate and time areas live, and whether it is up or down.

``vcpu_op(cmd, vcpuid, arg)``: the target is explicit (the BSP registers for
APs, linux.md 2.1).  The timer sub-ops and ``set_timer_op`` are decoded here
too; the timers themselves are ``domain.timers`` (xen/timers.py).
"""
from __future__ import annotations

import logging

from xenkvm.xen.abi import Errno, VcpuOp, XenStruct, handle_offset, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval
from xenkvm.xen.timers import (HUGE_TIMEOUT_NS, HUGE_TIMEOUT_REPLACEMENT_NS, PERIOD_MAX_NS,
                               PERIOD_MIN_NS)

log = logging.getLogger(__name__)
REGISTER_VCPU_INFO = XenStruct("struct vcpu_register_vcpu_info")
SSHOT = XenStruct("struct vcpu_set_singleshot_timer")
PERIODIC = XenStruct("struct vcpu_set_periodic_timer")
RUNSTATE = XenStruct("struct vcpu_runstate_info")


def target(call: Call, vcpuid: int) -> int:
    vcpuid &= 0xFFFFFFFF
    if not call.domain.valid_vcpu(vcpuid):
        raise HypercallError(Errno.ENOENT, f"vcpu {vcpuid}")
    return vcpuid


def _area_gpa(call: Call, gva: int, size: int) -> int:
    """Translate a registered area's GVA now; it must not straddle a page boundary."""
    if (gva & 0xFFF) + size > 4096:
        raise einval(f"area at {gva:#x} crosses a page")
    gpa = call.guest.translate(gva)
    if not call.domain.mem.contains(gpa, size):
        raise einval(f"area at {gva:#x} is not guest RAM")
    return gpa


def register_vcpu_info(call: Call, vcpuid: int) -> int:
    v = target(call, vcpuid)
    req = call.guest.read_struct(REGISTER_VCPU_INFO, call.args[2])
    if req.offset >= 4096:
        raise einval("offset beyond the page")
    call.domain.shinfo.register_vcpu_info(v, (req.mfn << 12) + req.offset)
    call.domain.evtchn.resend_pending(v)
    return 0


def register_runstate(call: Call, vcpuid: int) -> int:
    v = target(call, vcpuid)
    gva = call.guest.read_u64(call.args[2] + handle_offset("vcpu_register_runstate_memory_area", "addr"))
    state = call.domain.vcpu_state(v)
    state.runstate_gpa = _area_gpa(call, gva, RUNSTATE.size) if gva else None
    state.runstate_entry_ns = call.domain.now_ns()
    call.domain.shinfo.write_runstate(v)
    return 0


def register_time_area(call: Call, vcpuid: int) -> int:
    v = target(call, vcpuid)
    gva = call.guest.read_u64(call.args[2] + handle_offset("vcpu_register_time_memory_area", "addr"))
    call.domain.vcpu_state(v).time_area_gpa = _area_gpa(call, gva, 32) if gva else None
    call.domain.shinfo.update_time(v)
    return 0


def get_runstate_info(call: Call, vcpuid: int) -> int:
    v = target(call, vcpuid)
    state = call.domain.vcpu_state(v)
    info = RUNSTATE.from_bytes(bytes(RUNSTATE.size))
    info.state = state.runstate
    info.state_entry_time = state.runstate_entry_ns
    info.time[0] = call.domain.now_ns()
    call.guest.write_struct(RUNSTATE, call.args[2], info)
    return 0


def is_up(call: Call, vcpuid: int) -> int:
    state = call.domain.vcpu_state(target(call, vcpuid))
    return 1 if state.up and not state.down else 0


def not_for_hvm(call: Call, vcpuid: int) -> int:
    target(call, vcpuid)
    raise einval("HVM vCPUs are started with INIT/SIPI, not VCPUOP_initialise")


def vcpu_down(call: Call, vcpuid: int) -> int:
    """VCPUOP_down: the vCPU stops running until VCPUOP_up (Xen sets _VPF_down and deschedules
    it; the guest's own vCPU included).  Linux's resume path (xen_vcpu_restore) takes every
    other online vCPU down, re-registers its vcpu_info and runstate, and brings it up again;
    Xen answers 0, and anything else is a BUG() there; CPU hot-unplug keeps it down.  The
    machine holds the vCPU out of KVM_RUN from its next exit on; its thread still runs queued
    work (pause, snapshots), so a domain with downed vCPUs can be paused and saved.  A vCPU
    never started (an AP before its INIT/SIPI) is down already."""
    v = target(call, vcpuid)
    d = call.domain
    state = d.vcpu_state(v)
    with d.vcpu_down_lock:
        if not state.up or state.down:
            return 0
        state.down = True
        d.machine.set_vcpu_held(v, True)
    return 0


def vcpu_up(call: Call, vcpuid: int) -> int:
    """VCPUOP_up: a downed vCPU runs again; one that is up already stays so (0).  An HVM vCPU
    that was never started has no context to run (Xen: not initialised): -EINVAL."""
    v = target(call, vcpuid)
    d = call.domain
    state = d.vcpu_state(v)
    if not state.up:
        raise einval(f"vcpu {v} was never started (HVM vCPUs start with INIT/SIPI)")
    with d.vcpu_down_lock:
        state.down = False
        d.machine.set_vcpu_held(v, False)
    return 0


# -- timers (the state and its rules: xen/timers.py) ---------------------------
def _timer_vcpu(call: Call, vcpuid: int, own_only: bool) -> int:
    if not call.domain.valid_vcpu(vcpuid):
        raise HypercallError(Errno.ENOENT, f"no vcpu {vcpuid}")
    if own_only and vcpuid != call.vcpu_id:
        raise HypercallError(Errno.EINVAL, f"vcpu{call.vcpu_id} cannot set vcpu{vcpuid}'s single-shot timer")
    return vcpuid


def set_singleshot_timer(call: Call, vcpuid: int) -> int:
    v = _timer_vcpu(call, vcpuid, True)
    call.domain.shinfo.resync(call.vcpu)       # the guest just read its clock for this deadline
    req = call.guest.read_struct(SSHOT, call.args[2])
    deadline, flags = int(req.timeout_abs_ns), int(req.flags)
    if deadline < call.domain.now_ns() and flags & lib.VCPU_SSHOTTMR_future:
        raise HypercallError(Errno.ETIME, "single-shot deadline already past")
    if deadline >= 1 << 63:
        deadline -= 1 << 64         # s_time_t: in the past
    call.domain.timers.set_singleshot(v, deadline)
    return 0


def stop_singleshot_timer(call: Call, vcpuid: int) -> int:
    call.domain.timers.stop_singleshot(_timer_vcpu(call, vcpuid, True))
    return 0


def set_periodic_timer(call: Call, vcpuid: int) -> int:
    v = _timer_vcpu(call, vcpuid, False)
    period = int(call.guest.read_struct(PERIODIC, call.args[2]).period_ns)
    if not PERIOD_MIN_NS <= period <= PERIOD_MAX_NS:
        raise HypercallError(Errno.EINVAL, f"periodic timer of {period} ns")
    call.domain.timers.set_periodic(v, period)
    return 0


def stop_periodic_timer(call: Call, vcpuid: int) -> int:
    call.domain.timers.stop_periodic(_timer_vcpu(call, vcpuid, False))
    return 0


def set_timer_op(call: Call) -> int:
    if call.long_mode:
        timeout = call.args[0] & ((1 << 64) - 1)
    else:
        timeout = (call.args[0] & 0xFFFFFFFF) | (call.args[1] & 0xFFFFFFFF) << 32
    v = call.vcpu_id
    call.domain.shinfo.resync(call.vcpu)
    if timeout == 0:
        call.domain.timers.stop_singleshot(v)
        return 0
    if timeout >= 1 << 63:
        timeout -= 1 << 64          # s_time_t: a wrapped-negative deadline is in the past
    now = call.domain.now_ns()
    if timeout - now >= HUGE_TIMEOUT_NS:
        log.debug("vcpu%d: huge set_timer_op timeout %#x, using 100 ms", v, timeout)
        timeout = now + HUGE_TIMEOUT_REPLACEMENT_NS
    call.domain.timers.set_singleshot(v, timeout)
    return 0


SUBOPS = {VcpuOp.register_vcpu_info: register_vcpu_info,
          VcpuOp.register_runstate_memory_area: register_runstate,
          VcpuOp.register_vcpu_time_memory_area: register_time_area,
          VcpuOp.get_runstate_info: get_runstate_info, VcpuOp.is_up: is_up,
          VcpuOp.initialise: not_for_hvm, VcpuOp.up: vcpu_up, VcpuOp.down: vcpu_down,
          VcpuOp.set_singleshot_timer: set_singleshot_timer,
          VcpuOp.stop_singleshot_timer: stop_singleshot_timer,
          VcpuOp.set_periodic_timer: set_periodic_timer,
          VcpuOp.stop_periodic_timer: stop_periodic_timer}
