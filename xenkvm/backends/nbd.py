"""An NBD client (the NBD protocol's fixed newstyle handshake and simple replies) for image formats.

A vbd whose image is not raw (qcow2, vhd, vmdk, ...) is served by Debian's
``qemu-storage-daemon`` exporting it over NBD on a private UNIX socket
(imagedisk.py); this module is the VMM's side of that socket:

* ``NbdClient.connect``: the fixed newstyle handshake with ``NBD_OPT_GO`` (no
  structured replies: every reply is the 16-byte simple reply), giving the
  export's size and transmission flags (read-only, flush, trim,
  write-zeroes);
* ``submit`` queues a request; ``wait``/``drain`` send the queue and receive
  the replies in one call of ``xknbd_batch`` (C, ``_nbd_build.py``, without
  the GIL): a write's payload goes straight from the caller's buffers (guest
  pages) with ``sendmsg``, up to ``MAX_IN_FLIGHT`` requests are in flight,
  replies come in any order and are matched by handle, a read's payload is
  received straight into its buffers.

The wire formats are big-endian and fixed by the protocol (no C struct to
take them from; the request and reply match ``struct nbd_request`` and
``struct nbd_reply`` of linux/nbd.h, 28 and 16 bytes: tests/backends/test_nbd.py).

Everything the server sends is checked: a wrong magic, an unknown handle, a
short read, a closed socket or no answer within ``timeout`` marks the
connection dead (one log line): every request in flight and every later one
fails with ``EIO``, the caller answers them ``BLKIF_RSP_ERROR`` and goes on.
An error the server reports for one request (``EIO``, ``ENOSPC``...) fails that
request only.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from ._nbd_cffi import ffi, lib

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943          #: "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          #: "IHAVEOPT": newstyle negotiation, and the option magic
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
MAX_IN_FLIGHT = 16      #: QEMU's NBD server reads at most 16 requests ahead (MAX_NBD_REQUESTS): past that,
#: a client that only sends while the server waits to send replies would deadlock the socket
MAX_OPTION_REPLY = 65536   #: longer option replies are garbage (ours carry an export name or a short message)
DEFAULT_TIMEOUT = 60.0     #: seconds without progress before the daemon is taken for dead
MAX_LENGTH = 0xFFFFFFFF    #: a request's length is a 32-bit field on the wire (and in struct xknbd_req)
MAX_OFFSET = (1 << 64) - 1  #: its offset a 64-bit one

_HELLO = struct.Struct(">QQH")         # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")        # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")    # magic, command flags, type, handle, offset, length
_REPLY = struct.Struct(">IIQ")         # magic, error, handle
_EXPORT_INFO = struct.Struct(">HQH")   # NBD_INFO_EXPORT, size, transmission flags


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class Option(enum.IntEnum):
    ABORT = 2
    GO = 7


class OptionReply(enum.IntEnum):
    ACK = 1
    INFO = 3
    ERR_UNKNOWN = (1 << 31) | 6     #: no such export


class Info(enum.IntEnum):
    EXPORT = 0


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1
    READ_ONLY = 2
    SEND_FLUSH = 4
    SEND_FUA = 8
    ROTATIONAL = 16
    SEND_TRIM = 32
    SEND_WRITE_ZEROES = 64


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


class NbdError(Exception):
    """The handshake failed, or the server broke the protocol (one line)."""


@dataclass
class _Request:
    handle: int
    command: Command
    offset: int
    length: int
    flags: int
    buffers: list = field(default_factory=list)   #: memoryviews (a write's payload, a read's destination)


def _batch_error(rc: int, err: int, timeout: float) -> str:
    """xknbd_batch's failure in words."""
    if rc == lib.XKNBD_E_IO:
        return os.strerror(err)
    return {lib.XKNBD_E_EOF: "the server closed the connection", lib.XKNBD_E_MAGIC: "a reply with a wrong magic",
            lib.XKNBD_E_HANDLE: "a reply to no request in flight",
            lib.XKNBD_E_TIMEOUT: f"no reply within {timeout:g}s"}.get(rc, f"error {rc}")


