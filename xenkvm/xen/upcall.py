"""Raising the event-channel upcall on a vCPU.

Two ways a guest asks for upcalls (linux.md 3.4):

* per-vCPU vector (``HVMOP_set_evtchn_upcall_vector``, advertised by CPUID
  base+4 bit 6): a fixed MSI to that vCPU's LAPIC; the guest EOIs it.
* the global callback (``HVM_PARAM_CALLBACK_IRQ``): vector type (2<<56 | v),
  which Xen injects bypassing the LAPIC so the guest never EOIs; or a GSI
  (type 0), raised as a level on the IOAPIC.

Xen injects the global vector around its virtual LAPIC, so the guest never
EOIs it (Linux does not).  Through KVM's in-kernel LAPIC the vector enters
the ISR and would block every vector of its priority class forever, so the
VMM EOIs it on the guest's behalf, on the target vCPU's own thread while that
vCPU is out of KVM_RUN (``auto_eoi``), a millisecond after raising it and
again until it is neither requested (IRR) nor in service (ISR).  That EOI must
never write the IRR: MSIs from other threads and IPIs from other vCPUs set IRR
bits at any moment, and a KVM_GET_LAPIC / KVM_SET_LAPIC round trip would
overwrite the ones that land in between (a lost interrupt).  So:

* x2APIC mode: the EOI goes through KVM_SET_MSRS on the x2APIC EOI register,
  exactly the guest's own EOI write (KVM's apic_set_eoi: it clears the
  highest in-service bit and leaves IRR alone).  It is sent only when our
  vector is that highest bit; the ISR only changes inside this vCPU's
  KVM_RUN, which cannot run meanwhile, so the check cannot go stale.
* xAPIC mode: KVM has no register-level write (the x2APIC MSRs are refused,
  Hyper-V's EOI MSR is optional), so the page round trip stays, under the
  domain lock that every upcall MSI is sent under.  IPIs that other vCPUs
  send through their LAPICs and the in-kernel PIT can still race it; guests
  that take the global vector in xAPIC mode and need those are not covered.

A guest still inside its handler when the EOI comes could see the same vector
nested, as under Xen.  An MSI the LAPIC refuses (APs register their vector
before software-enabling the LAPIC) is retried a little later while the
upcall is still pending, so no event is lost.
"""
from __future__ import annotations

import logging
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

from xenkvm.xen.abi import HVM_CALLBACK_GSI, HVM_CALLBACK_TYPE_SHIFT, HVM_CALLBACK_VECTOR, HvmParam

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

RETRY_NS = 5_000_000
EOI_DELAY_NS = 1_000_000


class Lapic(IntEnum):
    """Local APIC register offsets (Intel SDM vol. 3, table 11-1) and MSRs."""

    ISR = 0x100                 #: in-service vectors, 8 x 32 bits at a 16-byte stride
    IRR = 0x200                 #: requested vectors, same layout
    MSR_APIC_BASE = 0x1B
    X2APIC_ENABLE = 1 << 10     #: IA32_APIC_BASE.EXTD
    MSR_X2APIC_EOI = 0x80B      #: writing 0 EOIs the highest in-service vector


class Eoi(Enum):
    """What ``auto_eoi`` found."""

    DONE = "done"               #: the vector is neither requested nor in service
    AGAIN = "again"             #: still requested, or not yet the highest in service: look again later


