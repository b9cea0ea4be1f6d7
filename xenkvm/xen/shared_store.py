"""The guest's xenstore on the host's shared xenstored (``xen.xenstored`` set; ``xenkvm create``).

Instead of embedding a store, the VMM introduces the domain to the shared
daemon (xenkvm/xenstore/introduce.py has the protocol): the special-pages
region that holds the ring is a sealed memfd (:class:`MemfdBacking`), passed
with two eventfds over the introduce socket.  Guest sends on the store port
write the *kick* eventfd; the daemon writes the *notify* eventfd when it has
put replies or watch events in the ring, and the I/O thread raises the port.
The daemon writes the initial tree itself, from the ``info`` we send, so the
domain's home exists exactly while it is introduced.

The VMM is the domain's dom0 toolstack side: its control operations and its
backends use privileged socket connections to the same daemon
(:class:`~xenkvm.xenstore.watchclient.XsWatchClient`).  ``close`` releases the
domain synchronously; a VMM that dies is released by the daemon when the
introduce connection closes.
"""
from __future__ import annotations

import array
import fcntl
import json
import logging
import mmap
import os
import socket
import threading
from typing import TYPE_CHECKING

from xenkvm.config import ConfigError
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.store import StoreService
from xenkvm.xenstore import introduce as wire
from xenkvm.xenstore.watchclient import XsWatchClient

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

INTRODUCE_TIMEOUT = 30.0


class MemfdBacking:
    """``Region.backing`` for pages another process maps: a memfd sealed against resizing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = -1

    def __call__(self, size: int) -> mmap.mmap:
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return mm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def introduce_request(link: socket.socket, obj: dict, fds: list[int], path: str) -> dict:
    """Send one request (with ``fds``) and return the daemon's reply; ConfigError if refused."""
    try:
        link.sendmsg([wire.encode(obj)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds).tobytes())] if fds else [])
        data = link.recv(wire.MAX_STATE)
        reply = json.loads(data) if data else {"ok": False, "error": "the daemon closed the connection"}
    except (OSError, ValueError) as e:
        raise ConfigError(f"shared xenstored {path}: {e}") from None
    if not reply.get("ok"):
        raise ConfigError(f"shared xenstored {path} refused {obj['op']}: {reply.get('error')}")
    return reply


