"""Ring kicks that never leave KVM: Linux's hypercall pair rewritten into a send stub.

Linux since XSA-466 makes every hypercall through ``xen_hypercall_amd`` (a
vmmcall) or ``xen_hypercall_intel`` (a vmcall), two 16-byte-aligned functions
one after the other (linux.md 0.2).  The patch trap turns each instruction into
a port-I/O exit; the fast path then finishes a ring kick (``EVTCHNOP_send`` to
a PV backend's port) in C, but the kick is still an exit to the VMM, a
``KVM_TRANSLATE`` of the argument and a ``KVM_RUN`` again.  virtio's kick costs
a guest on hardware KVM none of that: KVM signals the device's eventfd itself
(``KVM_IOEVENTFD``).

A Xen kick can take the same road once the port number is what the guest writes.
The 32 bytes from ``xen_hypercall_amd`` to the end of ``xen_hypercall_intel``
(both functions and their padding, checked byte by byte before anything is
written) become::

     0  cmp $32,%eax         __HYPERVISOR_event_channel_op?
     3  jne 26
     5  cmp $4,%edi          EVTCHNOP_send? (Xen reads cmd as an int)
     8  jne 26
    10  mov (%rsi),%eax      struct evtchn_send.port
    12  jmp 18
    16  jmp 0                xen_hypercall_intel's entry: the same code
    18  out %eax,$SEND_PORT  KVM_IOEVENTFD matches the port number: eventfd, no exit
    20  xor %eax,%eax        the send's result, 0
    22  ret
    26  out %eax,$HYPERCALL_PORT   every other hypercall: the patch trap's exit
    28  ret

A backend's ring port bound with a kick eventfd (``FastSend.register``) gets an
ioeventfd on ``SEND_PORT`` matching its number; any other port's send exits to
the VMM as a 4-byte ``out`` to ``SEND_PORT`` (the store's and console's ports,
whose services are Python callbacks; a binding KVM refused), and
:func:`on_send_port` finishes it as the hypercall it is, with the result in RAX
and RIP past the ``xor``.  Only the 64-bit
kernel's pair is rewritten (a 32-bit kernel passes arguments in other
registers); the return thunk the functions jumped to is replaced by ``ret``.

What the guest could do with it that it could not before: a CPL-0 ``out`` to
``SEND_PORT`` from anywhere (or a CPL-3 one with IOPL 3, which Linux grants only
to root's ``iopl()``) kicks a backend port it names; a kick is a hint (a
backend re-reads its ring), so a spurious one costs a pass, nothing else.
Outside the stub, such an ``out`` that reaches the VMM is ignored.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.xen.abi import EvtchnOp, Hypercall

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

STUB_LEN = 32
INTEL_ENTRY = 16         #: xen_hypercall_intel, 16 bytes after xen_hypercall_amd
SEND_OUT_END = 20        #: RIP after the stub's ``out %eax, $SEND_PORT``
SKIP_RESULT = 2          #: the ``xor %eax,%eax`` a send finished by the VMM steps over

VMMCALL = b"\x0f\x01\xd9"
VMCALL = b"\x0f\x01\xc1"


def _padding_len(code: bytes) -> int:
    """Length of the padding instruction ``code`` starts with (int3, nop, or a ``0f 1f /0``
    multi-byte nop behind 66/2e prefixes, as assemblers align functions), 0 if it is not one."""
    if code[:1] in (b"\xcc", b"\x90"):
        return 1
    i = 0
    while i < len(code) and code[i] in (0x66, 0x2E):
        i += 1
    if code[i:i + 2] != b"\x0f\x1f" or len(code) < i + 3 or code[i + 2] & 0x38:
        return 0
    modrm = code[i + 2]
    mod, rm = modrm >> 6, modrm & 7
    n = i + 3 + (rm == 4 and mod != 3)
    n += {1: 1, 2: 4}.get(mod, 4 if mod == 0 and rm == 5 else 0)
    return n if n <= len(code) else 0


def stub(hypercall_port: int, send_port: int) -> bytes:
    """The 32 bytes written over the pair (module docstring)."""
    if not (0 <= hypercall_port <= 0xFF and 0 <= send_port <= 0xFF):
        raise ValueError("the stub's `out` takes an 8-bit port")
    code = bytes([
        0x83, 0xF8, Hypercall.event_channel_op,   # 0  cmp $32,%eax
        0x75, 26 - 5,                             # 3  jne 26
        0x83, 0xFF, EvtchnOp.send,                # 5  cmp $4,%edi
        0x75, 26 - 10,                            # 8  jne 26
        0x8B, 0x06,                               # 10 mov (%rsi),%eax
        0xEB, 18 - 14,                            # 12 jmp 18
        0xCC, 0xCC,                               # 14
        0xEB, (0 - 18) & 0xFF,                    # 16 jmp 0 (the intel entry)
        0xE7, send_port,                          # 18 out %eax,$send_port
        0x31, 0xC0,                               # 20 xor %eax,%eax
        0xC3,                                     # 22 ret
        0xCC, 0xCC, 0xCC,                         # 23
        0xE7, hypercall_port,                     # 26 out %eax,$hypercall_port
        0xC3,                                     # 28 ret
        0xCC, 0xCC, 0xCC])                        # 29
    assert len(code) == STUB_LEN
    return code


def _return_then_padding(code: bytes) -> bool:
    """``ret`` or ``jmp rel32`` (the return thunk), then nothing but padding."""
    if code[:1] == b"\xc3":
        rest = code[1:]
    elif code[:1] == b"\xe9" and len(code) >= 5:
        rest = code[5:]
    else:
        return False
    while rest:
        n = _padding_len(rest)
        if n == 0:
            return False
        rest = rest[n:]
    return True


def is_linux_pair(code: bytes) -> bool:
    """Whether the 32 bytes at ``xen_hypercall_amd`` are Linux's two hypercall functions and
    their padding, and nothing else (what the stub may overwrite)."""
    return (len(code) == STUB_LEN and code[:3] == VMMCALL and code[16:19] == VMCALL
            and _return_then_padding(code[3:16]) and _return_then_padding(code[19:32]))


def on_send_port(domain: "XenDomain", vcpu: "Vcpu", stub_vaddr: int) -> None:
    """A send the stub made and KVM did not match (the port has no ioeventfd): finish it as
    the ``EVTCHNOP_send`` it is (the argument is still at RSI), RAX = the result, RIP past the
    stub's ``xor``.  An ``out`` to this port from anywhere else is ignored."""
    from xenkvm.xen.traps import hypercall_result          # traps imports this module
    from xenkvm.xen.privilege import caller_cpl

    io = vcpu.exit_io
    if io.direction != klib.KVM_EXIT_IO_OUT or io.size != 4 or io.count != 1:
        return
    regs = vcpu.sync_regs()
    cpl = caller_cpl(vcpu.sync_sregs(), regs.rflags)
    if regs.rip != stub_vaddr + SEND_OUT_END or cpl != 0 or not domain.machine.long_mode(vcpu):
        log.warning("vcpu %d: out to the send port at %#x (CPL %d), not from the send stub: ignored",
                    vcpu.id, regs.rip, cpl)
        return
    args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
    regs.rax = hypercall_result(domain, vcpu, cpl, Hypercall.event_channel_op, args, True)
    regs.rip += SKIP_RESULT
    vcpu.mark_regs_dirty(regs)
