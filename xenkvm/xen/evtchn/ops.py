"""EVTCHNOP_*: guest structs in, the port logic called, the result or a Xen error out.

Each sub-op handler has the dispatcher's ``(call, arg) -> int`` signature and
acts on ``call.domain.evtchn``; :data:`SUBOPS` maps sub-op numbers to them so a
hypercall table can name them.  Structs are read with the compiler's layouts
(cffi API mode, ``xen/abi.py``) into a private copy, so a guest changing its
memory meanwhile changes nothing here; outputs are written back to the guest
only on success, as Xen's ``__copy_to_guest`` does.  An unreadable or
unwritable struct is -EFAULT (``GuestVirtual``); a port allocated for a result
that cannot be written back is closed again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from xenkvm.xen.abi import Errno, EvtchnOp, XenStruct, ffi, lib
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.ports import PortState

if TYPE_CHECKING:
    from xenkvm.xen.dispatch import Call

SubOp = Callable[["Call", int], int]


class _Struct(XenStruct):
    """An ABI struct read from the guest into a private, typed buffer."""

    def __init__(self, name: str):
        super().__init__(f"struct {name}")
        self.ptr = ffi.typeof(f"struct {name} *")

    def load(self, call: "Call", arg: int):
        """(buffer, typed view of it) of the guest's struct at ``arg``."""
        buf = bytearray(call.guest.read(arg, self.size))
        return buf, ffi.from_buffer(self.ptr, buf)

    def read(self, call: "Call", arg: int):
        """A read-only typed copy (for structs that are only input)."""
        return ffi.from_buffer(self.ptr, call.guest.read(arg, self.size))


ALLOC_UNBOUND = _Struct("evtchn_alloc_unbound")
BIND_INTERDOMAIN = _Struct("evtchn_bind_interdomain")
BIND_VIRQ = _Struct("evtchn_bind_virq")
BIND_IPI = _Struct("evtchn_bind_ipi")
CLOSE = _Struct("evtchn_close")
SEND = _Struct("evtchn_send")
STATUS = _Struct("evtchn_status")
BIND_VCPU = _Struct("evtchn_bind_vcpu")
UNMASK = _Struct("evtchn_unmask")
RESET = _Struct("evtchn_reset")
INIT_CONTROL = _Struct("evtchn_init_control")
EXPAND_ARRAY = _Struct("evtchn_expand_array")
SET_PRIORITY = _Struct("evtchn_set_priority")
_SEND_PORT = SEND.offset("port")
#: ``evtchn_status.u`` (a union cffi cannot name in a partial struct): the compiler's offset.
STATUS_U = lib.XK_OFF_evtchn_status__u
_UNBOUND_U = ffi.typeof("xk_evtchn_unbound_status *")
_INTERDOMAIN_U = ffi.typeof("xk_evtchn_interdomain_status *")
_U32 = ffi.typeof("uint32_t *")


def alloc_unbound(call: "Call", arg: int) -> int:
    buf, req = ALLOC_UNBOUND.load(call, arg)

    def publish(port: int) -> None:
        req.port = port
        call.guest.write(arg, buf)
    call.domain.evtchn.alloc_unbound(req.dom, req.remote_dom, publish)
    return 0


def bind_interdomain(call: "Call", arg: int) -> int:
    buf, req = BIND_INTERDOMAIN.load(call, arg)

    def publish(port: int) -> None:
        req.local_port = port
        call.guest.write(arg, buf)
    call.domain.evtchn.bind_interdomain(req.remote_dom, req.remote_port, publish)
    return 0


def bind_virq(call: "Call", arg: int) -> int:
    buf, req = BIND_VIRQ.load(call, arg)

    def publish(port: int) -> None:
        req.port = port
        call.guest.write(arg, buf)
    call.domain.evtchn.bind_virq(req.virq, req.vcpu, publish)
    return 0


def bind_ipi(call: "Call", arg: int) -> int:
    buf, req = BIND_IPI.load(call, arg)

    def publish(port: int) -> None:
        req.port = port
        call.guest.write(arg, buf)
    call.domain.evtchn.bind_ipi(req.vcpu, publish)
    return 0


