"""The nodes a toolstack writes for a new domU: a guest's home in the store.

What libxl creates for a PVH/HVM domU (``libxl__domain_make``,
``libxl__build_post``, ``libxl__device_console_add``), as data:
:func:`initial_tree` is a pure function of :class:`DomainInfo`, and
:func:`write_tree` creates the entries as dom0.  The VMM's store service
(``xenkvm.xen.store``) uses it for every Xen guest; nothing here knows KVM.
"""
from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

from .dispatch import Xenstored
from .perms import Perm, PermFlag

Perms = tuple[Perm, ...]


def read_only(domid: int) -> Perms:
    """libxl ``roperm``: owned by dom0, nobody else by default, the guest may read."""
    return (Perm(PermFlag.NONE, 0), Perm(PermFlag.READ, domid))


def read_write(domid: int) -> Perms:
    """libxl ``rwperm``: owned by the guest (full access), nobody else by default."""
    return (Perm(PermFlag.NONE, domid),)


DOM0_ONLY: Perms = (Perm(PermFlag.NONE, 0),)


@dataclass(frozen=True)
class TreeEntry:
    """One node to create: ``perms`` None means "inherit the parent's" (a plain write)."""

    path: str
    value: str = ""
    perms: Perms | None = None


@dataclass(frozen=True)
class DomainInfo:
    """What the initial tree says about one domU."""

    domid: int
    name: str
    uuid: str
    vcpus: int
    memory_kib: int
    store_port: int
    store_gfn: int
    console_port: int | None = None
    console_gfn: int | None = None
    hvm: bool = False   #: HVM (not PVH): libxl adds feature-s3/s4 and hvmloader/
    #: vCPUs online at boot (xl.cfg ``vcpus``); the rest of the ``vcpus`` created (``maxvcpus``)
    #: start "offline".  None: all of them online.
    online_vcpus: int | None = None


def vm_uuid(name: str, domid: int) -> str:
    """A stable UUID for a guest without one (xl would pick a random one each run)."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"xenkvm:{name}:{domid}"))


def initial_tree(info: DomainInfo) -> list[TreeEntry]:
    """The nodes libxl creates for a domU, parents first.

    ``libxl__domain_make``: the home and ``/vm/<uuid>`` are ``roperm``; ``cpu``,
    ``memory``, ``device`` and ``control`` too; the guest owns ``control/shutdown``,
    ``control/feature-*``, ``control/sysrq``, ``device/suspend/event-channel``,
    ``data``, ``drivers``, ``feature``, ``attr`` and ``error``; the
    ``platform-feature-*`` flags, ``name``, ``vm`` are plain writes (inherit roperm).
    ``libxl__build_post``: ``domid``, ``store/*``, ``cpu/N/availability`` (for every vCPU up
    to ``maxvcpus``: "online" for the first ``vcpus``, then "offline"),
    ``memory/static-max`` and ``memory/target`` (both the RAM size in KiB: the
    guest starts at its target; ``xenkvm mem-set`` moves the target and Linux's
    balloon driver follows it through XENMEM_decrease_reservation/populate_physmap).
    ``libxl__device_console_add``: ``console/port`` and ``console/ring-ref``.
    """
    d = info.domid
    home, vm = f"/local/domain/{d}", f"/vm/{info.uuid}"
    ro, rw = read_only(d), read_write(d)
    entries = [
        TreeEntry("/local/domain/0/name", "Domain-0", DOM0_ONLY),
        TreeEntry("/local/domain/0/domid", "0", DOM0_ONLY),
        TreeEntry(home, "", ro),
        TreeEntry(vm, "", ro),
        TreeEntry(f"{vm}/uuid", info.uuid),
        TreeEntry(f"{vm}/name", info.name),
        TreeEntry(f"{home}/vm", vm),
        TreeEntry(f"{home}/name", info.name),
    ]
    entries += [TreeEntry(f"{home}/{sub}", "", ro) for sub in ("cpu", "memory", "device", "control")]
    if info.hvm:
        entries.append(TreeEntry(f"{home}/hvmloader", "", ro))
    control = ["shutdown", "feature-poweroff", "feature-reboot", "feature-suspend"]
    if info.hvm:
        control += ["feature-s3", "feature-s4"]
    control.append("sysrq")
    entries += [TreeEntry(f"{home}/control/{c}", "", rw) for c in control]
    entries += [TreeEntry(f"{home}/{sub}", "", rw)
                for sub in ("device/suspend/event-channel", "data", "drivers", "feature", "attr", "error")]
    entries += [
        TreeEntry(f"{home}/control/platform-feature-multiprocessor-suspend", "1"),
        TreeEntry(f"{home}/control/platform-feature-xs_reset_watches", "1"),
        TreeEntry(f"{home}/memory/static-max", str(info.memory_kib)),
        TreeEntry(f"{home}/memory/target", str(info.memory_kib)),
        TreeEntry(f"{home}/domid", str(d)),
        TreeEntry(f"{home}/store/port", str(info.store_port)),
        TreeEntry(f"{home}/store/ring-ref", str(info.store_gfn)),
    ]
    online = info.vcpus if info.online_vcpus is None else info.online_vcpus
    entries += [TreeEntry(f"{home}/cpu/{i}/availability", "online" if i < online else "offline")
                for i in range(info.vcpus)]
    if info.console_port is not None:
        entries += [TreeEntry(f"{home}/console/port", str(info.console_port)),
                    TreeEntry(f"{home}/console/ring-ref", str(info.console_gfn))]
    return entries


def write_tree(core: Xenstored, entries: list[TreeEntry]) -> None:
    """Create ``entries`` in ``core`` as dom0 (privileged writes, then SET_PERMS)."""
    for e in entries:
        core.write_path(e.path, e.value, e.perms)
