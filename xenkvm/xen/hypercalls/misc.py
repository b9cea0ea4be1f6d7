"""vm_assist, physdev_op, and the privileged hypercalls a domU is refused."""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.xen.abi import Errno, Hypercall, PhysdevOp, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import HypercallError, einval

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

#: vm_assist types an HVM guest may enable (Xen's HVM_VM_ASSIST_MASK).
HVM_ASSISTS = 1 << lib.VMASST_TYPE_runstate_update_flag
PRIVILEGED = (Hypercall.platform_op, Hypercall.sysctl, Hypercall.domctl, Hypercall.dm_op,
              Hypercall.hypfs_op, Hypercall.kexec_op, Hypercall.xsm_op)


def register(domain: "XenDomain") -> None:
    def vm_assist(call: Call) -> int:
        cmd, kind = call.args[0] & 0xFFFFFFFF, call.args[1] & 0xFFFFFFFF
        if kind >= 32 or not HVM_ASSISTS >> kind & 1:
            raise einval(f"vm_assist type {kind}")
        if cmd == lib.VMASST_CMD_enable:
            domain.vm_assists |= 1 << kind
        elif cmd == lib.VMASST_CMD_disable:
            domain.vm_assists &= ~(1 << kind)
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

    domain.dispatcher.register(Hypercall.vm_assist, vm_assist)
    domain.dispatcher.register_subop(Hypercall.physdev_op, PhysdevOp.irq_status_query, irq_status_query)
    domain.dispatcher.register_subop(Hypercall.physdev_op, PhysdevOp.eoi, eoi)
    for nr in PRIVILEGED:
        domain.dispatcher.register(nr, privileged)
