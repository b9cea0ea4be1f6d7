"""The VMM's EOI of the global callback vector (upcall.auto_eoi) against a real in-kernel LAPIC.

An interrupt that another thread injects while the EOI is under way must stay
requested.  The "worst moment" is made deterministic with a vCPU wrapper whose
``get_lapic`` injects a second vector right after reading the LAPIC page: a
KVM_GET_LAPIC / KVM_SET_LAPIC round trip writes back the stale IRR and loses it.
"""
from __future__ import annotations

import threading

import pytest

from xenkvm.kvm.system import Kvm
from xenkvm.kvm.vcpu import Vcpu
from xenkvm.kvm.vm import Vm
from xenkvm.xen.upcall import Eoi, Lapic, auto_eoi, vector_bits

pytestmark = pytest.mark.kvm

CALLBACK = 0x50
OTHER = 0xE3            #: a vector another thread injects meanwhile
SVR = 0xF0
APIC_BASE = 0xFEE0_0000 | (1 << 11) | (1 << 8)   # enabled, BSP


@pytest.fixture
def vcpu():
    kvm = Kvm()
    vm = Vm(kvm)
    vm.create_irqchip()
    v = Vcpu(vm, 0)
    v.set_cpuid(kvm.supported_cpuid())
    yield v
    v.close()
    vm.close()
    kvm.close()


def setup_lapic(vcpu: Vcpu, x2apic: bool, isr: tuple[int, ...] = (), irr: tuple[int, ...] = ()) -> None:
    vcpu.set_msrs({Lapic.MSR_APIC_BASE: APIC_BASE | (Lapic.X2APIC_ENABLE if x2apic else 0)})
    regs = bytearray(vcpu.get_lapic())
    regs[SVR:SVR + 4] = (0x1FF).to_bytes(4, "little")   # software-enabled
    for base, vectors in ((Lapic.ISR, isr), (Lapic.IRR, irr)):
        for v in vectors:
            off = base + (v // 32) * 0x10
            word = int.from_bytes(regs[off:off + 4], "little") | 1 << (v % 32)
            regs[off:off + 4] = word.to_bytes(4, "little")
    vcpu.set_lapic(bytes(regs))


def bits(vcpu: Vcpu, reg: Lapic) -> int:
    return vector_bits(vcpu.get_lapic(), reg)


class InjectAfterRead:
    """Forwards to the vCPU; right after each LAPIC read, ``inject()`` runs (another thread's MSI)."""

    def __init__(self, vcpu: Vcpu, inject):
        self._vcpu, self._inject = vcpu, inject

    def __getattr__(self, name):
        return getattr(self._vcpu, name)

    def get_lapic(self) -> bytes:
        regs = self._vcpu.get_lapic()
        self._inject()
        return regs


def test_x2apic_eoi_keeps_an_interrupt_injected_meanwhile(vcpu):
    setup_lapic(vcpu, x2apic=True, isr=(CALLBACK,))
    racer = InjectAfterRead(vcpu, lambda: vcpu.vm.signal_lapic_vector(0, OTHER))
    assert auto_eoi(racer, CALLBACK, threading.RLock()) is Eoi.DONE
    assert not bits(vcpu, Lapic.ISR) >> CALLBACK & 1
    assert bits(vcpu, Lapic.IRR) >> OTHER & 1, "the interrupt injected during the EOI was lost"


def test_xapic_eoi_holds_the_injectors_lock(vcpu):
    """xAPIC has no IRR-safe EOI path: the VMM's own injections (under the domain lock) must wait."""
    setup_lapic(vcpu, x2apic=False, isr=(CALLBACK,))
    lock = threading.RLock()

    def inject_from_another_thread() -> None:
        def send() -> None:
            with lock:                      # as Upcalls sends every upcall MSI
                vcpu.vm.signal_lapic_vector(0, OTHER)
        t = threading.Thread(target=send)
        t.start()
        t.join(0.5)                         # returns at once unless the lock is held
        threads.append(t)
    threads: list[threading.Thread] = []
    assert auto_eoi(InjectAfterRead(vcpu, inject_from_another_thread), CALLBACK, lock) is Eoi.DONE
    for t in threads:
        t.join()
    assert not bits(vcpu, Lapic.ISR) >> CALLBACK & 1
    assert bits(vcpu, Lapic.IRR) >> OTHER & 1, "the interrupt injected during the EOI was lost"


@pytest.mark.parametrize("x2apic", [True, False])
def test_not_yet_delivered_vector_is_left_for_a_later_round(vcpu, x2apic):
    """Still requested (the guest had interrupts off): nothing to EOI yet, but it will need one."""
    setup_lapic(vcpu, x2apic=x2apic, irr=(CALLBACK,))
    assert auto_eoi(vcpu, CALLBACK, threading.RLock()) is Eoi.AGAIN
    assert bits(vcpu, Lapic.IRR) >> CALLBACK & 1


@pytest.mark.parametrize("x2apic", [True, False])
def test_a_higher_vector_in_service_is_never_eoied_for_us(vcpu, x2apic):
    """An EOI ends the highest in-service vector: with a higher one nested, wait."""
    setup_lapic(vcpu, x2apic=x2apic, isr=(CALLBACK, OTHER))
    assert auto_eoi(vcpu, CALLBACK, threading.RLock()) is Eoi.AGAIN
    isr = bits(vcpu, Lapic.ISR)
    assert isr >> CALLBACK & 1 and isr >> OTHER & 1


@pytest.mark.parametrize("x2apic", [True, False])
def test_in_service_and_requested_again_takes_another_round(vcpu, x2apic):
    setup_lapic(vcpu, x2apic=x2apic, isr=(CALLBACK,), irr=(CALLBACK,))
    assert auto_eoi(vcpu, CALLBACK, threading.RLock()) is Eoi.AGAIN
    assert not bits(vcpu, Lapic.ISR) >> CALLBACK & 1 and bits(vcpu, Lapic.IRR) >> CALLBACK & 1