def close(call: "Call", arg: int) -> int:
    call.domain.evtchn.close(CLOSE.read(call, arg).port)
    return 0


def send(call: "Call", arg: int) -> int:
    """The hot path: the one u32 field read at the compiler's offset, no struct copy."""
    return call.domain.evtchn.send(call.guest.read_u32(arg + _SEND_PORT))


def status(call: "Call", arg: int) -> int:
    """EVTCHNOP_status: the state, the vCPU and the union for the state (the rest zeroed)."""
    buf, req = STATUS.load(call, arg)
    p = call.domain.evtchn.port_status(req.dom, req.port)
    buf[STATUS_U:] = bytes(len(buf) - STATUS_U)
    u = ffi.from_buffer(buf) + STATUS_U
    req.status, req.vcpu = (int(p.state), p.vcpu) if p is not None else (int(PortState.CLOSED), 0)
    if p is not None and p.state == PortState.UNBOUND:
        ffi.cast(_UNBOUND_U, u).dom = p.remote_dom
    elif p is not None and p.state == PortState.INTERDOMAIN:
        ido = ffi.cast(_INTERDOMAIN_U, u)
        ido.dom, ido.port = p.remote_dom, p.remote_port
    elif p is not None and p.state == PortState.VIRQ:
        ffi.cast(_U32, u)[0] = p.virq
    call.guest.write(arg, buf)
    return 0


def bind_vcpu(call: "Call", arg: int) -> int:
    req = BIND_VCPU.read(call, arg)
    call.domain.evtchn.bind_vcpu(req.port, req.vcpu)
    return 0


def unmask(call: "Call", arg: int) -> int:
    call.domain.evtchn.unmask(UNMASK.read(call, arg).port)
    return 0


def reset(call: "Call", arg: int) -> int:
    call.domain.evtchn.check_self(RESET.read(call, arg).dom)
    call.domain.evtchn.guest_reset()
    return 0


def _fifo_offered(call: "Call") -> None:
    """``xen.fifo_events: false``: the FIFO ops are -ENOSYS, as QEMU's (Linux stays on 2-level)."""
    cfg = getattr(call.domain, "cfg", None)
    if cfg is not None and not getattr(cfg, "fifo_events", True):
        raise HypercallError(Errno.ENOSYS, "FIFO event channels are off (xen.fifo_events: false)")


def init_control(call: "Call", arg: int) -> int:
    _fifo_offered(call)
    buf, req = INIT_CONTROL.load(call, arg)
    call.domain.evtchn.init_control(req.control_gfn, req.offset, req.vcpu)
    # Xen copies the struct back (link_bits is an output) only on success.
    req.link_bits = lib.EVTCHN_FIFO_LINK_BITS
    call.guest.write(arg, buf)
    return 0


def expand_array(call: "Call", arg: int) -> int:
    _fifo_offered(call)
    call.domain.evtchn.expand_array(EXPAND_ARRAY.read(call, arg).array_gfn)
    return 0


def set_priority(call: "Call", arg: int) -> int:
    _fifo_offered(call)
    req = SET_PRIORITY.read(call, arg)
    call.domain.evtchn.set_priority(req.port, req.priority)
    return 0


#: EVTCHNOP sub-op -> handler (the event_channel_op family of the hypercall table).
SUBOPS: dict[int, SubOp] = {
    EvtchnOp.alloc_unbound: alloc_unbound,
    EvtchnOp.bind_interdomain: bind_interdomain,
    EvtchnOp.bind_virq: bind_virq,
    EvtchnOp.bind_ipi: bind_ipi,
    EvtchnOp.close: close,
    EvtchnOp.send: send,
    EvtchnOp.status: status,
    EvtchnOp.bind_vcpu: bind_vcpu,
    EvtchnOp.unmask: unmask,
    EvtchnOp.reset: reset,
    EvtchnOp.init_control: init_control,
    EvtchnOp.expand_array: expand_array,
    EvtchnOp.set_priority: set_priority,
}
