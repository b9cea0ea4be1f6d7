"""The control socket: JSON-line requests from the socket's owner, answered on one selector thread.

Every connection is non-blocking and has its own input buffer, so a client that
sends half a line and hangs, or floods garbage, holds up nobody: it is answered
(``bad-request``, ``too-large``) or dropped, and the domain keeps running.
Only the user who owns the socket may connect: the socket is 0600 in a 0700
folder, and each peer's uid is checked with SO_PEERCRED.  Handlers run on this
thread and must be quick (they set flags, write the store, queue vCPU work).

The ``console`` op turns its connection into a raw byte stream: the guest's
recent output and everything it prints from then on go to the client; the
client's bytes go to the guest's console input.  Closing the connection
detaches.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable

from xenkvm.toolstack.protocol import MAX_LINE, ApiError, ErrorCode, error, ok, parse_request

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_OUTPUT = 1 << 20         #: a console reader further behind than this is dropped
IDLE_TIMEOUT = 60.0          #: a half-sent request older than this closes its connection
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.console = False
        self.closing = False
        self.last_input = time.monotonic()


class ControlServer:
    """Serves ``handlers[op](args) -> result`` on a UNIX socket, on its own thread."""

    def __init__(self, path: str, handlers: dict[str, Handler], *, console_input: Callable[[bytes], None],
                 console_tail: Callable[[], bytes]):
        self.path = path
        self.handlers = handlers
        self.console_input = console_input
        self.console_tail = console_tail
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()          # conns' outbufs, written by console_output too
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread: threading.Thread | None = None
        old = os.umask(0o177)
        try:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, flush what is queued (best effort), remove the socket."""
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for c in list(self.conns.values()):
            self._flush_before_close(c)
            self._drop(c)
        self.sel.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    @staticmethod
    def _flush_before_close(conn: _Conn) -> None:
        """Send what is queued, waiting at most a second: the answer to ``destroy``, and on an
        attached console the guest's last output (its shutdown message is written just before
        the machine stops, often after the control thread's last flush)."""
        if conn.outbuf:
            try:
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.outbuf)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- console fan-out (any thread) ------------------------------------------------------------
    def console_output(self, data: bytes) -> None:
        """Guest console bytes: queued to every attached console connection."""
        with self._lock:
            attached = [c for c in self.conns.values() if c.console and not c.closing]
            for c in attached:
                if len(c.outbuf) > MAX_OUTPUT:
                    c.closing = True       # too far behind: detach it rather than buffer without bound
                else:
                    c.outbuf += data
        if attached:
            self._wake()

    # -- the loop (control thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            for key, mask in self.sel.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    self._service(key.data, mask)
            self._housekeeping()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        with self._lock:
            conns = list(self.conns.values())
        for c in conns:
            if c.inbuf and not c.console and now - c.last_input > IDLE_TIMEOUT:
                c.closing = True
            self._update(c)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.geteuid() or len(self.conns) >= MAX_CLIENTS:
            code = ErrorCode.PERMISSION_DENIED if uid != os.geteuid() else ErrorCode.INTERNAL
            log.warning("control: refused a connection from uid %d (%s)", uid, code.value)
            conn.outbuf += error(None, code, "only the domain's owner may use its control socket"
                                 if uid != os.geteuid() else "too many control connections")
            conn.closing = True
        with self._lock:
            self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self._update(conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and not conn.closing:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop(conn)
                return
            if data:
                conn.last_input = time.monotonic()
                self._received(conn, data)
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        self._update(conn)

    def _received(self, conn: _Conn, data: bytes) -> None:
        if conn.console:
            self.console_input(data)
            return
        conn.inbuf += data
        while not conn.console and not conn.closing:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                if len(conn.inbuf) > MAX_LINE:
                    self._reply(conn, error(None, ErrorCode.TOO_LARGE, f"a request line is at most {MAX_LINE} bytes"))
                    conn.inbuf.clear()
                    conn.closing = True
                return
            line, conn.inbuf = bytes(conn.inbuf[:nl]), conn.inbuf[nl + 1:]
            if len(line) > MAX_LINE:
                self._reply(conn, error(None, ErrorCode.TOO_LARGE, f"a request line is at most {MAX_LINE} bytes"))
                conn.closing = True
                return
            if line.strip():
                self._request(conn, line)
        if conn.console and conn.inbuf:
            rest, conn.inbuf = bytes(conn.inbuf), bytearray()
            self.console_input(rest)

    def _request(self, conn: _Conn, line: bytes) -> None:
        req_id = None
        try:
            req_id, op, args = parse_request(line)
            if op == "console":
                self._reply(conn, ok(req_id, {"escape": "^]"}) + self.console_tail())
                conn.console = True
                return
            handler = self.handlers.get(op)
            if handler is None:
                raise ApiError(ErrorCode.UNKNOWN_OP, f"op: unknown operation {op[:64]!r}")
            self._reply(conn, ok(req_id, handler(args)))
        except ApiError as e:
            self._reply(conn, error(req_id, e.code, e.message))
        except Exception as e:   # a handler bug must not take the domain down
            log.exception("control: %r failed", line[:200])
            self._reply(conn, error(req_id, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def _reply(self, conn: _Conn, data: bytes) -> None:
        with self._lock:
            conn.outbuf += data

    def _flush(self, conn: _Conn) -> None:
        with self._lock:
            if not conn.outbuf:
                return
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                conn.outbuf.clear()
                conn.closing = True
                return
            del conn.outbuf[:sent]

    def _update(self, conn: _Conn) -> None:
        """Watch for writability while output is queued; drop a closing connection once flushed."""
        if conn.sock.fileno() < 0:
            return
        with self._lock:
            pending = bool(conn.outbuf)
        if conn.closing and not pending:
            self._drop(conn)
            return
        events = (0 if conn.closing else selectors.EVENT_READ) | (selectors.EVENT_WRITE if pending else 0)
        try:
            self.sel.modify(conn.sock, events or selectors.EVENT_WRITE, conn)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()
