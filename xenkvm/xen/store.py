"""The guest's xenstore: its ring page wired to an embedded xenstored, and the initial tree.

The guest finds the ring in ``HVM_PARAM_STORE_PFN`` (a special page outside
e820 RAM) and its event channel in ``HVM_PARAM_STORE_EVTCHN``.  The page is
attached to a :class:`~xenkvm.xenstore.XenstoreServer` (that is the INTRODUCE:
the domain becomes known and ``@introduceDomain`` fires); guest sends on the
port are handed to the server's selector thread with ``schedule``, replies
come back as a notify on the port, raised from the machine's I/O thread so the
xenstored thread never takes the domain lock (no lock-order inversion with
backends that write the store under it).

Before the ring is attached the store gets what a toolstack (libxl, for a
PVH/HVM domU) writes: :func:`initial_tree`.  The embedded server listens on
``default_socket_path()`` (``$XENSTORED_PATH``, else
``${XENSTORED_RUNDIR:-/run/xenstored}/socket``) so Xen's own tools can inspect
the guest while it runs.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenkvm.config import ConfigError
from xenkvm.xen.abi import HvmParam
from xenkvm.xenstore import Perm, PermFlag, XenstoreServer, Xenstored, default_socket_path

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
Perms = tuple[Perm, ...]


class XenstoreSocketBusy(ConfigError):
    """The socket path belongs to a live xenstored (or is not a socket at all)."""


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


def vm_uuid(name: str, domid: int) -> str:
    """A stable UUID for a guest without one (xl would pick a random one each run)."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"xenkvm:{name}:{domid}"))