class NbdClient:
    """One NBD connection (a connected stream socket) to one export; not thread-safe (one worker serves it)."""

    def __init__(self, sock: socket.socket, name: str = "", timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.name = name or "nbd"            #: for log lines
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.dead: str | None = None          #: why the connection was given up
        self._timeout = timeout
        self._next = 1
        self._queue: list[_Request] = []       #: submitted, not sent yet (consecutive handles)
        self.results: dict[int, int] = {}      #: handle -> 0 or an errno, until the caller pops it

    # -- negotiation ---------------------------------------------------------------------
    def handshake(self, export: str) -> None:
        """Fixed newstyle negotiation and NBD_OPT_GO for ``export``; NbdError (one line) if refused or garbled."""
        self.sock.settimeout(self._timeout)
        try:
            magic, opt, hflags = _HELLO.unpack(self._recv_exact(_HELLO.size))
            if magic != NBDMAGIC or opt != IHAVEOPT:
                raise NbdError(f"not an NBD newstyle server (magic {magic:#x} {opt:#x})")
            if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
                raise NbdError("the server does not speak the fixed newstyle handshake")
            cflags = HandshakeFlag.FIXED_NEWSTYLE | (hflags & HandshakeFlag.NO_ZEROES)
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            self.sock.sendall(struct.pack(">I", cflags) + _OPTION.pack(IHAVEOPT, Option.GO, len(data)) + data)
            self._go_replies()
        except (OSError, struct.error) as e:
            raise NbdError(f"handshake: {getattr(e, 'strerror', None) or e}") from None

    def _go_replies(self) -> None:
        info = None
        while True:
            magic, opt, kind, length = _OPTION_REPLY.unpack(self._recv_exact(_OPTION_REPLY.size))
            if magic != OPT_REPLY_MAGIC or opt != Option.GO or length > MAX_OPTION_REPLY:
                raise NbdError(f"garbled option reply (magic {magic:#x}, option {opt}, length {length})")
            data = self._recv_exact(length)
            if kind & (1 << 31):
                text = data.decode(errors="replace")[:200] or f"error {kind & 0x7FFFFFFF}"
                raise NbdError(f"export refused: {text}")
            if kind == OptionReply.INFO and len(data) >= 2 and struct.unpack(">H", data[:2])[0] == Info.EXPORT:
                if len(data) != _EXPORT_INFO.size:
                    raise NbdError(f"NBD_INFO_EXPORT of {len(data)} bytes")
                _, size, flags = _EXPORT_INFO.unpack(data)
                info = (size, flags)
            elif kind == OptionReply.ACK:
                if info is None:
                    raise NbdError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                self.size, self.flags = info[0], TransmissionFlag(info[1] & 0xFFFF)
                return
            elif kind != OptionReply.INFO:
                raise NbdError(f"unexpected option reply type {kind}")

    # -- transmission --------------------------------------------------------------------
    def submit(self, command: Command, offset: int, length: int, buffers: list | None = None,
               flags: int = 0) -> int:
        """Queue one request; its handle.  A write sends ``buffers`` (memoryviews whose lengths add up to
        ``length``), a read is received into them; the client releases them once answered.  The queue
        goes out with the next ``wait``/``drain``.  Never raises: on a dead connection the request fails
        (``results[handle] = EIO``); one the wire cannot carry (a length or offset past its field) fails
        alone with ``EINVAL`` and is never sent."""
        handle = self._next
        self._next += 1
        if self.dead is not None:
            self._fail(handle, buffers)
        elif not (0 <= length <= MAX_LENGTH and 0 <= offset <= MAX_OFFSET):
            log.warning("%s: request of %d bytes at %d refused: past the NBD fields", self.name, length, offset)
            self._fail(handle, buffers, errno.EINVAL)
        else:
            self._queue.append(_Request(handle, command, offset, length, flags, buffers or []))
        return handle

    def wait(self, handle: int) -> int:
        """Send what is queued and receive the replies until ``handle`` is answered; its result (0 or
        an errno), popped."""
        if handle not in self.results:
            if not any(r.handle == handle for r in self._queue):
                raise KeyError(handle)
            self._run()
        return self.results.pop(handle)

    def drain(self) -> None:
        """Send what is queued and receive every reply (results stay in ``results``)."""
        if self._queue:
            self._run()

    def close(self) -> None:
        """NBD_CMD_DISC (after every reply) and close the socket."""
        self.drain()
        if self.dead is None:
            try:
                self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0))
            except OSError:
                pass
        self.dead = self.dead or "closed"
        self.sock.close()

    # -- internals -----------------------------------------------------------------------
    def _run(self) -> None:
        """The queued requests through ``xknbd_batch`` (C, without the GIL): at most MAX_IN_FLIGHT in
        flight, payloads straight from/to the buffers.  The C requests are built before the queue is
        taken, and a request whose buffers cffi refuses fails alone (EINVAL): none is ever lost."""
        queue = self._queue
        reqs = ffi.new("struct xknbd_req[]", len(queue))
        keep: list = []          # the cffi buffers behind the iovecs, released after the call
        sent: list[_Request] = []
        try:
            for req in queue:
                try:
                    self._build(req, reqs[len(sent)], keep)
                except (TypeError, ValueError, BufferError, OverflowError) as e:
                    log.warning("%s: request %d refused: %s", self.name, req.handle, e)
                    self._fail(req.handle, req.buffers, errno.EINVAL)
                    continue
                sent.append(req)
            self._queue = []
            rc = 0
            if sent:
                err = ffi.new("int *")
                rc = lib.xknbd_batch(self.sock.fileno(), reqs, len(sent), sent[0].handle, MAX_IN_FLIGHT,
                                     int(self._timeout * 1000), err)
        finally:
            for p in keep:
                ffi.release(p)
        for req, c in zip(sent, reqs):
            if c.error != lib.XKNBD_PENDING:
                self.results[req.handle] = c.error
                self._release(req.buffers)
        if rc:
            self._die(_batch_error(rc, err[0], self._timeout), sent)

    @staticmethod
    def _build(req: _Request, c, keep: list) -> None:
        """Fill the C request ``c`` from ``req``; the cffi buffers it points into go to ``keep``."""
        c.type, c.flags, c.offset, c.length = req.command, req.flags, req.offset, req.length
        c.iov, c.niov = ffi.NULL, 0
        if req.buffers:
            iov = ffi.new("struct iovec[]", len(req.buffers))
            keep.append(iov)
            for v, b in zip(iov, req.buffers):
                p = ffi.from_buffer(b, require_writable=req.command == Command.READ)
                keep.append(p)
                v.iov_base, v.iov_len = p, len(b)
            c.iov, c.niov = iov, len(req.buffers)

    def _die(self, why: str, queue: list[_Request] = ()) -> None:
        """Give the connection up: one log line; the requests not answered fail with EIO."""
        if self.dead is None:
            self.dead = why
            log.error("%s: NBD connection lost (%s); its requests fail from now on", self.name, why)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for req in queue:
            if req.handle not in self.results:
                self._fail(req.handle, req.buffers)

    def _recv_into(self, bufs: list) -> None:
        """recvmsg_into until ``bufs`` are full; EOF is an error (the server closed mid-reply)."""
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        try:
            while views:
                got = self.sock.recvmsg_into(views)[0]
                if got == 0:
                    raise NbdError("the server closed the connection")
                while views and got >= len(views[0]):
                    got -= len(views[0])
                    views.pop(0).release()
                if views and got:
                    views[0] = views[0][got:]
        finally:
            for v in views:
                v.release()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into([buf])
        return bytes(buf)

    def _fail(self, handle: int, buffers: list | None, error: int = errno.EIO) -> None:
        self.results[handle] = error
        self._release(buffers or [])

    @staticmethod
    def _release(buffers: list) -> None:
        for b in buffers:
            if isinstance(b, memoryview):
                b.release()
