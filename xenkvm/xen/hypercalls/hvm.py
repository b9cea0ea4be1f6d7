"""hvm_op: HVM parameters, the per-vCPU upcall vector, and the probes Linux makes."""
from __future__ import annotations

from xenkvm.xen.abi import (DOMID_SELF, HVM_CALLBACK_GSI, HVM_CALLBACK_PCI_INTX, HVM_CALLBACK_TYPE_SHIFT,
                            HVM_CALLBACK_VECTOR, Errno, HvmOp, HvmParam, XenStruct, lib)
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval

PARAM = XenStruct("struct xen_hvm_param")
UPCALL_VECTOR = XenStruct("struct xen_hvm_evtchn_upcall_vector")
GET_MEM_TYPE = XenStruct("struct xen_hvm_get_mem_type")
HVMMEM_RAM_RW, HVMMEM_MMIO_DM = 0, 1
#: Parameters a guest may set itself; the rest are the toolstack's (Xen denies a domU: -EPERM).
GUEST_WRITABLE = {HvmParam.CALLBACK_IRQ}
MIN_VECTOR = 0x10


def _domid(call: Call, domid: int) -> None:
    if domid not in (DOMID_SELF, call.domain.domid):
        raise HypercallError(Errno.ESRCH, f"domid {domid}")


def _check_callback(value: int) -> None:
    kind = value >> HVM_CALLBACK_TYPE_SHIFT
    if kind not in (HVM_CALLBACK_GSI, HVM_CALLBACK_PCI_INTX, HVM_CALLBACK_VECTOR):
        raise einval(f"callback type {kind}")
    if kind == HVM_CALLBACK_VECTOR and 0 < (value & 0xFF) < MIN_VECTOR:
        raise einval(f"callback vector {value & 0xFF:#x}")


def set_param(call: Call, arg: int) -> int:
    p = call.guest.read_struct(PARAM, arg)
    _domid(call, p.domid)
    if p.index >= lib.HVM_NR_PARAMS:
        raise einval(f"param {p.index}")
    if p.index not in GUEST_WRITABLE:
        raise HypercallError(Errno.EPERM, f"param {p.index} is set by the toolstack")
    _check_callback(p.value)
    call.domain.params[p.index] = p.value
    call.domain.evtchn.resend_pending(0)
    return 0


def get_param(call: Call, arg: int) -> int:
    p = call.guest.read_struct(PARAM, arg)
    _domid(call, p.domid)
    if p.index >= lib.HVM_NR_PARAMS:
        raise einval(f"param {p.index}")
    p.value = call.domain.params.get(p.index, 0)
    call.guest.write_struct(PARAM, arg, p)
    return 0


def set_evtchn_upcall_vector(call: Call, arg: int) -> int:
    req = call.guest.read_struct(UPCALL_VECTOR, arg)
    if not call.domain.valid_vcpu(req.vcpu):
        raise HypercallError(Errno.ENOENT, f"vcpu {req.vcpu}")
    if req.vector < MIN_VECTOR:
        raise einval(f"vector {req.vector:#x}")
    call.domain.vcpu_state(req.vcpu).upcall_vector = req.vector
    call.domain.evtchn.resend_pending(req.vcpu)
    return 0


def pagetable_dying(call: Call, arg: int) -> int:
    # A 0 here would make every process exit issue this call (linux.md 2.3 step 4).
    raise HypercallError(Errno.ENOSYS, "pagetable_dying is for shadow paging")


def get_time(call: Call, arg: int) -> int:
    call.guest.write_u64(arg, call.domain.now_ns())
    return 0


def get_mem_type(call: Call, arg: int) -> int:
    req = call.guest.read_struct(GET_MEM_TYPE, arg)
    _domid(call, req.domid)
    ram = call.domain.mem.is_ram(req.pfn << 12)
    req.mem_type = HVMMEM_RAM_RW if ram else HVMMEM_MMIO_DM
    call.guest.write_struct(GET_MEM_TYPE, arg, req)
    return 0


def flush_tlbs(call: Call, arg: int) -> int:
    if arg:
        raise einval("flush_tlbs takes no argument")
    return 0


SUBOPS = {HvmOp.set_param: set_param, HvmOp.get_param: get_param,
          HvmOp.set_evtchn_upcall_vector: set_evtchn_upcall_vector,
          HvmOp.pagetable_dying: pagetable_dying, HvmOp.get_time: get_time,
          HvmOp.get_mem_type: get_mem_type, HvmOp.flush_tlbs: flush_tlbs}
