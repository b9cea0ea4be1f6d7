"""vcpu_op: where a vCPU's vcpu_info, runstate and time areas live, and whether it is up.

``vcpu_op(cmd, vcpuid, arg)``: the target is explicit (the BSP registers for
APs, linux.md 2.1).  Timer sub-ops are registered by ``xen.timers``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.xen.abi import Errno, Hypercall, VcpuOp, XenStruct, handle_offset
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

REGISTER_VCPU_INFO = XenStruct("struct vcpu_register_vcpu_info")
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
    return 1 if call.domain.vcpu_state(target(call, vcpuid)).up else 0


def not_for_hvm(call: Call, vcpuid: int) -> int:
    target(call, vcpuid)
    raise einval("HVM vCPUs are started with INIT/SIPI, not VCPUOP_initialise/up/down")


def register(domain: "XenDomain") -> None:
    table = {VcpuOp.register_vcpu_info: register_vcpu_info,
             VcpuOp.register_runstate_memory_area: register_runstate,
             VcpuOp.register_vcpu_time_memory_area: register_time_area,
             VcpuOp.get_runstate_info: get_runstate_info, VcpuOp.is_up: is_up,
             VcpuOp.initialise: not_for_hvm, VcpuOp.up: not_for_hvm, VcpuOp.down: not_for_hvm}
    for cmd, fn in table.items():
        domain.dispatcher.register_subop(Hypercall.vcpu_op, cmd, fn)
