"""The shared xenstored's introduce socket: VMMs hand it their domains' rings.

One :class:`IntroduceServer` runs on the daemon's selector loop beside the
xenstore socket (``xenkvm xenstored --introduce PATH``).  Each VMM keeps one
connection per domain (the protocol is in :mod:`.introduce`); the daemon maps
the ring page from the memfd, reads the kick eventfd on its loop and writes
the notify eventfd when replies or watch events are in the ring.

When a domain goes (a ``release`` request, or the connection closing because
the VMM exited or was killed) the daemon does what libxl does on destroy and
what C xenstored does when the domain dies: it removes ``/local/domain/<id>``,
``/vm/<uuid>`` and the domain's backend directories, then releases the domain
(its connection, the nodes it owns, ``@releaseDomain``).  Only then is its
domid free for the next introduction.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import socket
import struct
from dataclasses import dataclass

from . import domstate
from . import introduce as wire
from .layout import DomainInfo, write_tree, initial_tree
from .protocol import RING_PAGE_SIZE, XenstoreError
from .ring import RingConnection
from .server import XenstoreServer

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(4 * (wire.FDS + 1))
_UCRED = struct.Struct("iII")


@dataclass(eq=False)
class DomainLink:
    """One VMM connection on the introduce socket and, once introduced, its domain."""

    sock: socket.socket
    domid: int | None = None
    uuid: str = ""
    info: DomainInfo | None = None
    ring: RingConnection | None = None
    page: mmap.mmap | None = None
    kick: int = -1
    notify: int = -1

    def signal_guest(self) -> None:
        """RingConnection's notify: wake the VMM, which raises the event channel."""
        try:
            os.eventfd_write(self.notify, 1)
        except OSError:
            pass        # counter saturated (the VMM is not reading) or closed

    def peer_gone(self) -> bool:
        """Whether the VMM closed its end (EOF pending, not yet seen by the loop)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


class IntroduceServer:
    """Accepts VMM connections on ``path`` and serves their requests on ``server``'s loop."""

    def __init__(self, server: XenstoreServer, path: str) -> None:
        self.server = server
        self.path = path
        self._listener: socket.socket | None = None
        self._links: dict[int, DomainLink] = {}       # by socket fd
        self._by_domid: dict[int, DomainLink] = {}

    def listen(self) -> None:
        """Bind 0600 under a temporary name, then rename into place once listening."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".intro{os.getpid()}")
        for stale in (tmp, self.path):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, self.path)
        sock.setblocking(False)
        self._listener = sock
        self.server.register(sock, self._on_accept)
        log.info("introduce socket %s", self.path)

    def close(self) -> None:
        """Release every domain and close the sockets (the loop is stopped or stopping)."""
        for link in list(self._links.values()):
            self._close_link(link)
        if self._listener is not None:
            self.server.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    @property
    def domids(self) -> list[int]:
        """Domains introduced over this socket."""
        return sorted(self._by_domid)

    # ------------------------------------------------------------ loop callbacks
    def _on_accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
        if uid not in (0, os.geteuid()):
            log.warning("introduce: refused a connection from uid %d", uid)
            sock.close()
            return
        sock.setblocking(False)
        link = DomainLink(sock)
        self._links[sock.fileno()] = link
        self.server.register(sock, lambda: self._on_message(link))

    def _on_message(self, link: DomainLink) -> None:
        try:
            data, anc, flags, _ = link.sock.recvmsg(wire.MAX_STATE + 1, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc, flags = b"", [], 0
        fds = _fds(anc)
        if not data and not fds:
            self._close_link(link)      # the VMM went away: its domain goes too
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise wire.IntroduceError("message or descriptors truncated (too large)")
            obj = wire.decode(data, wire.MAX_STATE)
            if len(data) > wire.MAX_MESSAGE and obj["op"] != "import":   # only import carries a state
                raise wire.IntroduceError(f"message of {len(data)} bytes (at most {wire.MAX_MESSAGE})")
            reply = self._handle(link, obj, fds)
        except (wire.IntroduceError, domstate.StateError, XenstoreError, OSError, ValueError) as exc:
            log.warning("introduce: refused a request: %s", exc)
            reply = {"ok": False, "error": str(exc)}
        finally:
            for fd in fds:
                if fd not in (link.kick, link.notify):
                    os.close(fd)
        self._reply(link, reply)

    def _reply(self, link: DomainLink, reply: dict) -> None:
        try:
            link.sock.send(wire.encode(reply))
        except OSError as exc:
            log.warning("introduce: cannot answer dom%s's VMM (%s); dropping it", link.domid, exc)
            self._close_link(link)

    # ------------------------------------------------------------ requests
    def _handle(self, link: DomainLink, obj: dict, fds: list[int]) -> dict:
        if obj["op"] == "introduce":
            return self._introduce(link, wire.parse_introduce(obj), fds)
        if obj["op"] == "release":
            if fds:
                raise wire.IntroduceError("release takes no descriptors")
            domid = link.domid
            if domid is None:
                raise wire.IntroduceError("release: no domain introduced on this connection")
            self.release(link)
            return {"ok": True, "domid": domid}
        if obj["op"] in ("export", "resume", "import"):
            if fds:
                raise wire.IntroduceError(f"{obj['op']} takes no descriptors")
            if link.ring is None:
                raise wire.IntroduceError(f"{obj['op']}: no domain introduced on this connection")
            return getattr(self, "_" + obj["op"])(link, obj)
        raise wire.IntroduceError(f"unknown op {obj['op'][:64]!r}")

    # ------------------------------------------------------------ snapshots (xenstore/domstate.py)
    def _export(self, link: DomainLink, obj: dict) -> dict:
        """The domain's nodes, watches and connection state; the ring is held (its page left
        alone) until ``resume``, so what guest RAM holds and what is exported agree."""
        wire.check_keys(obj, ())
        with self.server.core.lock:
            state = domstate.export_domain(link.ring.conn, link.ring, self.server.core)
            reply = {"ok": True, "domid": link.domid, "state": state}
            if len(wire.encode(reply)) > wire.MAX_STATE:
                raise wire.IntroduceError(f"dom{link.domid}'s xenstore state is over {wire.MAX_STATE} bytes")
            link.ring.held = True
        return reply

    def _resume(self, link: DomainLink, obj: dict) -> dict:
        """The ring is the daemon's again: what was queued meanwhile goes out."""
        wire.check_keys(obj, ())
        with self.server.core.lock:
            link.ring.held = False
            link.ring.process()
        return {"ok": True, "domid": link.domid}

    def _import(self, link: DomainLink, obj: dict) -> dict:
        """A restored domain's saved state, loaded into its fresh introduction (once).  The
        ring stays held until ``resume``: the VMM copies the saved ring page in after this."""
        wire.check_keys(obj, ("state",))
        if link.ring.conn.watches or link.ring.conn.out:
            raise wire.IntroduceError(f"import: dom{link.domid}'s connection is in use already")
        with self.server.core.lock:
            domstate.import_domain(self.server.core, link.ring, link.info, obj.get("state"))
            link.ring.held = True
        return {"ok": True, "domid": link.domid}

    def _introduce(self, link: DomainLink, req: wire.Introduce, fds: list[int]) -> dict:
        if link.domid is not None:
            raise wire.IntroduceError(f"this connection already introduced dom{link.domid}")
        wire.check_fds(fds, req.page_offset)
        self._claim(req.domid)
        page = mmap.mmap(fds[0], RING_PAGE_SIZE, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=req.page_offset)
        core = self.server.core
        with core.lock:
            try:
                write_tree(core, initial_tree(req.info))
            except XenstoreError:
                for path in _domain_paths(core, req.domid, req.info.uuid):
                    if path in core.store.nodes:
                        core.rm_path(path)
                page.close()
                raise
            link.kick, link.notify = fds[1], fds[2]
            os.set_blocking(link.kick, False)
            os.set_blocking(link.notify, False)
            link.domid, link.uuid, link.page, link.info = req.domid, req.info.uuid, page, req.info
            link.ring = core.attach_ring(req.domid, page, link.signal_guest, port=req.info.store_port,
                                         gfn=req.info.store_gfn)
        self._by_domid[req.domid] = link
        self.server.register(link.kick, lambda: self._on_kick(link))
        log.info("dom%d (%s) introduced", req.domid, req.info.name)
        return {"ok": True, "domid": req.domid}

    def _claim(self, domid: int) -> None:
        """Refuse a domid still in use; one whose VMM has gone is released first.

        A domain a dom0 client released with XS_RELEASE stays claimed until its
        VMM's connection says so: its release would otherwise remove a newcomer's tree.
        """
        owner = self._by_domid.get(domid)
        if owner is not None and owner.peer_gone():
            self._close_link(owner)
            owner = None
        if owner is not None or self.server.core.domains.get(domid) is not None:
            raise wire.IntroduceError(f"domid {domid} is in use")

    def _on_kick(self, link: DomainLink) -> None:
        try:
            os.eventfd_read(link.kick)
        except OSError:
            pass
        if link.ring is not None:
            link.ring.kick()

    # ------------------------------------------------------------ release
    def release(self, link: DomainLink) -> None:
        """Remove the domain's subtree, release it (``@releaseDomain``), close its descriptors."""
        domid, core = link.domid, self.server.core
        if domid is None or self._by_domid.get(domid) is not link:
            return
        self.server.unregister(link.kick)
        with core.lock:
            for path in _domain_paths(core, domid, link.uuid):
                if path in core.store.nodes:
                    core.rm_path(path)
            core.release_domain(domid)
        del self._by_domid[domid]
        for fd in (link.kick, link.notify):
            os.close(fd)
        link.domid, link.ring, link.kick, link.notify = None, None, -1, -1
        page, link.page = link.page, None
        try:
            page.close()
        except BufferError:
            pass        # a view is still referenced; the mapping goes with it
        log.info("dom%d released", domid)

    def _close_link(self, link: DomainLink) -> None:
        self.release(link)
        self.server.unregister(link.sock)
        self._links.pop(link.sock.fileno(), None)
        link.sock.close()


def _domain_paths(core, domid: int, uuid: str) -> list[str]:
    """What libxl removes when a domain is destroyed: its home, its /vm, its backends."""
    paths = [f"/local/domain/{domid}", f"/vm/{uuid}"]
    backends = core.store.nodes.get("/local/domain/0/backend")
    for kind in backends.children if backends is not None else ():
        paths.append(f"/local/domain/0/backend/{kind}/{domid}")
    return paths


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of every SCM_RIGHTS message (all of them, so none leaks)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % arr.itemsize])
            fds += list(arr)
    return fds
