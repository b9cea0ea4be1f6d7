"""A small client for a domain's control socket (docs/control-api.md), used by the CLI and tests."""
from __future__ import annotations

import itertools
import json
import socket
from typing import Any

from xenkvm.toolstack.protocol import MAX_LINE, VERSION, ApiError, ErrorCode


class ControlClient:
    """``ControlClient(path).call("pause")`` -> the result object, or raises :class:`ApiError`.

    Connecting raises OSError (FileNotFoundError, ConnectionRefusedError) when no
    VMM serves the socket; a VMM that goes away mid-call raises ConnectionError.
    """

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self._buf = bytearray()
        self._ids = itertools.count(1)

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """One response line (without the newline); ConnectionError if the VMM closed the socket."""
        while b"\n" not in self._buf:
            if len(self._buf) > 16 * MAX_LINE:
                raise ConnectionError("response line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the VMM closed the control connection")
            self._buf += chunk
        nl = self._buf.index(b"\n")
        line, self._buf = bytes(self._buf[:nl]), self._buf[nl + 1:]
        return line

    def response(self) -> dict[str, Any]:
        resp = json.loads(self.read_line())
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise ApiError(ErrorCode(err.get("code", "internal")), str(err.get("message", "")))
        return resp.get("result") or {}

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        req_id = next(self._ids)
        self.send_raw(json.dumps({"v": VERSION, "id": req_id, "op": op, "args": args}).encode() + b"\n")
        return self.response()

    def attach_console(self) -> bytes:
        """Switch this connection to the raw console stream; returns bytes already received after
        the reply (the start of the replayed output).  Then read/write ``self.sock`` directly."""
        self.call("console")
        rest, self._buf = bytes(self._buf), bytearray()
        return rest
