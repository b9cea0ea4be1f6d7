"""Minimal blocking xenstore client over the UNIX socket (tests, benchmarks, tools).

Like libxenstore it keeps one request in flight and queues WATCH_EVENTs that
arrive interleaved with replies.
"""

from __future__ import annotations

import socket
from collections import deque

from .protocol import (HEADER, HEADER_SIZE, XenstoreError, XsError, XsType, encode,
                       encode_str)
from .server import default_socket_path


class XsClient:
    """One socket connection to a xenstored."""

    def __init__(self, path: str | None = None, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path or default_socket_path())
        self.events: deque[tuple[str, str]] = deque()
        self._buf = bytearray()
        self._req_id = 0

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> XsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ raw protocol
    def send(self, type_: int, payload: bytes, tx_id: int = 0, req_id: int | None = None) -> None:
        """Send one framed request."""
        if req_id is None:
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            req_id = self._req_id
        self.sock.sendall(encode(type_, req_id, tx_id, payload))

    def recv_msg(self) -> tuple[int, int, int, bytes]:
        """Next frame from the daemon: (type, req_id, tx_id, payload)."""
        while True:
            if len(self._buf) >= HEADER_SIZE:
                type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
                if len(self._buf) >= HEADER_SIZE + length:
                    payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
                    del self._buf[:HEADER_SIZE + length]
                    return type_, req_id, tx_id, payload
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstored closed the connection")
            self._buf += data

    def request(self, type_: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        """Send a request and return (reply type, payload); events are queued."""
        self.send(type_, payload, tx_id)
        while True:
            rtype, _req, _tx, data = self.recv_msg()
            if rtype == XsType.WATCH_EVENT:
                self.events.append(_split_event(data))
                continue
            return rtype, data

    def call(self, type_: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Like :meth:`request` but raise XenstoreError on XS_ERROR."""
        rtype, data = self.request(type_, payload, tx_id)
        if rtype == XsType.ERROR:
            raise XenstoreError(XsError[data.rstrip(b"\0").decode()])
        return data

    def wait_event(self) -> tuple[str, str]:
        """Block until a watch event arrives: (path, token)."""
        while not self.events:
            rtype, _req, _tx, data = self.recv_msg()
            if rtype != XsType.WATCH_EVENT:
                raise AssertionError(f"unexpected reply type {rtype}")
            self.events.append(_split_event(data))
        return self.events.popleft()

    # ------------------------------------------------------------ conveniences
    def read(self, path: str, tx: int = 0) -> bytes:
        """READ."""
        return self.call(XsType.READ, _arg(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        """WRITE."""
        value = value.encode() if isinstance(value, str) else value
        self.call(XsType.WRITE, _arg(path) + value, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        """MKDIR."""
        self.call(XsType.MKDIR, _arg(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        """RM."""
        self.call(XsType.RM, _arg(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """DIRECTORY."""
        return _strings(self.call(XsType.DIRECTORY, _arg(path), tx))

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        """GET_PERMS."""
        return _strings(self.call(XsType.GET_PERMS, _arg(path), tx))

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        """SET_PERMS."""
        self.call(XsType.SET_PERMS, _arg(path) + b"".join(_arg(p) for p in perms), tx)

    def watch(self, path: str, token: str) -> None:
        """WATCH (the initial event is queued in ``events``)."""
        self.call(XsType.WATCH, _arg(path) + _arg(token))

    def unwatch(self, path: str, token: str) -> None:
        """UNWATCH."""
        self.call(XsType.UNWATCH, _arg(path) + _arg(token))

    def transaction_start(self) -> int:
        """TRANSACTION_START: the new id."""
        return int(self.call(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """TRANSACTION_END (EAGAIN raises XenstoreError)."""
        self.call(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def control(self, *args: str) -> bytes:
        """CONTROL."""
        return self.call(XsType.CONTROL, b"".join(_arg(a) for a in args))


def _arg(text: str) -> bytes:
    return encode_str(text) + b"\0"


def _strings(data: bytes) -> list[str]:
    return [s.decode("utf-8", "surrogateescape") for s in data.split(b"\0")[:-1]]


def _split_event(data: bytes) -> tuple[str, str]:
    path, token = data.split(b"\0")[:2]
    return path.decode("utf-8", "surrogateescape"), token.decode("utf-8", "surrogateescape")