class Upcalls:
    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self._retry_armed: set[int] = set()
        self._eoi_armed: set[int] = set()       #: vCPUs with an auto-EOI round queued
        self.delivered = 0          #: upcall interrupts injected (KVM_SIGNAL_MSI)
        self.eoi_rounds = 0         #: auto-EOI rounds run on a vCPU's thread (global callback vector)

    def callback(self) -> tuple[int, int]:
        """(type, value) of HVM_PARAM_CALLBACK_IRQ."""
        raw = self.domain.params.get(HvmParam.CALLBACK_IRQ, 0)
        return raw >> HVM_CALLBACK_TYPE_SHIFT, raw & ((1 << HVM_CALLBACK_TYPE_SHIFT) - 1)

    def raise_(self, vcpu_id: int) -> None:
        """Interrupt ``vcpu_id`` for its pending events (caller set evtchn_upcall_pending)."""
        state = self.domain.vcpu_state(vcpu_id)
        if state.upcall_vector:
            self._msi(vcpu_id, state.upcall_vector)
            return
        kind, value = self.callback()
        if kind == HVM_CALLBACK_VECTOR and value:
            self._global_vector(vcpu_id, value & 0xFF)
        elif kind == HVM_CALLBACK_GSI and value and vcpu_id == 0:
            self.domain.vm.irq_line(value, 1)  # lowered when the guest clears upcall_pending
            self.domain.io.call_later(RETRY_NS, lambda: self._lower_gsi(value))

    def _msi(self, vcpu_id: int, vector: int) -> None:
        if self.domain.vm.signal_lapic_vector(vcpu_id, vector) > 0:
            self.delivered += 1
            return
        self._retry_later(vcpu_id)

    def _global_vector(self, vcpu_id: int, vector: int) -> None:
        """Deliver, then EOI on the guest's behalf once its (short) handler has run (caller holds the lock)."""
        self._msi(vcpu_id, vector)
        self._schedule_eoi(vcpu_id, vector)

    def _schedule_eoi(self, vcpu_id: int, vector: int) -> None:
        """Arm one auto-EOI round for ``vcpu_id`` (under ``domain.lock``)."""
        if vcpu_id in self._eoi_armed:
            return
        self._eoi_armed.add(vcpu_id)
        machine = self.domain.machine
        self.domain.io.call_later(EOI_DELAY_NS, lambda: machine.run_on_vcpu(
            vcpu_id, lambda vcpu: self._eoi_round(vcpu, vector)))

    def _eoi_round(self, vcpu, vector: int) -> None:
        """On the vCPU's thread.  Disarm *before* looking: an MSI sent after our
        look arms the next round itself; one sent before it is seen here."""
        with self.domain.lock:
            self._eoi_armed.discard(vcpu.id)
            self.eoi_rounds += 1
        if auto_eoi(vcpu, vector, self.domain.lock) is Eoi.AGAIN:
            with self.domain.lock:
                self._schedule_eoi(vcpu.id, vector)

    def _retry_later(self, vcpu_id: int) -> None:
        if vcpu_id in self._retry_armed:
            return
        self._retry_armed.add(vcpu_id)

        def retry() -> None:
            with self.domain.lock:
                self._retry_armed.discard(vcpu_id)
                if self.domain.shinfo.upcall_pending(vcpu_id):
                    self.raise_(vcpu_id)
        self.domain.io.call_later(RETRY_NS, retry)

    def _lower_gsi(self, gsi: int) -> None:
        with self.domain.lock:
            if self.domain.shinfo.upcall_pending(0):
                self.domain.io.call_later(RETRY_NS, lambda: self._lower_gsi(gsi))
            else:
                self.domain.vm.irq_line(gsi, 0)


def vector_bits(regs: bytes, reg: Lapic) -> int:
    """The 256-bit vector bitmap of ISR/IRR/TMR in a KVM_GET_LAPIC page, as one int."""
    bits = 0
    for i in range(8):
        off = reg + i * 0x10
        bits |= int.from_bytes(regs[off:off + 4], "little") << (32 * i)
    return bits


def auto_eoi(vcpu, vector: int, lock) -> Eoi:
    """EOI ``vector`` in ``vcpu``'s LAPIC if it is the highest vector in service.

    Runs on that vCPU's own thread, out of KVM_RUN, so the ISR cannot change
    under us; the IRR can (other threads' MSIs, other vCPUs' IPIs), so it is
    never written in x2APIC mode and only under ``lock`` in xAPIC mode.
    """
    if vcpu.get_msrs([Lapic.MSR_APIC_BASE]).get(Lapic.MSR_APIC_BASE, 0) & Lapic.X2APIC_ENABLE:
        regs = vcpu.get_lapic()
        outcome = _classify(regs, vector)
        if outcome is _Slot.TOP:
            vcpu.set_msrs({Lapic.MSR_X2APIC_EOI: 0})
        return _after(regs, vector, outcome)
    with lock:
        regs = bytearray(vcpu.get_lapic())
        outcome = _classify(regs, vector)
        if outcome is _Slot.TOP:
            off = Lapic.ISR + (vector // 32) * 0x10
            word = int.from_bytes(regs[off:off + 4], "little") & ~(1 << (vector % 32))
            regs[off:off + 4] = word.to_bytes(4, "little")
            vcpu.set_lapic(bytes(regs))
        return _after(regs, vector, outcome)


class _Slot(Enum):
    TOP = "highest in service"
    NESTED = "in service below another vector"
    IDLE = "not in service"


def _classify(regs: bytes, vector: int) -> _Slot:
    isr = vector_bits(regs, Lapic.ISR)
    if not isr >> vector & 1:
        return _Slot.IDLE
    return _Slot.TOP if isr.bit_length() - 1 == vector else _Slot.NESTED


def _after(regs: bytes, vector: int, slot: _Slot) -> Eoi:
    """Another round is needed while the vector is requested, or in service but not EOIed now."""
    if slot is _Slot.NESTED or vector_bits(regs, Lapic.IRR) >> vector & 1:
        return Eoi.AGAIN
    return Eoi.DONE
