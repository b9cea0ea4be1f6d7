"""Assemble a guest: the Machine (a plain PC under KVM) plus the personality its config asks for.

The one place that knows both layers: ``xenkvm/machine`` never imports
``xenkvm/xen``; a guest with a ``xen:`` section gets a ``XenDomain`` attached
here (docs/architecture.md).

The Xen layer and its PV backends are imported only when a guest has a ``xen:``
section: a plain guest's start-up skips them (in the nested rig's L1, where Python
runs under TCG: 3.9 s of the 8.1 s import of this module under ``-X importtime``,
0.3 s measured in-process with warm caches; docs/hw-rig.md).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from xenkvm.config import GuestConfig
from xenkvm.kvm.system import Kvm
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.machine import Machine
from xenkvm.machine.snapshot import snapshot as snap
from xenkvm.machine.snapshot.format import SnapshotError

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain


def build_machine(cfg: GuestConfig, *, sink: ConsoleSink | None = None, trace: bool = False,
                  kvm: Kvm | None = None) -> Machine:
    """A Machine for ``cfg``, with the Xen ABI and its PV devices when ``cfg.xen`` is set (not yet booted)."""
    machine = Machine(cfg, sink=sink, trace=trace, kvm=kvm)
    if cfg.xen is not None:
        from xenkvm.backends import DeviceManager
        from xenkvm.xen.domain import XenDomain
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
    from xenkvm.xen.domain import XenDomain
    return next((ext for ext in machine.extensions if isinstance(ext, XenDomain)), None)


def restore_machine(path: str, *, prefault: bool = False, sink: ConsoleSink | None = None,
                    trace: bool = False, kvm: Kvm | None = None, xenstore_socket: str | None = None,
                    configure: Callable[[GuestConfig], GuestConfig] | None = None,
                    disk_copy: str | None = None) -> Machine:
    """A Machine resumed from snapshot ``path`` (its RAM file mapped copy-on-write; ``prefault``:
    its data pages mapped in now): built from the saved config, state loaded, ready for ``run()``.
    ``xenstore_socket`` moves a Xen domain's embedded xenstored (parallel restores need one each);
    ``configure`` changes what the host side decides (the toolstack's name, logs, sockets);
    ``disk_copy``: a directory each writable disk is copied into (reflink or sparse), the
    restored domain running on the copies (backends/snapshot.py; else on the saved disks,
    which must be unchanged).
    A foreign, truncated, corrupted or newer snapshot raises SnapshotError (one line)."""
    loaded = snap.load(path, prefault=prefault)
    if configure is not None:
        loaded.cfg = configure(loaded.cfg)
    if xenstore_socket and loaded.cfg.xen is not None:
        loaded.cfg = dataclasses.replace(loaded.cfg, xen=dataclasses.replace(loaded.cfg.xen,
                                                                            xenstore_socket=xenstore_socket))
    try:
        machine = Machine(loaded.cfg, sink=sink, trace=trace, kvm=kvm, snapshot=loaded)
        try:
            if loaded.cfg.xen is not None:
                from xenkvm.backends import DeviceManager
                from xenkvm.xen.domain import XenDomain
                domain = XenDomain(machine, loaded.cfg.xen, trace=trace)
                machine.attach(domain)
                domain.devices = DeviceManager(domain)     # restores after the domain (attach order)
                domain.devices.disk_copy = disk_copy
                machine.attach(domain.devices)
            elif disk_copy:
                raise SnapshotError(f"{path}: --disk-copy: the snapshot has no disks")
            machine.apply_snapshot(loaded)
        except BaseException:
            machine.close()
            raise
    finally:
        loaded.close()
    return machine
