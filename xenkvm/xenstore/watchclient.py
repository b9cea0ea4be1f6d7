"""A thread-safe dom0 socket connection with watch callbacks: the VMM's link to the shared store.

The VMM's backends and control operations talk to the shared xenstored the
way they talk to an embedded one (``VmmXsClient``): blocking requests from any
thread, watch callbacks for changes.  One reader thread takes every frame off
the socket: a reply wakes the request waiting for its ``req_id``, a
WATCH_EVENT runs its callback on the reader thread.  As with ``VmmXsClient``
a callback must only hand the event on (a queue put), never make a request
(the reader thread would wait for its own reply).
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable

from .ops import XsOps, arg
from .protocol import HEADER, HEADER_SIZE, XenstoreError, XsError, XsType, encode

log = logging.getLogger(__name__)

WatchFn = Callable[[str, str], None]


class XsWatchClient(XsOps):
    """A privileged socket connection to the xenstored at ``path``."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.timeout = timeout
        self._cond = threading.Condition()
        self._replies: dict[int, tuple[int, bytes]] = {}
        self._ids = itertools.count(1)
        self._watches: dict[str, WatchFn] = {}
        self._tokens = itertools.count(1)
        self._send_lock = threading.Lock()
        self.closed = False
        self._reader = threading.Thread(target=self._read_loop, name="xs-client", daemon=True)
        self._reader.start()

    # -- reader thread -----------------------------------------------------------------------
    def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while data := self.sock.recv(65536):
                buf += data
                while len(buf) >= HEADER_SIZE:
                    type_, req_id, _tx, length = HEADER.unpack_from(buf)
                    if len(buf) < HEADER_SIZE + length:
                        break
                    body = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
                    del buf[:HEADER_SIZE + length]
                    self._frame(type_, req_id, body)
        except OSError:
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _frame(self, type_: int, req_id: int, body: bytes) -> None:
        if type_ == XsType.WATCH_EVENT:
            parts = body.split(b"\0")
            if len(parts) >= 2 and (fn := self._watches.get(parts[1].decode("utf-8", "replace"))):
                fn(parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace"))
            return
        with self._cond:
            self._replies[req_id] = (type_, body)
            self._cond.notify_all()

    # -- requests (any thread) -------------------------------------------------------------
    def call(self, type_: XsType, payload: bytes) -> bytes:
        """One request; XS_ERROR raises XenstoreError, a lost store raises EIO."""
        req_id = next(self._ids) & 0xFFFFFFFF
        with self._send_lock:
            try:
                self.sock.sendall(encode(int(type_), req_id, 0, payload))
            except OSError as e:
                raise XenstoreError(XsError.EIO, f"xenstored: {e}") from None
        with self._cond:
            if not self._cond.wait_for(lambda: req_id in self._replies or self.closed, self.timeout):
                raise XenstoreError(XsError.EIO, "xenstored did not answer")
            reply = self._replies.pop(req_id, None)
        if reply is None:
            raise XenstoreError(XsError.EIO, "xenstored closed the connection")
        if reply[0] == XsType.ERROR:
            raise XenstoreError(XsError[reply[1].rstrip(b"\0").decode()])
        return reply[1]

    def watch(self, path: str, fn: WatchFn) -> str:
        """WATCH ``path``; ``fn(path, token)`` runs (reader thread) for the initial event and each change."""
        token = f"xenkvm-vmm-{next(self._tokens)}"
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

    # -- the embedded store's VMM API, for the control operations ---------------------------------
    def write_path(self, path: str, value: bytes | str = b"") -> None:
        """Privileged WRITE."""
        value = value.encode() if isinstance(value, str) else value
        self.call(XsType.WRITE, arg(path) + value)

    def read_path(self, path: str) -> bytes | None:
        """Privileged READ; None if missing."""
        try:
            return self.call(XsType.READ, arg(path))
        except XenstoreError as e:
            if e.err == XsError.ENOENT:
                return None
            raise

    def close(self) -> None:
        """Drop the connection (its watches go with it)."""
        self._watches.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(5)