def initial_tree(info: DomainInfo) -> list[TreeEntry]:
    """The nodes libxl creates for a domU, parents first (no ``memory/target``).

    ``libxl__domain_make``: the home and ``/vm/<uuid>`` are ``roperm``; ``cpu``,
    ``memory``, ``device`` and ``control`` too; the guest owns ``control/shutdown``,
    ``control/feature-*``, ``control/sysrq``, ``device/suspend/event-channel``,
    ``data``, ``drivers``, ``feature``, ``attr`` and ``error``; the
    ``platform-feature-*`` flags, ``name``, ``vm`` are plain writes (inherit roperm).
    ``libxl__build_post``: ``domid``, ``store/*``, ``cpu/N/availability``,
    ``memory/static-max`` (``memory/target`` is left out: Linux's balloon driver
    would act on it; ``static-max`` alone is only read once a target appears).
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
        TreeEntry(f"{home}/domid", str(d)),
        TreeEntry(f"{home}/store/port", str(info.store_port)),
        TreeEntry(f"{home}/store/ring-ref", str(info.store_gfn)),
    ]
    entries += [TreeEntry(f"{home}/cpu/{i}/availability", "online") for i in range(info.vcpus)]
    if info.console_port is not None:
        entries += [TreeEntry(f"{home}/console/port", str(info.console_port)),
                    TreeEntry(f"{home}/console/ring-ref", str(info.console_gfn))]
    return entries


def write_tree(core: Xenstored, entries: list[TreeEntry]) -> None:
    """Create ``entries`` in ``core`` as dom0 (privileged writes, then SET_PERMS)."""
    for e in entries:
        core.write_path(e.path, e.value, e.perms)


def check_socket_free(path: str) -> None:
    """Raise :class:`XenstoreSocketBusy` if a live server answers on ``path``.

    A stale socket (nobody listening) is fine: ``listen`` replaces it.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return   # nothing there (creating it may still fail: see StoreService.start)
    hint = "set XENSTORED_PATH (or XENSTORED_RUNDIR) to use another socket"
    if not stat.S_ISSOCK(st.st_mode):
        raise XenstoreSocketBusy(f"xenstore socket {path} exists and is not a socket; {hint}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return
        raise XenstoreSocketBusy(f"xenstore socket {path}: {e.strerror}; {hint}") from e
    finally:
        probe.close()
    raise XenstoreSocketBusy(f"xenstore socket {path} is in use by a running xenstored; {hint}")


class StoreService:
    """One domain's xenstore: ring + event channel + (usually) its own embedded server."""

    def __init__(self, domain: "XenDomain", server: XenstoreServer | None = None):
        self.domain = domain
        self.domid = domain.domid
        self.owns_server = server is None
        path = domain.cfg.xenstore_socket or default_socket_path()
        self.server = server if server is not None else XenstoreServer(Xenstored(), path)
        self.core = self.server.core
        self.gfn = domain.params[HvmParam.STORE_PFN]
        self.port = domain.evtchn.alloc_vmm_port(self.on_guest_notify)
        domain.params[HvmParam.STORE_EVTCHN] = self.port
        self._running = False
        self._listening = False
        write_tree(self.core, initial_tree(self.domain_info()))
        page = domain.mem.view(self.gfn << 12, PAGE_SIZE)
        # Attaching the ring is the INTRODUCE (fires @introduceDomain, advertises features).
        self.ring = self.server.add_ring(self.domid, page, self._notify_guest, port=self.port)
        log.debug("dom%d xenstore: gfn %#x, port %d", self.domid, self.gfn, self.port)

    @classmethod
    def attach(cls, domain: "XenDomain", server: XenstoreServer | None = None) -> "StoreService":
        """Create the store for ``domain`` (call from ``XenDomain._build_services``, after the console)."""
        return cls(domain, server)

    def domain_info(self) -> DomainInfo:
        d = self.domain
        cfg = d.machine.cfg
        console = getattr(d, "console", None)
        return DomainInfo(
            domid=self.domid, name=cfg.name, uuid=getattr(cfg, "uuid", None) or vm_uuid(cfg.name, self.domid),
            vcpus=len(d.vcpus), memory_kib=d.mem.ram_size >> 10,
            store_port=self.port, store_gfn=self.gfn,
            console_port=getattr(console, "port", None), console_gfn=getattr(console, "gfn", None))

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the embedded server's thread and socket (before the vCPUs run).

        Raises :class:`XenstoreSocketBusy` (a ConfigError: one line from the CLI)
        when another live server owns the socket.  If the socket cannot be created
        (e.g. no permission on /run/xenstored) the guest's store still works;
        only host tools cannot reach it, which is logged.
        """
        if not self.owns_server:
            self._running = True   # a shared server: its owner runs the loop
            return
        if self._running:
            return
        path = self.server.socket_path
        if path:
            check_socket_free(path)
            try:
                self.server.listen()
                self._listening = True
                log.info("xenstored for dom%d: socket %s (XENSTORED_PATH=%s xenstore-ls)",
                         self.domid, path, path)
            except OSError as e:
                log.warning("xenstore socket %s unavailable (%s): the guest's store works, host tools "
                            "cannot reach it; set XENSTORED_PATH to a writable path", path, e.strerror or e)
                self.server.socket_path = ""
        self.server.start()
        self._running = True

    @property
    def socket_path(self) -> str | None:
        """Where host tools reach this store (None: not listening)."""
        return self.server.socket_path if self._listening else None

    def close(self) -> None:
        """Stop the embedded server and remove its socket."""
        if self.owns_server and self._running:
            self.server.stop()
        elif self.owns_server:
            self.server.close()
        self._running = False
        self._listening = False

    # -- events --------------------------------------------------------------------
    def on_guest_notify(self) -> None:
        """The guest sent on the store port (I/O thread): let xenstored read the ring."""
        if self._running:
            self.server.schedule(self.ring)
        else:
            self.ring.kick()

    def _notify_guest(self) -> None:
        """Replies are in the ring (xenstored thread): raise the port from the I/O thread."""
        self.domain.io.call_soon(lambda: self.domain.evtchn.notify(self.port))
