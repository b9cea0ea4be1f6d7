"""Assemble a guest: the Machine (a plain PC under KVM) plus the personality its config asks for.

The one place that knows both layers: ``xenkvm/machine`` never imports
``xenkvm/xen``; a guest with a ``xen:`` section gets a ``XenDomain`` attached
here (docs/architecture.md).
"""
from __future__ import annotations

from xenkvm.backends import DeviceManager
from xenkvm.config import GuestConfig
from xenkvm.kvm.system import Kvm
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.machine import Machine
from xenkvm.xen.domain import XenDomain


def build_machine(cfg: GuestConfig, *, sink: ConsoleSink | None = None, trace: bool = False,
                  kvm: Kvm | None = None) -> Machine:
    """A Machine for ``cfg``, with the Xen ABI and its PV devices when ``cfg.xen`` is set (not yet booted)."""
    machine = Machine(cfg, sink=sink, trace=trace, kvm=kvm)
    if cfg.xen is not None:
        try:
            domain = XenDomain(machine, cfg.xen, trace=trace)
            machine.attach(domain)
            domain.devices = DeviceManager(domain)
            machine.attach(domain.devices)
            domain.devices.attach_configured()   # the guest definition's disks, before any vCPU runs
        except BaseException:
            machine.close()
            raise
    return machine


def xen_domain(machine: Machine) -> XenDomain | None:
    """The Xen personality attached to ``machine``, if any."""
    return next((ext for ext in machine.extensions if isinstance(ext, XenDomain)), None)
