"""UNIX-socket server and the selector loop that also drives guest rings.

One :mod:`selectors` loop owns every socket.  It can run in the caller's
thread (the standalone daemon) or in its own thread (embedded in the VMM:
:meth:`XenstoreServer.start` / :meth:`XenstoreServer.stop`).  All store work
happens under ``core.lock``; other threads reach the loop through a wake-up
pipe (:meth:`XenstoreServer.schedule` for ring kicks, socket output queued by
a VMM-thread write).

Socket clients are privileged like dom0 (C xenstored: "Socket connections have
no domain, so they are always privileged"); framing is identical to the ring.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping

from .connection import Connection
from .dispatch import Xenstored
from .protocol import FrameDecoder, ProtocolError
from .ring import RingConnection

log = logging.getLogger(__name__)

DEFAULT_RUNDIR = "/run/xenstored"
_RECV_SIZE = 65536
_SEND_CHUNK = 1 << 18
#: a ring kick served this late is logged: a guest's bounded wait for its reply may run out
SLOW_KICK_S = 2.0


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """Where libxenstore looks: ``$XENSTORED_PATH``, else
    ``${XENSTORED_RUNDIR:-/run/xenstored}/socket`` (xs_lib.c ``xs_daemon_socket``)."""
    env = os.environ if env is None else env
    if env.get("XENSTORED_PATH"):
        return env["XENSTORED_PATH"]
    return os.path.join(env.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR, "socket")


class SocketTransport:
    """One accepted client socket."""

    def __init__(self, server: XenstoreServer, sock: socket.socket, conn: Connection) -> None:
        self.server = server
        self.sock = sock
        self.conn = conn
        self.decoder = FrameDecoder()
        self.want_write = False
        conn.transport = self

    def flush(self) -> None:
        """Transport API (core lock held): send now on the loop thread, else defer."""
        if self.server.on_loop_thread():
            self.send()
        else:
            self.server.request_flush(self)

    def send(self) -> None:
        """Write queued output without blocking; watch for writability if some is left."""
        out = self.conn.out
        while out:
            data = out.chunk(_SEND_CHUNK)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.debug("%r: send failed: %s", self.conn, exc)
                self.server.close_client(self)
                return
            out.advance(sent)
            if sent < len(data):
                break
        self.server.set_write_interest(self, bool(out))


class XenstoreServer:
    """The xenstored selector loop: UNIX socket clients plus guest rings."""

    def __init__(self, core: Xenstored | None = None, socket_path: str | None = None, *,
                 backlog: int = 128) -> None:
        self.core = core if core is not None else Xenstored()
        self.socket_path = socket_path if socket_path is not None else default_socket_path()
        self._backlog = backlog
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._clients: dict[int, SocketTransport] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._pending_lock = threading.Lock()
        self._pending_flush: set[SocketTransport] = set()
        self._pending_rings: set[RingConnection] = set()
        self._pending_since = 0.0       #: when the oldest pending ring kick came
        self._running = False
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def listen(self) -> None:
        """Create the socket: parent dir, stale socket removed, mode 0600."""
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        # Bind under a temporary name and rename into place once listening, so a
        # client never finds a socket file that refuses connections.
        tmp = os.path.join(os.path.dirname(path), f".xs{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(self._backlog)
        os.rename(tmp, path)
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._on_accept)
        log.info("xenstored listening on %s", path)

    def start(self) -> None:
        """Run the loop in a daemon thread (embedded use)."""
        if self._listener is None and self.socket_path:
            self.listen()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="xenstored", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until :meth:`stop`."""
        if self._listener is None and self.socket_path:
            self.listen()
        self._running = True
        self._loop()

    def request_stop(self) -> None:
        """Ask the loop to return (safe from signal handlers and other threads)."""
        self._running = False
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, close every client and remove the socket."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        self.close()

    def close(self) -> None:
        """Release sockets and the wake-up pipe (loop must not be running)."""
        for transport in list(self._clients.values()):
            self.close_client(transport)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self._wake_r >= 0:
            self._sel.unregister(self._wake_r)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ embedding API
    def add_ring(self, domid: int, page: object, notify: Callable[[], None], *,
                 port: int = 0) -> RingConnection:
        """Attach domain ``domid``'s ring page; see :meth:`Xenstored.attach_ring`."""
        return self.core.attach_ring(domid, page, notify, port=port)

    def register(self, fileobj: object, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fileobj`` is readable
        (the shared daemon's introduce socket and each domain's kick eventfd)."""
        self._sel.register(fileobj, selectors.EVENT_READ, lambda key, mask: callback())

    def unregister(self, fileobj: object) -> None:
        """Stop watching ``fileobj`` (a no-op if it is not registered)."""
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def schedule(self, ring: RingConnection) -> None:
        """Thread-safe, non-blocking kick: process ``ring`` on the loop thread."""
        with self._pending_lock:
            if not self._pending_rings:
                self._pending_since = time.monotonic()
            self._pending_rings.add(ring)
        self._wake()

    def on_loop_thread(self) -> bool:
        """True when called from the selector loop's thread."""
        return threading.get_ident() == self._loop_thread

    def request_flush(self, transport: SocketTransport) -> None:
        """Ask the loop to send ``transport``'s output (from another thread)."""
        with self._pending_lock:
            self._pending_flush.add(transport)
        self._wake()

    # ------------------------------------------------------------ loop
    def _loop(self) -> None:
        self._loop_thread = threading.get_ident()
        try:
            while self._running:
                for key, mask in self._sel.select(timeout=1.0):
                    key.data(key, mask)
        finally:
            self._loop_thread = None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed

    def _on_wake(self, key: selectors.SelectorKey, mask: int) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        with self._pending_lock:
            rings, self._pending_rings = self._pending_rings, set()
            flushes, self._pending_flush = self._pending_flush, set()
            since = self._pending_since
        with self.core.lock:
            if rings and (late := time.monotonic() - since) > SLOW_KICK_S:
                log.warning("xenstore: a guest's requests waited %.1f s for the store "
                            "(held by a snapshot, or a loaded host)", late)
            for ring in rings:
                ring.process()
            for transport in flushes:
                if transport.sock.fileno() >= 0:
                    transport.send()

    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            transport = SocketTransport(self, sock, self.core.connect(kind="socket"))
            self._clients[sock.fileno()] = transport
            self._sel.register(sock, selectors.EVENT_READ, self._on_client)

    def _on_client(self, key: selectors.SelectorKey, mask: int) -> None:
        transport = self._clients.get(key.fd)
        if transport is None:
            return
        if mask & selectors.EVENT_READ:
            self._read_client(transport)
        if mask & selectors.EVENT_WRITE and transport.sock.fileno() >= 0:
            with self.core.lock:
                transport.send()

    def _read_client(self, transport: SocketTransport) -> None:
        try:
            data = transport.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                log.debug("recv failed: %s", exc)
            data = b""
        if not data:
            self.close_client(transport)
            return
        core, conn, decoder = self.core, transport.conn, transport.decoder
        with core.lock:
            decoder.feed(data)
            try:
                while (msg := decoder.next()) is not None:
                    core.handle(conn, msg)
            except ProtocolError as exc:
                log.warning("%r: %s; closing", conn, exc)
                core.flush()
                self.close_client(transport)
                return
            core.flush()

    def set_write_interest(self, transport: SocketTransport, want: bool) -> None:
        """Register/unregister EVENT_WRITE for a client with pending output."""
        if want != transport.want_write and transport.sock.fileno() >= 0:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(transport.sock, events, self._on_client)
            transport.want_write = want

    def close_client(self, transport: SocketTransport) -> None:
        """Drop a client: its watches and transactions go with it."""
        sock = transport.sock
        if sock.fileno() < 0:
            return
        self._clients.pop(sock.fileno(), None)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.core.disconnect(transport.conn)
