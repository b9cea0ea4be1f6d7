"""The VMM's own xenstore connection: dom0's view of the embedded store, in process.

Backends talk to the store the way dom0's blkback does through xenbus: a
privileged connection that writes, reads, sets permissions and watches.  Here
the connection is one of the embedded :class:`~xenkvm.xenstore.Xenstored`'s
own (kind ``"vmm"``, domid 0): every request goes through the real dispatcher
(permissions, quotas, watch firing), and replies and WATCH_EVENTs come back
through a transport that decodes the frames.

Watch callbacks run with the store's lock held, on whichever thread made the
change (the xenstored thread for a guest write): they must only hand the event
on (a queue put), never call back into the store or take the domain lock.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from xenkvm.xenstore import XenstoreError, Xenstored, XsError, XsType
from xenkvm.xenstore.ops import XsOps, arg
from xenkvm.xenstore.protocol import HEADER, HEADER_SIZE, Message

log = logging.getLogger(__name__)

WatchFn = Callable[[str, str], None]


class VmmXsClient(XsOps):
    """A privileged (dom0) connection to ``core`` used from VMM threads.

    ``domid``/``privileged`` make an unprivileged guest's connection instead
    (tests stand in for a frontend with it; permissions apply as on a ring).
    """

    def __init__(self, core: Xenstored, domid: int = 0, privileged: bool = True):
        self.core = core
        self.conn = core.connect(domid, kind="vmm", privileged=privileged)
        self.conn.transport = self
        self._watches: dict[str, WatchFn] = {}
        self._reply: tuple[int, bytes] | None = None
        self._next_token = 0

    # -- transport (core lock held) -------------------------------------------------
    def flush(self) -> None:
        """Decode what the store queued for us: the reply, watch events."""
        out = self.conn.out
        while out:
            data = out.chunk(1 << 20)
            out.advance(len(data))
            pos = 0
            while pos + HEADER_SIZE <= len(data):
                type_, _req, _tx, length = HEADER.unpack_from(data, pos)
                body = data[pos + HEADER_SIZE:pos + HEADER_SIZE + length]
                pos += HEADER_SIZE + length
                if type_ == XsType.WATCH_EVENT:
                    self._event(body)
                else:
                    self._reply = (type_, body)

    def _event(self, body: bytes) -> None:
        parts = body.split(b"\0")
        if len(parts) < 2:
            return
        path, token = parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")
        fn = self._watches.get(token)
        if fn is not None:
            fn(path, token)

    # -- requests ----------------------------------------------------------------------
    def call(self, type_: XsType, payload: bytes) -> bytes:
        """One request through the dispatcher; XS_ERROR raises XenstoreError."""
        with self.core.lock:
            self._reply = None
            self.core.handle(self.conn, Message(int(type_), 0, 0, payload))
            self.core.flush()
            reply = self._reply
        if reply is None:
            raise XenstoreError(XsError.EIO, "no reply")
        if reply[0] == XsType.ERROR:
            raise XenstoreError(XsError[reply[1].rstrip(b"\0").decode()])
        return reply[1]

    def watch(self, path: str, fn: WatchFn) -> str:
        """WATCH ``path``; ``fn(path, token)`` runs for the initial event and each change."""
        with self.core.lock:      # one client serves every device's worker
            self._next_token += 1
            token = f"xenkvm-backend-{self._next_token}"
            self._watches[token] = fn
        self.call(XsType.WATCH, arg(path) + arg(token))
        return token

    def unwatch(self, path: str, token: str) -> None:
        """UNWATCH; no more callbacks for ``token``."""
        self._watches.pop(token, None)
        try:
            self.call(XsType.UNWATCH, arg(path) + arg(token))
        except XenstoreError as e:
            log.debug("unwatch %s: %s", path, e)

    def close(self) -> None:
        """Drop the connection and its watches."""
        self._watches.clear()
        self.core.disconnect(self.conn)
