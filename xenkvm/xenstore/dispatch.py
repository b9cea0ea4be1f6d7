"""The xenstored core: turns one connection's request into its reply.

:class:`Xenstored` owns the store, watches, domains and connections.  Each
request type has one short handler (the table mirrors C xenstored's
``wire_funcs``); handlers raise :class:`XenstoreError` and the error name goes
back as XS_ERROR while the connection lives on.  Transports (socket, ring) feed
decoded :class:`Message` objects to :meth:`Xenstored.handle` with ``lock`` held
and push out whatever the connections queued.

Past ~400 lines on purpose: one short handler per wire request type, in one table as C
xenstored's ``wire_funcs``, so the whole protocol reads in one place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from . import paths
from .connection import Connection
from .control import run_control
from .domain import Domain, DomainTable
from .paths import canonicalize, check_node, check_special, domain_path
from .perms import OWNER, READ, WRITE, Perms, format_perms, parse_perms, perm_for, without_domain
from .protocol import (PAYLOAD_MAX, Message, XenstoreError, XsError, XsType,
                       c_atoi, count_strings, encode, encode_error, one_arg, split_args)
from .quota import Quotas
from .ring import RingConnection
from .store import Access, Event, Node, Store
from .transaction import Transaction
from .watch import Watch, WatchRegistry

log = logging.getLogger(__name__)

_PRIV = 1    # XS_FLAG_PRIV: privileged connections only (else EACCES)
_NOTID = 2   # XS_FLAG_NOTID: tx_id is ignored
OK = b"OK\0"
_PATH_CACHE_SIZE = 4096

Handler = Callable[[Connection, "Transaction | None", Message], bytes]
# ring_mapper(domid, gfn, port) -> (page, notify) for rings introduced over the wire.
RingMapper = Callable[[int, int, int], tuple[object, Callable[[], None]]]


class Xenstored:
    """The whole daemon state, independent of any transport (and of KVM)."""

    def __init__(self, quotas: Quotas | None = None, store: Store | None = None) -> None:
        self.store = store if store is not None else Store()
        self.quotas = quotas if quotas is not None else Quotas()
        self.watches = WatchRegistry()
        self.domains = DomainTable()
        self.connections: dict[int, Connection] = {}
        self.lock = threading.RLock()
        self.ring_mapper: RingMapper | None = None
        self.on_release: Callable[[int], None] | None = None
        self._dirty: set[Connection] = set()
        self._next_conn_id = 1
        self._deferred: list[Callable[[], None]] = []
        self._path_cache: dict[tuple[str, str], str] = {}   # valid paths only
        self._handlers: dict[int, tuple[Handler, int]] = self._handler_table()

    def _handler_table(self) -> dict[int, tuple[Handler, int]]:
        return {
            XsType.CONTROL: (self._control, _PRIV),
            XsType.DIRECTORY: (self._directory, 0),
            XsType.READ: (self._read, 0),
            XsType.GET_PERMS: (self._get_perms, 0),
            XsType.WATCH: (self._watch, _NOTID),
            XsType.UNWATCH: (self._unwatch, _NOTID),
            XsType.TRANSACTION_START: (self._transaction_start, 0),
            XsType.TRANSACTION_END: (self._transaction_end, 0),
            XsType.INTRODUCE: (self._introduce, _PRIV),
            XsType.RELEASE: (self._release, _PRIV),
            XsType.GET_DOMAIN_PATH: (self._get_domain_path, 0),
            XsType.WRITE: (self._write, 0),
            XsType.MKDIR: (self._mkdir, 0),
            XsType.RM: (self._rm, 0),
            XsType.SET_PERMS: (self._set_perms, 0),
            XsType.IS_DOMAIN_INTRODUCED: (self._is_domain_introduced, _PRIV),
            XsType.RESUME: (self._resume, _PRIV),
            XsType.SET_TARGET: (self._set_target, _PRIV),
            XsType.RESET_WATCHES: (self._reset_watches, 0),
            XsType.DIRECTORY_PART: (self._directory_part, 0),
        }

    # ------------------------------------------------------------ connections
    def connect(self, domid: int = 0, *, kind: str = "socket",
                privileged: bool | None = None) -> Connection:
        """Create a connection; sockets and dom0 are privileged."""
        with self.lock:
            if privileged is None:
                privileged = kind == "socket" or domid == 0
            conn = Connection(self._next_conn_id, domid, privileged, self._dirty, kind)
            self._next_conn_id += 1
            dom = self.domains.get(domid) if kind != "socket" else None
            if dom is not None:
                conn.target = dom.target
            self.connections[conn.id] = conn
            return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget a connection with its watches and transactions."""
        with self.lock:
            self.reset_connection(conn)
            conn.closed = True
            self.connections.pop(conn.id, None)
            self._dirty.discard(conn)

    def reset_connection(self, conn: Connection) -> None:
        """Drop watches, transactions and queued output (reconnect, ring error)."""
        self.watches.remove_conn(conn)
        conn.transactions.clear()
        conn.out.clear()

    # ------------------------------------------------------------ requests
    def handle(self, conn: Connection, msg: Message) -> None:
        """Process one request and queue its reply (and any events) on connections.

        Call with ``lock`` held, then :meth:`flush`.
        """
        entry = self._handlers.get(msg.type)
        try:
            if entry is None:
                raise XenstoreError(XsError.ENOSYS, f"type {msg.type}")
            handler, flags = entry
            if flags & _PRIV and not conn.privileged:
                raise XenstoreError(XsError.EACCES, "privileged operation")
            tx = None if flags & _NOTID else self._lookup_tx(conn, msg.tx_id)
            payload = handler(conn, tx, msg)
            if len(payload) > PAYLOAD_MAX:
                raise XenstoreError(XsError.E2BIG, "reply too long")
            frame = encode(msg.type, msg.req_id, msg.tx_id, payload)
        except XenstoreError as exc:
            log.debug("%r: %s -> %s", conn, _type_name(msg.type), exc)
            frame = encode_error(exc.err, msg.req_id, msg.tx_id)
            self._deferred.clear()
        except Exception:  # a bug must not take the daemon down
            log.exception("%r: %s failed", conn, _type_name(msg.type))
            frame = encode_error(XsError.EIO, msg.req_id, msg.tx_id)
            self._deferred.clear()
        conn.queue_reply(frame)
        while self._deferred:
            self._deferred.pop(0)()

    def flush(self) -> None:
        """Hand every connection with new output to its transport."""
        while self._dirty:
            conn = self._dirty.pop()
            if conn.transport is not None and not conn.closed:
                conn.transport.flush()

    def _lookup_tx(self, conn: Connection, tx_id: int) -> Transaction | None:
        """"An unknown non-zero tx_id gives ENOENT"."""
        if tx_id == 0:
            return None
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XenstoreError(XsError.ENOENT, f"no transaction {tx_id}")
        return tx

    def _access(self, conn: Connection, tx: Transaction | None) -> Access:
        if tx is not None:
            return Access(tx, conn, self.quotas, tx.events)
        return Access(self.store, conn, self.quotas, [])

    def _path(self, conn: Connection, raw: str) -> str:
        """Canonical, validated node path; unprivileged callers also face path-max."""
        cache = self._path_cache
        path = cache.get((raw, conn.base))
        if path is None:
            path = check_node(canonicalize(raw, conn.base))
            if len(cache) >= _PATH_CACHE_SIZE:
                cache.clear()
            cache[(raw, conn.base)] = path
        if not conn.privileged and paths.quota_path_len(path) > self.quotas.path_max:
            raise XenstoreError(XsError.EINVAL, "path too long")
        return path

    def _commit_events(self, acc: Access, tx: Transaction | None) -> None:
        """Outside a transaction, events fire as soon as the operation succeeded."""
        if tx is None:
            self.fire(acc.events)

    def fire(self, events: list[Event]) -> None:
        """Deliver events to watches."""
        for event in events:
            self.watches.fire(event, self.store, self.quotas)

    # ------------------------------------------------------------ node operations
    def _read(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """READ <path>| -> raw value, no trailing NUL."""
        return self._access(conn, tx).read(self._path(conn, one_arg(msg.payload)))

    def _directory(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """DIRECTORY <path>| -> <child>|*"""
        path = self._path(conn, one_arg(msg.payload))
        return self._access(conn, tx).directory(path).child_blob()

    def _directory_part(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """DIRECTORY_PART <path>|<offset>| -> <gencnt>|<child>|* (+ NUL when complete)."""
        if count_strings(msg.payload) != 2:
            raise XenstoreError(XsError.EINVAL, "expected path and offset")
        raw, offset_text = split_args(msg.payload, 2)
        node = self._access(conn, tx).directory(self._path(conn, raw))
        offset = c_atoi(offset_text) & 0xFFFFFFFF
        return _directory_slice(str(node.generation).encode() + b"\0", node.child_blob(), offset)

    def _write(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """WRITE <path>|<value> (value: everything after the first NUL)."""
        nul = msg.payload.find(0)
        if nul < 0:
            raise XenstoreError(XsError.EINVAL, "missing NUL after path")
        path = self._path(conn, msg.payload[:nul].decode("utf-8", "surrogateescape"))
        acc = self._access(conn, tx)
        acc.write(path, msg.payload[nul + 1:])
        self._commit_events(acc, tx)
        return OK

    def _mkdir(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """MKDIR <path>|"""
        acc = self._access(conn, tx)
        acc.mkdir(self._path(conn, one_arg(msg.payload)))
        self._commit_events(acc, tx)
        return OK

    def _rm(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """RM <path>|"""
        acc = self._access(conn, tx)
        acc.rm(self._path(conn, one_arg(msg.payload)))
        self._commit_events(acc, tx)
        return OK

    def _get_perms(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """GET_PERMS <path>| -> <perm>|+ (also on @introduceDomain/@releaseDomain)."""
        raw = one_arg(msg.payload)
        if raw.startswith("@"):
            return format_perms(self._special_perms(conn, raw, READ))
        return format_perms(self._access(conn, tx).get_perms(self._path(conn, raw)))

    def _set_perms(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """SET_PERMS <path>|<perm>|+"""
        num = count_strings(msg.payload) - 1
        if num < 1:
            raise XenstoreError(XsError.EINVAL, "no permissions given")
        if not conn.privileged and num > self.quotas.node_permissions:
            raise XenstoreError(XsError.ENOSPC, "too many permissions")
        args = split_args(msg.payload, num + 1)
        perms = parse_perms(args[1:])
        if args[0].startswith("@"):
            self._special_perms(conn, args[0], WRITE | OWNER)
            self.store.special_perms[args[0]] = perms
            return OK
        acc = self._access(conn, tx)
        acc.set_perms(self._path(conn, args[0]), perms)
        self._commit_events(acc, tx)
        return OK

    def _special_perms(self, conn: Connection, name: str, need: int) -> Perms:
        """Perms of @introduceDomain/@releaseDomain if ``conn`` has ``need`` on them."""
        perms = self.store.special_perms.get(name)
        if perms is None:
            raise XenstoreError(XsError.EINVAL, f"no special node {name}")
        if perm_for(conn, perms) & need != need:
            raise XenstoreError(XsError.EACCES, name)
        return perms

    # ------------------------------------------------------------ watches
    def _watch_args(self, conn: Connection, msg: Message) -> tuple[str, str, bool]:
        """<wpath>|<token>|: canonical path, token, relative flag."""
        if count_strings(msg.payload) != 2:
            raise XenstoreError(XsError.EINVAL, "expected path and token")
        raw, token = split_args(msg.payload, 2)
        if raw.startswith("@"):
            return check_special(raw), token, False
        return self._path(conn, raw), token, not raw.startswith("/")

    def _watch(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """WATCH <wpath>|<token>| -> OK, then one initial event."""
        path, token, relative = self._watch_args(conn, msg)
        if (path, token) in conn.watches:
            raise XenstoreError(XsError.EEXIST, "duplicate watch")
        if not conn.privileged and len(conn.watches) >= self.quotas.watches:
            raise XenstoreError(XsError.E2BIG, "watch quota exceeded")
        watch = Watch(conn, path, token, relative)
        self.watches.add(watch)
        # "When a watch is first set up it is triggered once straight away."
        self._deferred.append(lambda: self._initial_event(watch))
        return OK

    def _initial_event(self, watch: Watch) -> None:
        payload = watch.payload(watch.path)
        if payload is not None:
            watch.conn.queue_event(payload, True, None)

    def _unwatch(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """UNWATCH <wpath>|<token>|: removes exactly that (path, token) pair."""
        path, token, _ = self._watch_args(conn, msg)
        watch = conn.watches.get((path, token))
        if watch is None:
            raise XenstoreError(XsError.ENOENT, "no such watch")
        self.watches.remove(watch)
        return OK

    def _reset_watches(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """RESET_WATCHES: "Reset all watches and transactions of the caller"."""
        self.watches.remove_conn(conn)
        conn.transactions.clear()
        return OK

    # ------------------------------------------------------------ transactions
    def _transaction_start(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """TRANSACTION_START | -> <decimal id>|"""
        one_arg(msg.payload)
        if tx is not None:
            raise XenstoreError(XsError.EBUSY, "nested transaction")
        if not conn.privileged and len(conn.transactions) >= self.quotas.transactions:
            raise XenstoreError(XsError.ENOSPC, "transaction quota exceeded")
        tx_id = self._new_tx_id(conn)
        limit = None if conn.privileged else self.quotas.transaction_nodes
        conn.transactions[tx_id] = Transaction(tx_id, self.store, limit)
        return f"{tx_id}\0".encode()

    @staticmethod
    def _new_tx_id(conn: Connection) -> int:
        """Per-connection ids, skipping 0 and ids still in use."""
        while True:
            tx_id = conn.next_tx_id
            conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
            if tx_id and tx_id not in conn.transactions:
                return tx_id

    def _transaction_end(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """TRANSACTION_END T|F: commit (EAGAIN on conflict) or abort; the tx is gone after."""
        arg = one_arg(msg.payload)
        if arg not in ("T", "F"):
            raise XenstoreError(XsError.EINVAL, "expected T or F")
        if tx is None:
            raise XenstoreError(XsError.ENOENT, "no transaction")
        del conn.transactions[tx.id]
        if arg == "T":
            # "Changes made in transactions cause an event only if and when committed."
            self.fire(tx.commit())
        return OK

    # ------------------------------------------------------------ domains
    def _get_domain_path(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """GET_DOMAIN_PATH <domid>| -> /local/domain/<domid>|"""
        domid = c_atoi(one_arg(msg.payload)) & 0xFFFFFFFF
        return domain_path(domid).encode() + b"\0"

    def _is_domain_introduced(self, conn: Connection, tx: Transaction | None,
                              msg: Message) -> bytes:
        """IS_DOMAIN_INTRODUCED <domid>| -> T| or F|"""
        domid = c_atoi(one_arg(msg.payload))
        return b"T\0" if self.domains.is_introduced(domid) else b"F\0"

    def _introduce(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """INTRODUCE <domid>|<gfn>|<evtchn>|"""
        if count_strings(msg.payload) < 3:
            raise XenstoreError(XsError.EINVAL, "expected domid, gfn, port")
        domid_s, gfn_s, port_s = split_args(msg.payload, 3)
        domid, port = c_atoi(domid_s), c_atoi(port_s)
        if port <= 0 or not 0 <= domid < 0x7FF0:
            raise XenstoreError(XsError.EINVAL, "bad domid or port")
        self.introduce_domain(domid, gfn=c_atoi(gfn_s) & 0xFFFFFFFF, port=port)
        return OK

    def _release(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """RELEASE <domid>|"""
        self.release_domain(self.domains.connected(c_atoi(one_arg(msg.payload))).domid)
        return OK

    def _resume(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """RESUME <domid>|: clear the domain's shutdown flag."""
        self.domains.connected(c_atoi(one_arg(msg.payload))).shutdown = False
        return OK

    def _set_target(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """SET_TARGET <domid>|<tdomid>|: domid gets tdomid's privileges on nodes."""
        if count_strings(msg.payload) < 2:
            raise XenstoreError(XsError.EINVAL, "expected two domids")
        dom_s, target_s = split_args(msg.payload, 2)
        dom = self.domains.connected(c_atoi(dom_s))
        target = self.domains.connected(c_atoi(target_s))
        dom.target = target.domid
        if dom.conn is not None:
            dom.conn.target = target.domid
        return OK

    # ------------------------------------------------------------ control
    def _control(self, conn: Connection, tx: Transaction | None, msg: Message) -> bytes:
        """CONTROL <cmd>|<args>|*: inspection and quota commands."""
        num = count_strings(msg.payload)
        if num < 1:
            raise XenstoreError(XsError.EINVAL, "no command")
        args = split_args(msg.payload, num)
        return run_control(self, args[0], args[1:])

    # ------------------------------------------------------------ public API
    def attach_ring(self, domid: int, page: object, notify: Callable[[], None], *,
                    port: int = 0, gfn: int = 0) -> RingConnection:
        """VMM: connect domain ``domid``'s xenstore ring page (introduces the domain)."""
        with self.lock:
            ring = self._do_introduce(domid, gfn, port, (page, notify))
            assert ring is not None
            return ring

    def introduce_domain(self, domid: int, gfn: int = 0, port: int = 0) -> None:
        """INTRODUCE: mark ``domid`` introduced; fires @introduceDomain the first time.

        If a ``ring_mapper`` is installed, the domain's ring is mapped and
        attached (as C xenstored maps the grant on INTRODUCE).
        """
        with self.lock:
            self._do_introduce(domid, gfn, port, None)

    def _do_introduce(self, domid: int, gfn: int, port: int,
                   ring: tuple[object, Callable[[], None]] | None) -> RingConnection | None:
        dom, new = self.domains.introduce(domid, gfn, port)
        if ring is None and self.ring_mapper is not None and dom.conn is None:
            ring = self.ring_mapper(domid, gfn, port)
        if ring is not None:
            if dom.conn is not None:
                self.disconnect(dom.conn)
            dom.conn = self.connect(domid, kind="ring")
            RingConnection(self, dom.conn, *ring)
            self._restore_watches(dom)
        elif dom.conn is not None and isinstance(dom.conn.transport, RingConnection):
            dom.conn.transport.reset()  # C domain_conn_reset() on re-INTRODUCE
        if new and domid != 0:
            self.fire([Event(paths.INTRODUCE_DOMAIN)])
        self.flush()
        return dom.conn.transport if dom.conn is not None else None  # type: ignore[return-value]

    def _restore_watches(self, dom: Domain) -> None:
        """Re-register watches loaded from a state file once the ring is back."""
        for path, token, relative in dom.saved_watches:
            if (path, token) not in dom.conn.watches:
                self.watches.add(Watch(dom.conn, path, token, relative))
        dom.saved_watches.clear()

    def release_domain(self, domid: int) -> None:
        """RELEASE: drop the domain's connection and the nodes it owns; fire @releaseDomain."""
        with self.lock:
            dom = self.domains.remove(domid)
            if dom is None:
                return
            if dom.conn is not None:
                self.disconnect(dom.conn)
            self._remove_domain_nodes(domid)
            self.fire([Event(paths.RELEASE_DOMAIN)])
            self.flush()
        if self.on_release is not None:
            self.on_release(domid)

    def domain_shutdown(self, domid: int) -> None:
        """VMM hook: a guest shut down or crashed (C ``check_domains``)."""
        with self.lock:
            dom = self.domains.get(domid)
            if dom is not None and not dom.shutdown:
                dom.shutdown = True
                self.fire([Event(paths.RELEASE_DOMAIN)])
                self.flush()

    def _remove_domain_nodes(self, domid: int) -> None:
        """Delete subtrees owned by a dead domain; drop its entries elsewhere.

        Committed nodes are immutable: a stripped permission list is stored
        as a new node with a new generation, so an open transaction that read
        the old node keeps its copy and gets EAGAIN at commit.
        """
        store = self.store
        acc = Access(store, _Privileged(), self.quotas, [])
        for path in sorted(store.nodes, key=len):
            node = store.nodes.get(path)
            if node is None or path == paths.ROOT:
                continue
            if node.perms[0].domid == domid:
                acc.rm(path)
            elif any(p.domid == domid for p in node.perms[1:]):
                store.put(path, Node(node.value, without_domain(node.perms, domid),
                                     node.children))
        self.fire(acc.events)

    def write_path(self, path: str, value: bytes | str = b"", perms: Perms | None = None) -> None:
        """Privileged WRITE (+ SET_PERMS) from the VMM, e.g. to build the initial tree."""
        with self.lock:
            acc = Access(self.store, _Privileged(), self.quotas, [])
            acc.write(check_node(path), value.encode() if isinstance(value, str) else value)
            if perms is not None:
                acc.set_perms(path, perms)
            self.fire(acc.events)
            self.flush()

    def read_path(self, path: str) -> bytes | None:
        """Privileged READ from the VMM; None if missing."""
        with self.lock:
            node = self.store.nodes.get(check_node(path))
            return None if node is None else node.value

    def rm_path(self, path: str) -> None:
        """Privileged RM from the VMM."""
        with self.lock:
            acc = Access(self.store, _Privileged(), self.quotas, [])
            acc.rm(check_node(path))
            self.fire(acc.events)
            self.flush()


class _Privileged:
    """Caller identity for operations the daemon performs itself."""

    domid = 0
    privileged = True
    target = None


def _directory_slice(gen: bytes, blob: bytes, offset: int) -> bytes:
    """DIRECTORY_PART body: whole child names from ``offset`` that fit, with a
    final extra NUL "to indicate the end" when the list is complete."""
    if offset >= len(blob):
        return gen + b"\0"
    maxlen = PAYLOAD_MAX - len(gen) - 1
    end = offset
    while True:
        nul = blob.index(0, end)
        if (nul - offset) >= maxlen:
            break
        end = nul + 1
        if end == len(blob):
            return gen + blob[offset:end] + b"\0"
    return gen + blob[offset:end]


def _type_name(type_: int) -> str:
    try:
        return XsType(type_).name
    except ValueError:
        return str(type_)

