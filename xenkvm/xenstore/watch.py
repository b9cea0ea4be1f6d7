"""Watches: registration, matching and event delivery.

"When a <path> is modified ... this generates an event on the changed <path>.
Each occurring event is matched against all the watches currently set up, and
each matching watch results in a WATCH_EVENT message."  Watches are indexed by
path, so matching an event costs one dict lookup per ancestor of its path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .paths import ROOT, parent_of
from .perms import READ, Perms, perm_for
from .protocol import PAYLOAD_MAX, encode_str
from .quota import Quotas
from .store import Event, Store

if TYPE_CHECKING:
    from .connection import Connection


@dataclass(slots=True, eq=False)
class Watch:
    """One (path, token) registration of one connection.

    ``path`` is canonical; if the client gave a relative path, ``relative`` is
    set and event paths are reported relative to the connection's base.
    """

    conn: Connection
    path: str
    token: str
    relative: bool = False

    def event_path(self, path: str) -> str:
        """"Iff <wpath> ... was specified as a relative pathname, the <epath>
        path will also be relative (with the same base)"."""
        if not self.relative:
            return path
        rest = path[len(self.conn.base):]
        return rest[1:] if rest.startswith("/") else rest

    def payload(self, path: str) -> bytes | None:
        """Event payload ``epath\\0token\\0``; None if over-long ("silently dropped")."""
        data = encode_str(self.event_path(path)) + b"\0" + encode_str(self.token) + b"\0"
        return data if len(data) <= PAYLOAD_MAX else None


class WatchRegistry:
    """All watches of all connections, indexed by watched path."""

    def __init__(self) -> None:
        self._by_path: dict[str, list[Watch]] = {}

    def __len__(self) -> int:
        return sum(len(ws) for ws in self._by_path.values())

    def all(self) -> list[Watch]:
        """Every registered watch (for the state file)."""
        return [w for ws in self._by_path.values() for w in ws]

    def add(self, watch: Watch) -> None:
        """Register ``watch`` (the caller checked duplicates and quotas)."""
        self._by_path.setdefault(watch.path, []).append(watch)
        watch.conn.watches[(watch.path, watch.token)] = watch

    def remove(self, watch: Watch) -> None:
        """Unregister one watch."""
        bucket = self._by_path.get(watch.path, [])
        if watch in bucket:
            bucket.remove(watch)
            if not bucket:
                del self._by_path[watch.path]
        watch.conn.watches.pop((watch.path, watch.token), None)

    def remove_conn(self, conn: Connection) -> None:
        """Drop every watch of ``conn`` (RESET_WATCHES, disconnect)."""
        for watch in list(conn.watches.values()):
            self.remove(watch)

    def matching(self, path: str, exact: bool) -> list[Watch]:
        """Watches an event on ``path`` fires: the path itself, and unless
        ``exact`` every ancestor up to ``/`` (special ``@`` paths match exactly)."""
        by_path = self._by_path
        found = list(by_path.get(path, ()))
        if exact or not path.startswith("/"):
            return found
        while path != ROOT:
            path = parent_of(path)
            found += by_path.get(path, ())
        return found

    def fire(self, event: Event, store: Store, quotas: Quotas) -> None:
        """Deliver ``event`` to every matching watch whose connection may see it."""
        watches = self.matching(event.path, event.exact)
        if not watches:
            return
        special = not event.path.startswith("/")
        visible: dict[int, bool] = {}
        candidates: list[Perms] | None = None
        for watch in watches:
            conn = watch.conn
            ok = visible.get(conn.id)
            if ok is None:
                if conn.privileged:
                    ok = True
                elif special:
                    ok = bool(perm_for(conn, store.special_perms[event.path]) & READ)
                else:
                    if candidates is None:
                        candidates = _candidate_perms(event, store)
                    ok = any(perm_for(conn, p) & READ for p in candidates)
                visible[conn.id] = ok
            if ok:
                payload = watch.payload(event.path)
                if payload is not None:
                    conn.queue_event(payload, special,
                                     None if conn.privileged else quotas.watch_events)


def _candidate_perms(event: Event, store: Store) -> list[Perms]:
    """Perms under which a watcher may see ``event``: captured old perms, the
    node's and its parent's current perms (C ``watch_permitted``)."""
    out = list(event.perms)
    node = store.nodes.get(event.path)
    if node is not None:
        out.append(node.perms)
    if event.path != ROOT:
        parent = store.nodes.get(parent_of(event.path))
        if parent is not None:
            out.append(parent.perms)
    return out
