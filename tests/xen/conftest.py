"""Fixtures for the Xen layer: a real Machine with the Xen personality, not yet running.

``xen_machine.xen`` is the attached XenDomain (a fixture attribute, as ``sink``:
the Machine itself has no Xen attribute).

``FakeCaller`` stands in for the calling vCPU of a hypercall: identity
address translation, so guest structs are written straight into guest RAM.
"""
from __future__ import annotations

import pytest

import guestgen
from xenkvm.config import GuestConfig, XenConfig
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.build import build_machine, xen_domain


class FakeCaller:
    def __init__(self, vcpu_id: int = 0, vcpu=None):
        self.id = vcpu_id
        self._vcpu = vcpu       #: the real vCPU, for the MSR reads of a pvclock resync

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return self._vcpu.get_msrs(indices)

    def translate(self, gva: int) -> int | None:
        return gva if gva < 1 << 40 else None


@pytest.fixture
def xen_machine(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(guestgen.pvh_elf(guestgen.SPIN))
    cfg = GuestConfig(name="t", kernel=kernel, memory=32 << 20, vcpus=2, console="none", xen=XenConfig())
    sink = ConsoleSink(None)
    m = build_machine(cfg, sink=sink)
    m.sink = sink
    m.xen = xen_domain(m)
    m.io.start()
    yield m
    m.close()


@pytest.fixture
def hcall(xen_machine):
    """hcall(nr, *args, vcpu=0) -> signed result, through the real dispatcher."""
    def call(nr: int, *args: int, vcpu: int = 0) -> int:
        padded = tuple(args) + (0,) * (6 - len(args))
        r = xen_machine.xen.dispatcher.dispatch(FakeCaller(vcpu, xen_machine.vcpus[vcpu]), int(nr), padded)
        return r - (1 << 64) if r >> 63 else r
    return call