class SharedStoreService:
    """One domain's xenstore, served by the shared daemon (same API as StoreService)."""

    owns_server = False
    core = None                 #: no store in this process
    domain_info = StoreService.domain_info

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self.domid = domain.domid
        self.gfn = domain.params[HvmParam.STORE_PFN]
        self.port = domain.evtchn.alloc_vmm_port(self.on_guest_notify)
        domain.params[HvmParam.STORE_EVTCHN] = self.port
        #: held by XenDomain.snapshot_begin (nothing of the store lives here to hold still)
        self.lock = threading.RLock()
        self._held = False          #: the daemon leaves the ring alone (export_state .. resume)
        self.socket_path = domain.cfg.xenstore_socket
        self.intro_path = domain.cfg.xenstored
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.notify_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._link: socket.socket | None = None
        self.xs: XsWatchClient | None = None
        try:
            self._introduce()
            self.xs = XsWatchClient(self.socket_path)
        except (OSError, ConfigError) as e:
            self.close()
            raise ConfigError(str(e) if isinstance(e, ConfigError) else
                              f"shared xenstored {self.socket_path}: {e.strerror or e}") from None
        log.info("dom%d: introduced to the shared xenstored %s", self.domid, self.intro_path)

    @classmethod
    def attach(cls, domain: "XenDomain") -> "SharedStoreService":
        """Introduce ``domain`` (from ``XenDomain._build_services``, after the console)."""
        return cls(domain)

    def _introduce(self) -> None:
        special = self.domain.special
        backing = special.backing
        if not isinstance(backing, MemfdBacking) or backing.fd < 0:
            raise ConfigError("the shared xenstored needs the special pages in a memfd (xen.xenstored "
                              "must be set before the domain is built)")
        link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._link = link
        link.settimeout(INTRODUCE_TIMEOUT)
        try:
            link.connect(self.intro_path)
        except OSError as e:
            raise ConfigError(f"shared xenstored {self.intro_path}: {e.strerror or e} (is "
                              "`xenkvm xenstored --shared` running?)") from None
        req = {"op": "introduce", "domid": self.domid, "page_offset": (self.gfn << 12) - special.gpa,
               "info": wire.info_doc(self.domain_info())}
        introduce_request(link, req, [backing.fd, self.kick, self.notify_fd], self.intro_path)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Raise the store port when the daemon signals (the I/O thread reads the eventfd); a
        restored domain's ring, complete now, goes back to the daemon."""
        self.domain.io.add_reader(self.notify_fd, self._on_store_notify)
        self.resume()

    def close(self) -> None:
        """Release the domain (its subtree goes, @releaseDomain fires) and drop the connections."""
        if self.xs is not None:
            self.xs.close()
            self.xs = None
        if self._link is not None:
            if self.kick >= 0:
                try:
                    introduce_request(self._link, {"op": "release"}, [], self.intro_path)
                except ConfigError as e:
                    log.warning("dom%d: %s", self.domid, e)
            self._link.close()
            self._link = None
        if self.kick >= 0:
            self.domain.io.remove_reader(self.notify_fd)
            os.close(self.kick)
            os.close(self.notify_fd)
            self.kick = self.notify_fd = -1
        backing = self.domain.special.backing
        if isinstance(backing, MemfdBacking):
            backing.close()     # the region's mapping stays until the machine goes

    # -- events --------------------------------------------------------------------
    def on_guest_notify(self) -> None:
        """The guest sent on the store port (I/O thread): kick the daemon."""
        if self.kick >= 0:
            os.eventfd_write(self.kick, 1)

    def _on_store_notify(self) -> None:
        """The daemon put replies in the ring (I/O thread): raise the port."""
        try:
            os.eventfd_read(self.notify_fd)
        except OSError:
            return
        self.domain.evtchn.notify(self.port)

    # -- snapshots (xenkvm/xenstore/domstate.py) --------------------------------------
    def export_state(self) -> dict:
        """The domain's part of the shared store; the daemon holds the ring (its page, in
        guest RAM, stays as saved) until :meth:`resume`.  SnapshotError if it is refused."""
        try:
            reply = introduce_request(self._link, {"op": "export"}, [], self.intro_path)
        except ConfigError as e:
            raise SnapshotError(f"dom{self.domid}: {e}") from None
        self._held = True
        return reply.get("state")

    def resume(self) -> None:
        """The ring is the daemon's again (end of a snapshot; nothing to do if not held)."""
        if self._held and self._link is not None:
            self._held = False
            try:
                introduce_request(self._link, {"op": "resume"}, [], self.intro_path)
            except ConfigError as e:
                log.error("dom%d: %s", self.domid, e)

    def import_state(self, state: dict) -> None:
        """A restored domain: its saved nodes, watches and connection state, moved to this
        domid by the daemon.  SnapshotError (one line) if the daemon refuses them.  The daemon
        holds the ring until :meth:`start` (the saved ring page is copied in after this)."""
        try:
            introduce_request(self._link, {"op": "import", "state": state}, [], self.intro_path)
        except ConfigError as e:
            raise SnapshotError(f"dom{self.domid}: {e}") from None
        self._held = True

    # -- dom0 side -----------------------------------------------------------------
    def dom0_client(self) -> XsWatchClient:
        """A privileged connection for the backends (their own, closed with them)."""
        return XsWatchClient(self.socket_path)

    def write_path(self, path: str, value: bytes | str = b"") -> None:
        self.xs.write_path(path, value)

    def read_path(self, path: str) -> bytes | None:
        return self.xs.read_path(path)
