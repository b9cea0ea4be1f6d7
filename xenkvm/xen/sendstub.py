"""Ring kicks that never leave KVM: Linux's hypercall pair rewritten into a send stub.

Linux since XSA-466 makes every hypercall through ``xen_hypercall_amd`` (a
vmmcall) or ``xen_hypercall_intel`` (a vmcall), two 16-byte-aligned functions
one after the other (linux.md 0.2).  The patch trap turns each instruction into
a port-I/O exit; the fast path then finishes a ring kick (``EVTCHNOP_send`` to
a PV backend's port) in C, but the kick is still an exit to the VMM, a
``KVM_TRANSLATE`` of the argument and a ``KVM_RUN`` again.  virtio's kick costs
a guest on hardware KVM none of that: KVM signals the device's eventfd itself
(``KVM_IOEVENTFD``).  A Xen kick can take the same road once the port number is
what the guest writes.  The 32 bytes from ``xen_hypercall_amd`` to the end of
``xen_hypercall_intel`` become::

     0  jmp 4                  xen_hypercall_amd's entry
     2  ret                    (a vCPU stopped after the old `out` returns here)
     3  ret                    (the old return)
     4  cmp $32,%eax           __HYPERVISOR_event_channel_op?
     7  jne 27
     9  cmp $4,%edi            EVTCHNOP_send? (Xen reads cmd as an int)
    12  jne 27
    14  jmp 20
    16  jmp 4                  xen_hypercall_intel's entry: the same code
    18  ret
    19  ret
    20  mov (%rsi),%eax        struct evtchn_send.port
    22  out %eax,$SEND_PORT    KVM_IOEVENTFD matches the port number: eventfd, no exit
    24  xor %eax,%eax          the send's result, 0
    26  ret
    27  out %eax,$HYPERCALL_PORT   every other hypercall: the patch trap's exit
    29  ret

**Not at boot.**  Linux patches its own return sites during boot (``apply_returns``:
``jmp __x86_return_thunk`` at amd+3 and intel+3 become ``ret; int3...`` when no
return thunk is needed) and warns (``missing return thunk``, a tainted kernel) if
a listed site holds anything else.  So the patch trap first writes its plain
3-byte patch; the stub replaces it when the first PV backend binds a ring port
(the guest's xenbus is up: its boot patching is long done), with every vCPU parked
out of KVM_RUN (machine/snapshot/pause.py), and only if the returns are plain
``ret`` by then (a kernel that keeps the return thunk for its mitigations keeps its
thunk and the plain patch).  A parked vCPU may sit anywhere in the old code: at an
entry (the stub runs), or after the old ``out`` or at the old ``ret`` (offsets 2, 3,
18, 19: ``ret`` in the stub too); any other offset inside, never reached by the old
code, waits for the next try.

A backend's ring port bound with a kick eventfd (``FastSend.register``) gets an
ioeventfd on ``SEND_PORT`` matching its number; any other port's send exits to
the VMM as a 4-byte ``out`` to ``SEND_PORT`` (the store's and console's ports,
whose services are Python callbacks; a binding KVM refused), and
:func:`xenkvm.xen.traps.stub_send` finishes it as the hypercall it is, with the
result in RAX and RIP at the ``ret`` after the ``xor`` (set outright: at the exit
RIP is still at the ``out`` on hardware KVM, which skips it on the next KVM_RUN only
if RIP was left alone, and already past it on PVM).  Only a 64-bit kernel's pair is used (a
32-bit one passes arguments in other registers).

What the guest could do with it that it could not before: a CPL-0 ``out`` to
``SEND_PORT`` from anywhere (or a CPL-3 one with IOPL 3, which Linux grants only
to root's ``iopl()``) kicks a backend port it names; a kick is a hint (a
backend re-reads its ring), so a spurious one costs a pass, nothing else.
Outside the stub, such an ``out`` that reaches the VMM is ignored.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.machine.snapshot.pause import Parking
from xenkvm.xen.abi import EvtchnOp, Hypercall
from xenkvm.xen.trapsites import VMCALL, VMMCALL

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

STUB_LEN = 32
INTEL_ENTRY = 16         #: xen_hypercall_intel, 16 bytes after xen_hypercall_amd
SEND_OUT = 22            #: the stub's ``out %eax, $SEND_PORT``: RIP at its exit on VMX/SVM
SEND_OUT_END = 24        #: RIP after it: at the exit on PVM (its emulator completes the ``out`` first)
SEND_RESUME = 26         #: the ``ret`` after the ``xor``, where a send finished by the VMM goes on
#: where a vCPU parked in the plain-patched pair may be: the entries, after the ``out``, the ``ret``
SAFE_OFFSETS = (0, 2, 3, 16, 18, 19)
PARK_TIMEOUT_S = 2.0
MAX_TRIES = 5

RET = 0xC3


def stub(hypercall_port: int, send_port: int) -> bytes:
    """The 32 bytes written over the pair (module docstring)."""
    if not (0 <= hypercall_port <= 0xFF and 0 <= send_port <= 0xFF):
        raise ValueError("the stub's `out` takes an 8-bit port")
    code = bytes([
        0xEB, 4 - 2,                              # 0  jmp 4
        RET, RET,                                 # 2, 3
        0x83, 0xF8, Hypercall.event_channel_op,   # 4  cmp $32,%eax
        0x75, 27 - 9,                             # 7  jne 27
        0x83, 0xFF, EvtchnOp.send,                # 9  cmp $4,%edi
        0x75, 27 - 14,                            # 12 jne 27
        0xEB, 20 - 16,                            # 14 jmp 20
        0xEB, (4 - 18) & 0xFF,                    # 16 jmp 4 (the intel entry)
        RET, RET,                                 # 18, 19
        0x8B, 0x06,                               # 20 mov (%rsi),%eax
        0xE7, send_port,                          # 22 out %eax,$send_port
        0x31, 0xC0,                               # 24 xor %eax,%eax
        RET,                                      # 26
        0xE7, hypercall_port,                     # 27 out %eax,$hypercall_port
        RET,                                      # 29
        0xCC, 0xCC])                              # 30
    assert len(code) == STUB_LEN
    return code


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


def _padding(code: bytes) -> bool:
    while code:
        n = _padding_len(code)
        if n == 0:
            return False
        code = code[n:]
    return True


def _return_then_padding(code: bytes) -> bool:
    """``ret`` or ``jmp rel32`` (the return thunk), then nothing but padding."""
    if code[:1] == b"\xc3":
        return _padding(code[1:])
    return code[:1] == b"\xe9" and len(code) >= 5 and _padding(code[5:])


def is_linux_pair(code: bytes) -> bool:
    """Whether the 32 bytes at ``xen_hypercall_amd`` are Linux's two hypercall functions and
    their padding, and nothing else (what the stub may replace, once upgradable)."""
    return (len(code) == STUB_LEN and code[:3] == VMMCALL and code[16:19] == VMCALL
            and _return_then_padding(code[3:16]) and _return_then_padding(code[19:32]))


def upgradable(code: bytes, patched: bytes) -> bool:
    """The plain-patched pair (``patched`` at both entries) whose returns the kernel has made
    plain ``ret`` (no return thunk), the rest padding: the stub may replace it now."""
    return (len(code) == STUB_LEN and code[0:3] == patched and code[16:19] == patched
            and code[3] == RET and _padding(code[4:16]) and code[19] == RET and _padding(code[20:32]))


def rip_allows(rip: int, vaddr: int) -> bool:
    """A parked vCPU at ``rip`` may run on in the stub: outside the pair, or where the stub
    does what the old code would (SAFE_OFFSETS)."""
    return not vaddr <= rip < vaddr + STUB_LEN or rip - vaddr in SAFE_OFFSETS


class StubUpgrade:
    """One domain's pending send stub: written, with every vCPU parked, on the first ring
    port a backend binds (``request``, from FastSend.register), then ``installed()`` runs (the
    send port's hook and the ioeventfds).  A failed try (a vCPU that would not park, or parked
    inside the pair where the stub differs) is retried on the next binding, MAX_TRIES times."""

    def __init__(self, domain: "XenDomain", gpa: int, vaddr: int, patched: bytes, code: bytes,
                 installed: Callable[[], None]):
        self.domain, self.gpa, self.vaddr = domain, gpa, vaddr
        self.patched, self.code, self.installed = patched, code, installed
        self.done = False
        self.tries = 0
        self._busy = threading.Lock()

    def request(self) -> None:
        """Start a try on a helper thread (any thread; the domain lock may be held)."""
        if self.done or self.tries >= MAX_TRIES or self.domain.machine.stopping or not self._busy.acquire(False):
            return
        self.tries += 1
        threading.Thread(target=self._try, name="send-stub", daemon=True).start()

    def _try(self) -> None:
        try:
            self._install()
        except (SnapshotError, OSError) as e:
            log.info("send stub: not now (%s)", e)
        finally:
            self._busy.release()

    def _install(self) -> None:
        parking = Parking(self.domain.machine.runners)
        parking.start()
        try:
            parking.wait(PARK_TIMEOUT_S)
            code = bytes(self.domain.mem.read(self.gpa, STUB_LEN))
            if not upgradable(code, self.patched):
                self.done = True        # changed by the guest, or a kernel keeping its return thunk
                log.info("send stub: the hypercall pair at %#x is not plain patched code with plain "
                         "returns (%s); ring kicks stay in the VMM", self.vaddr, code.hex())
                return
            rips = parking.run_parked(lambda vcpu: vcpu.get_regs().rip)
            if not all(rip_allows(rip, self.vaddr) for rip in rips.values()):
                log.info("send stub: a vCPU is inside the hypercall pair; next time")
                return
            self.installed()            # takes the domain lock itself
            self.domain.mem.write(self.gpa, self.code)
            self.done = True
            log.info("send stub over xen_hypercall_amd/_intel at %#x (GPA %#x): ring kicks inside KVM "
                     "from now (%d completed in C before)", self.vaddr, self.gpa, self.domain.fast.sends)
        finally:
            parking.release()
