"""vm_assist, physdev_op, and the privileged hypercalls a domU is refused."""
from __future__ import annotations

from xenkvm.xen.abi import Errno, Hypercall, PhysdevOp, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval

#: vm_assist types an HVM guest may enable (Xen's HVM_VM_ASSIST_MASK).
HVM_ASSISTS = 1 << lib.VMASST_TYPE_runstate_update_flag
PRIVILEGED = (Hypercall.platform_op, Hypercall.sysctl, Hypercall.domctl, Hypercall.dm_op,
              Hypercall.hypfs_op, Hypercall.kexec_op, Hypercall.xsm_op)


def vm_assist(call: Call) -> int:
    """VMASST_CMD_enable/disable of the assists an HVM guest may have (HVM_VM_ASSIST_MASK)."""
    cmd, kind = call.args[0] & 0xFFFFFFFF, call.args[1] & 0xFFFFFFFF
    if kind >= 32 or not HVM_ASSISTS >> kind & 1:
        raise einval(f"vm_assist type {kind}")
    if cmd == lib.VMASST_CMD_enable:
        call.domain.vm_assists |= 1 << kind
    elif cmd == lib.VMASST_CMD_disable:
        call.domain.vm_assists &= ~(1 << kind)
    else:
        raise einval(f"vm_assist command {cmd}")
    return 0


def irq_status_query(call: Call, arg: int) -> int:
    irq = call.guest.read_u32(arg)
    if irq >= 256:
        raise einval(f"irq {irq}")
    call.guest.write_u32(arg + 4, 0)  # flags: no EOI needed via PHYSDEVOP_eoi
    return 0


def eoi(call: Call, arg: int) -> int:
    call.guest.read_u32(arg)
    return 0


def privileged(call: Call) -> int:
    raise HypercallError(Errno.EPERM, "privileged hypercall")


PHYSDEV_SUBOPS = {PhysdevOp.irq_status_query: irq_status_query, PhysdevOp.eoi: eoi}
