"""Initial per-domain tree, laid out and permissioned as libxl does.

A guest owns its writable subdirectories (``data``, ``device``, ``control/...``)
and can only read the rest of its home; dom0 owns everything else.  The VMM
calls :func:`create_domain_home` before starting the guest, then adds device
front/back-end nodes with :meth:`Xenstored.write_path`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .dispatch import Xenstored
from .paths import domain_path
from .perms import READ, Perm, Perms

# libxl__domain_make: directories the guest may only read, and nodes it owns.
GUEST_READONLY = ("device", "control", "memory")
GUEST_WRITABLE = ("data", "drivers", "feature", "attr", "error",
                  "control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                  "control/feature-suspend", "control/sysrq",
                  "control/platform-feature-multiprocessor-suspend",
                  "control/platform-feature-xs_reset_watches",
                  "device/suspend/event-channel")


def read_only(domid: int) -> Perms:
    """Owned by dom0, readable by the guest (libxl ``roperm``)."""
    return (Perm(0, 0), Perm(READ, domid))


def read_write(domid: int) -> Perms:
    """Owned by the guest, hidden from other domains (libxl ``rwperm``)."""
    return (Perm(0, domid),)


def create_domain_home(core: Xenstored, domid: int, name: str, *,
                       values: Mapping[str, str | bytes] | None = None) -> str:
    """Create ``/local/domain/<domid>`` with libxl's basic layout; returns its path.

    ``values`` adds read-only entries relative to the home (e.g.
    ``{"memory/target": "524288", "store/port": "1"}``).
    """
    home = domain_path(domid)
    core.write_path(home, "", read_only(domid))
    core.write_path(f"{home}/domid", str(domid), read_only(domid))
    core.write_path(f"{home}/name", name, read_only(domid))
    for sub in GUEST_READONLY:
        core.write_path(f"{home}/{sub}", "", read_only(domid))
    for sub in GUEST_WRITABLE:
        core.write_path(f"{home}/{sub}", "", read_write(domid))
    for rel, value in (values or {}).items():
        core.write_path(f"{home}/{rel}", value, read_only(domid))
    return home
