"""Per-connection state: identity, transactions, watches and the output queue.

A connection is one client: a UNIX-socket peer (privileged, like dom0) or a
domain's ring.  Replies and watch events share one ordered output queue, so an
event raised while a reply is still being written is queued behind it, never
dropped ("Watch events may be interleaved at any point").
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

from .paths import domain_path
from .protocol import HEADER, XsType

if TYPE_CHECKING:
    from .transaction import Transaction
    from .watch import Watch

log = logging.getLogger(__name__)


class Transport(Protocol):
    """How a connection's queued output reaches its peer."""

    def flush(self) -> None:
        """Push queued output (called with the core lock held)."""


class OutQueue:
    """Ordered queue of framed messages with partial-write support.

    Tracks queued replies (for the outstanding-requests quota) and queued
    events (identical pending events are dropped, as C xenstored does).
    """

    __slots__ = ("_items", "_offset", "_pending_events", "replies", "events")

    def __init__(self) -> None:
        self._items: deque[tuple[bytes, bytes | None]] = deque()
        self._offset = 0                 # bytes of the head already sent
        self._pending_events: set[bytes] = set()
        self.replies = 0
        self.events = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def push_reply(self, frame: bytes) -> None:
        """Queue a reply frame."""
        self._items.append((frame, None))
        self.replies += 1

    def push_event(self, frame: bytes, key: bytes | None) -> bool:
        """Queue an event frame; False if an identical one (same ``key``) is pending."""
        if key is not None:
            if key in self._pending_events:
                return False
            self._pending_events.add(key)
        self._items.append((frame, key if key is not None else b""))
        self.events += 1
        return True

    def chunk(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the head of the queue (not consumed)."""
        items, offset = self._items, self._offset
        if not items:
            return b""
        first = items[0][0]
        if len(first) - offset >= limit or len(items) == 1:
            return first[offset:offset + limit]
        parts, size = [first[offset:] if offset else first], len(first) - offset
        for frame, _ in list(items)[1:]:
            if size >= limit:
                break
            parts.append(frame)
            size += len(frame)
        return b"".join(parts)[:limit]

    def advance(self, count: int) -> None:
        """Mark ``count`` bytes from the head as delivered."""
        items = self._items
        count += self._offset
        while items and count >= len(items[0][0]):
            frame, key = items.popleft()
            count -= len(frame)
            if key is None:
                self.replies -= 1
            else:
                self.events -= 1
                self._pending_events.discard(key)
        self._offset = count if items else 0

    def frames(self) -> list[tuple[bytes, bool]]:
        """What is still queued, in order: (frame less its delivered head, is it an event)."""
        out = [(frame, key is not None) for frame, key in self._items]
        if out and self._offset:
            out[0] = (out[0][0][self._offset:], out[0][1])
        return out

    def clear(self) -> None:
        """Drop everything (reconnect / connection error)."""
        self._items.clear()
        self._offset = 0
        self._pending_events.clear()
        self.replies = self.events = 0


class Connection:
    """One client of the store.

    ``privileged`` connections (dom0, sockets) bypass permissions and quotas.
    ``base`` is the implicit path for relative names: ``/local/domain/<domid>``
    ("``/local/domain/0`` for socket connections").
    """

    def __init__(self, conn_id: int, domid: int, privileged: bool, dirty: set,
                 kind: str = "socket") -> None:
        self.id = conn_id
        self.domid = domid
        self.privileged = privileged
        self.target: int | None = None
        self.base = domain_path(domid)
        self.kind = kind
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.watches: dict[tuple[str, str], Watch] = {}
        self.out = OutQueue()
        self.transport: Transport | None = None
        self.closed = False
        self._dirty = dirty
        self._overflowing = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.kind} dom{self.domid}>"

    def queue_reply(self, frame: bytes) -> None:
        """Queue a reply frame for the transport."""
        self.out.push_reply(frame)
        self._dirty.add(self)

    def queue_event(self, payload: bytes, special: bool, limit: int | None) -> None:
        """Queue a WATCH_EVENT (``path\\0token\\0``), req_id = tx_id = 0."""
        if limit is not None and self.out.events >= limit:
            if not self._overflowing:
                log.warning("%r: watch event queue full (%d), dropping events", self, limit)
                self._overflowing = True
            return
        self._overflowing = False
        frame = HEADER.pack(XsType.WATCH_EVENT, 0, 0, len(payload)) + payload
        if self.out.push_event(frame, None if special else payload):
            self._dirty.add(self)
