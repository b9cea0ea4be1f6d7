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
from typing import TYPE_CHECKING

from xenkvm.config import ConfigError
from xenkvm.xen.abi import HvmParam
from xenkvm.xenstore import Perm, XenstoreServer, Xenstored, default_socket_path
from xenkvm.xenstore.layout import DomainInfo, initial_tree, vm_uuid, write_tree

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
Perms = tuple[Perm, ...]


class XenstoreSocketBusy(ConfigError):
    """The socket path belongs to a live xenstored (or is not a socket at all)."""


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
            online_vcpus=min(getattr(cfg, "vcpus", len(d.vcpus)), len(d.vcpus)),   # the rest: maxvcpus
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
    def lock(self):
        """The store's lock (XenDomain.snapshot_begin holds it)."""
        return self.core.lock

    def write_path(self, path: str, value: bytes | str = b"") -> None:
        """Privileged write as the domain's toolstack (control operations)."""
        self.core.write_path(path, value)

    def read_path(self, path: str) -> bytes | None:
        """Privileged read; None if missing."""
        return self.core.read_path(path)

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
