"""Raising the event-channel upcall on a vCPU.

Two ways a guest asks for upcalls (linux.md 3.4):

* per-vCPU vector (``HVMOP_set_evtchn_upcall_vector``, advertised by CPUID
  base+4 bit 6): a fixed MSI to that vCPU's LAPIC; the guest EOIs it.
* the global callback (``HVM_PARAM_CALLBACK_IRQ``): vector type (2<<56 | v),
  which Xen injects bypassing the LAPIC so the guest never EOIs; or a GSI
  (type 0), raised as a level on the IOAPIC.

Through an in-kernel LAPIC the global vector would leave its ISR bit set
forever, so a millisecond after delivering it we clear that bit on the target
vCPU's own thread (vCPU ioctls must not come from other threads): an
automatic EOI.  A guest still inside its handler by then could see the same
vector nested; Linux prefers the per-vCPU vector whenever CPUID offers it.  An MSI the LAPIC refuses (APs register their vector before
software-enabling the LAPIC) is retried a little later while the upcall is
still pending, so no event is lost.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.xen.abi import HVM_CALLBACK_GSI, HVM_CALLBACK_TYPE_SHIFT, HVM_CALLBACK_VECTOR, HvmParam

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

RETRY_NS = 5_000_000
EOI_DELAY_NS = 1_000_000
LAPIC_ISR = 0x100


class Upcalls:
    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self._retry_armed: set[int] = set()
        self.delivered = 0

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
        """Deliver, then EOI on the guest's behalf once its (short) handler has run."""
        self._msi(vcpu_id, vector)
        machine = self.domain.machine
        self.domain.io.call_later(EOI_DELAY_NS, lambda: machine.run_on_vcpu(
            vcpu_id, lambda vcpu: clear_isr(vcpu, vector)))

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


def clear_isr(vcpu, vector: int) -> None:
    """Clear ``vector``'s in-service bit in ``vcpu``'s LAPIC (runs on that vCPU's thread)."""
    regs = bytearray(vcpu.get_lapic())
    off = LAPIC_ISR + (vector // 32) * 0x10
    bit = 1 << (vector % 32)
    word = int.from_bytes(regs[off:off + 4], "little")
    if word & bit:
        regs[off:off + 4] = (word & ~bit).to_bytes(4, "little")
        vcpu.set_lapic(bytes(regs))
