"""A direct (socket-less) xenstore connection for tests: ``from xsdirect import Direct``."""
from __future__ import annotations

from xenkvm.xenstore.protocol import FrameDecoder, Message, XenstoreError, XsError, XsType
from xenkvm.xenstore.dispatch import Xenstored


class Direct:
    """Drives :meth:`Xenstored.handle` for one connection without any transport."""

    def __init__(self, core: Xenstored, domid: int = 0, kind: str = "socket") -> None:
        self.core = core
        self.conn = core.connect(domid, kind=kind)
        self.events: list[tuple[str, str]] = []
        self._req = 0

    def raw(self, type_: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        """One request; returns (reply type, reply payload); events are collected."""
        self._req += 1
        with self.core.lock:
            self.core.handle(self.conn, Message(type_, self._req, tx, payload))
        replies = self.drain()
        assert len(replies) == 1, replies
        return replies[0]

    def drain(self) -> list[tuple[int, bytes]]:
        """Take everything queued on the connection; events go to ``events``."""
        out = self.conn.out
        data = out.chunk(1 << 30)
        out.advance(len(data))
        dec = FrameDecoder()
        dec.feed(data)
        replies = []
        while (msg := dec.next()) is not None:
            if msg.type == XsType.WATCH_EVENT:
                path, token = msg.payload.split(b"\0")[:2]
                self.events.append((path.decode(), token.decode()))
            else:
                replies.append((msg.type, msg.payload))
        return replies

    def call(self, type_: int, payload: bytes, tx: int = 0) -> bytes:
        rtype, data = self.raw(type_, payload, tx)
        if rtype == XsType.ERROR:
            raise XenstoreError(XsError[data.rstrip(b"\0").decode()])
        assert rtype == type_
        return data

    def err(self, type_: int, payload: bytes, tx: int = 0) -> str:
        """Expect an XS_ERROR; return its name."""
        rtype, data = self.raw(type_, payload, tx)
        assert rtype == XsType.ERROR, (rtype, data)
        assert data.endswith(b"\0")
        return data[:-1].decode()

    # conveniences
    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(XsType.READ, path.encode() + b"\0", tx)

    def write(self, path: str, value: bytes | str = b"", tx: int = 0) -> None:
        value = value.encode() if isinstance(value, str) else value
        assert self.call(XsType.WRITE, path.encode() + b"\0" + value, tx) == b"OK\0"

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.call(XsType.MKDIR, path.encode() + b"\0", tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.call(XsType.RM, path.encode() + b"\0", tx)

    def ls(self, path: str, tx: int = 0) -> list[str]:
        data = self.call(XsType.DIRECTORY, path.encode() + b"\0", tx)
        return [s.decode() for s in data.split(b"\0")[:-1]]

    def perms(self, path: str, tx: int = 0) -> list[str]:
        data = self.call(XsType.GET_PERMS, path.encode() + b"\0", tx)
        return [s.decode() for s in data.split(b"\0")[:-1]]

    def chmod(self, path: str, *perms: str, tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        self.call(XsType.SET_PERMS, payload, tx)

    def watch(self, path: str, token: str) -> None:
        self.call(XsType.WATCH, f"{path}\0{token}\0".encode())

    def unwatch(self, path: str, token: str) -> None:
        self.call(XsType.UNWATCH, f"{path}\0{token}\0".encode())

    def start(self) -> int:
        return int(self.call(XsType.TRANSACTION_START, b"\0")[:-1])

    def end(self, tx: int, commit: bool = True) -> None:
        self.call(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def take_events(self) -> list[tuple[str, str]]:
        self.drain()
        events, self.events = self.events, []
        return events
