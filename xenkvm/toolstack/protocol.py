"""The control API's wire format: JSON lines, version 1 (docs/control-api.md).

One request per line, one response line per request, in order::

    {"v": 1, "id": 7, "op": "pause", "args": {}}
    {"v": 1, "id": 7, "ok": true, "result": {"state": "paused"}}
    {"v": 1, "id": 7, "ok": false, "error": {"code": "not-running", "message": "..."}}

A line longer than :data:`MAX_LINE` bytes is refused (``too-large``) and the
connection closed; anything that is not such an object gets ``bad-request``.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Any

VERSION = 1
MAX_LINE = 64 * 1024


class ErrorCode(str, Enum):
    BAD_REQUEST = "bad-request"              #: not JSON, not an object, a field of the wrong type
    TOO_LARGE = "too-large"                  #: a line over MAX_LINE bytes
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_OP = "unknown-op"
    INVALID_ARGUMENT = "invalid-argument"    #: args do not fit the op
    NOT_RUNNING = "not-running"              #: the op needs a running (or paused) guest
    NOT_SUPPORTED = "not-supported"          #: a reserved op, or one this guest cannot do
    PERMISSION_DENIED = "permission-denied"  #: the peer is not the socket's owner
    INTERNAL = "internal"                    #: a VMM bug; the domain keeps running


class ApiError(Exception):
    """An error response: a code from :class:`ErrorCode` and one line of message."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message




def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def ok(req_id: Any, result: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "id": req_id, "ok": True, "result": result})


def error(req_id: Any, code: ErrorCode, message: str) -> bytes:
    return encode({"v": VERSION, "id": req_id, "ok": False, "error": {"code": code.value, "message": message}})


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, op, args) from one request line; ApiError(BAD_REQUEST/UNSUPPORTED_VERSION) otherwise."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(ErrorCode.BAD_REQUEST, "not a JSON object") from None
    if not isinstance(req, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    req_id = req.get("id")
    if not isinstance(req_id, (int, str, type(None))) or isinstance(req_id, bool):
        raise ApiError(ErrorCode.BAD_REQUEST, "id: expected a number or a string")
    if req.get("v") != VERSION:
        raise ApiError(ErrorCode.UNSUPPORTED_VERSION, f"v: this VMM speaks version {VERSION}")
    op, args = req.get("op"), req.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "op: expected a string; args: expected an object")
    return req_id, op, args
