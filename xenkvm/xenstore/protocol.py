"""Xenstore wire protocol: ABI constants, error table, framing and argument parsing.

Everything here mirrors ``xen/include/public/io/xs_wire.h`` (Xen 4.17) and
``docs/misc/xenstore.txt``.  The same framing (``struct xsd_sockmsg`` + payload)
is used on the UNIX socket and on the guest ring, so both transports share
:class:`FrameDecoder` and :func:`encode`.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass

# struct xsd_sockmsg { uint32 type, req_id, tx_id, len; } in host (x86: little) order.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
# "Violating this is very bad": a longer payload kills the connection.
PAYLOAD_MAX = 4096
# "Violating these just gets you an error back."
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048

# xenstore_domain_interface (one 4 KiB page shared with the guest).
RING_SIZE = 1024
RING_PAGE_SIZE = 4096
SERVER_FEATURE_RECONNECTION = 1
SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1


class RingError(enum.IntEnum):
    """Values of the ring page's ``error`` field (XENSTORE_ERROR_*)."""

    NONE = 0
    COMM = 1
    RINGIDX = 2
    PROTO = 3


class XsType(enum.IntEnum):
    """``enum xsd_sockmsg_type`` of Xen 4.17 (XS_RESTRICT = 20 was removed)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF


XsdSockmsgType = XsType
XS_TYPE_COUNT = 23


class XsError(enum.IntEnum):
    """``xsd_errors[]``: the only errors that may cross the wire, by errno number.

    The wire carries the *name* (``"ENOENT\\0"``); the table order is the ABI's.
    """

    EINVAL = _errno.EINVAL
    EACCES = _errno.EACCES
    EEXIST = _errno.EEXIST
    EISDIR = _errno.EISDIR
    ENOENT = _errno.ENOENT
    ENOMEM = _errno.ENOMEM
    ENOSPC = _errno.ENOSPC
    EIO = _errno.EIO
    ENOTEMPTY = _errno.ENOTEMPTY
    ENOSYS = _errno.ENOSYS
    EROFS = _errno.EROFS
    EBUSY = _errno.EBUSY
    EAGAIN = _errno.EAGAIN
    EISCONN = _errno.EISCONN
    E2BIG = _errno.E2BIG
    EPERM = _errno.EPERM

    @property
    def wire(self) -> bytes:
        """The error payload: name plus NUL."""
        return self.name.encode() + b"\0"


class XenstoreError(Exception):
    """An operation failed with one of the :class:`XsError` codes."""

    def __init__(self, err: XsError, detail: str = "") -> None:
        super().__init__(f"{err.name}{': ' + detail if detail else ''}")
        self.err = err


class ProtocolError(Exception):
    """The peer broke framing (header claims more than PAYLOAD_MAX): drop the connection."""


@dataclass(slots=True)
class Message:
    """One decoded ``xsd_sockmsg`` frame."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Frame ``payload`` with an xsd_sockmsg header."""
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def encode_error(err: XsError, req_id: int, tx_id: int) -> bytes:
    """Frame an XS_ERROR reply carrying the errno name."""
    return encode(XsType.ERROR, req_id, tx_id, err.wire)


class FrameDecoder:
    """Incremental xsd_sockmsg parser for a byte stream.

    ``feed()`` appends bytes; ``next()`` returns a complete :class:`Message` or
    None.  A header whose ``len`` exceeds PAYLOAD_MAX raises ProtocolError
    (C xenstored: "Client tried to feed us ..." then ignore_connection).
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Append raw stream bytes."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    def pending(self) -> bytes:
        """The bytes :meth:`buffered` counts (a snapshot of the connection carries them)."""
        return bytes(self._buf[self._pos:])

    def need(self) -> int:
        """Bytes still missing before the next message is complete (0 = complete)."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return HEADER_SIZE - avail
        length = HEADER.unpack_from(self._buf, self._pos)[3]
        if length > PAYLOAD_MAX:
            raise ProtocolError(f"payload length {length} > {PAYLOAD_MAX}")
        return max(0, HEADER_SIZE + length - avail)

    def next(self) -> Message | None:
        """Pop one complete message, or None if more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        type_, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
        if length > PAYLOAD_MAX:
            raise ProtocolError(f"payload length {length} > {PAYLOAD_MAX}")
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            return None
        payload = bytes(buf[pos + HEADER_SIZE:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 65536:
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return Message(type_, req_id, tx_id, payload)

    def reset(self) -> None:
        """Drop any partial message (ring reconnection)."""
        self._buf.clear()
        self._pos = 0


# ---------------------------------------------------------------- arguments

def count_strings(payload: bytes) -> int:
    """Number of NUL-terminated strings (C ``xs_count_strings``: counts NULs)."""
    return payload.count(0)


def one_arg(payload: bytes) -> str:
    """The payload must be exactly one string with its NUL at the end (C ``onearg``)."""
    if not payload or payload.find(0) != len(payload) - 1:
        raise XenstoreError(XsError.EINVAL, "expected one NUL-terminated argument")
    return decode_str(payload[:-1])


def split_args(payload: bytes, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings; trailing bytes are ignored
    ("<wpath>|<token>|?" allows trailing garbage)."""
    parts = payload.split(b"\0", count)
    if len(parts) <= count:
        raise XenstoreError(XsError.EINVAL, f"expected {count} NUL-terminated strings")
    return [decode_str(p) for p in parts[:count]]


def exact_args(payload: bytes, count: int) -> list[str]:
    """Exactly ``count`` NUL-terminated strings and nothing after them."""
    if not payload or payload[-1] != 0 or payload.count(0) != count:
        raise XenstoreError(XsError.EINVAL, f"expected exactly {count} strings")
    return [decode_str(p) for p in payload[:-1].split(b"\0")]


def decode_str(raw: bytes) -> str:
    """Decode a wire string; paths are ASCII, tokens may be any bytes."""
    return raw.decode("utf-8", "surrogateescape")


def encode_str(text: str) -> bytes:
    """Inverse of :func:`decode_str`."""
    return text.encode("utf-8", "surrogateescape")


def c_atoi(text: str) -> int:
    """C ``atoi``: optional whitespace and sign, leading digits, 0 if none."""
    s = text.lstrip(" \t\n\r\f\v")
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    digits = len(s) - len(s.lstrip("0123456789"))
    value = int(s[:digits]) if digits else 0
    value *= sign
    # int overflow is undefined in C; clamp like glibc's strtol-based atoi.
    return max(-(2**31), min(2**31 - 1, value))


def c_strtoul0(text: str) -> int | None:
    """C ``strtol(s, &end, 0)`` requiring the whole string be consumed.

    Accepts decimal, ``0x`` hex and leading-0 octal; returns None if invalid.
    The result is reduced to 32 bits as the C ``unsigned int`` would be.
    """
    s = text.lstrip(" \t\n\r\f\v")
    if not s:
        return None
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    try:
        if s[:2].lower() == "0x":
            value = int(s[2:], 16) if s[2:] and s[2:].isalnum() else None
        elif s[:1] == "0" and len(s) > 1:
            value = int(s[1:], 8) if s[1:].isdigit() else None
        else:
            value = int(s) if s.isdigit() else None
    except ValueError:
        return None
    if value is None:
        return None
    return (sign * value) & 0xFFFFFFFF
