"""Transactions with per-node conflict detection (C xenstored since 2017).

A transaction is a private overlay on the committed :class:`Store`.  The first
time it *reads* a node from the store it records that node's generation
(NO_GENERATION if missing).  At commit, "if any recorded generation differs
from the global one ... the reply is EAGAIN"; otherwise the overlay replaces the
committed nodes and the queued watch events fire.  Nodes only written are not
checked, and unrelated changes elsewhere in the tree never cause EAGAIN.
"""

from __future__ import annotations

import logging

from .protocol import XenstoreError, XsError
from .store import NO_GENERATION, Event, Node, Store

log = logging.getLogger(__name__)


class Transaction:
    """One open transaction of one connection; implements the store View protocol."""

    __slots__ = ("id", "store", "overlay", "reads", "owned_delta", "events", "node_limit",
                 "touched")

    def __init__(self, tx_id: int, store: Store, node_limit: int | None) -> None:
        self.id = tx_id
        self.store = store
        self.overlay: dict[str, Node | None] = {}   # None marks a deleted node
        self.reads: dict[str, int] = {}             # path -> generation first seen
        self.owned_delta: dict[int, int] = {}
        self.events: list[Event] = []
        self.node_limit = node_limit                # transaction-nodes quota, None = unlimited
        self.touched = 0                            # distinct nodes read or written

    # -- View protocol ------------------------------------------------------
    def get(self, path: str) -> Node | None:
        """Our own version of ``path`` if we changed it, else the committed one (recorded)."""
        overlay = self.overlay
        if path in overlay:
            return overlay[path]
        node = self.store.nodes.get(path)
        if path not in self.reads:
            self._touch()
            self.reads[path] = node.generation if node is not None else NO_GENERATION
        return node

    def put(self, path: str, node: Node) -> None:
        """Write privately; the node gets a fresh generation again at commit."""
        if path not in self.overlay and path not in self.reads:
            self._touch()
        node.generation = self.store.next_generation()
        self.overlay[path] = node

    def delete(self, path: str) -> None:
        """Delete privately."""
        if path not in self.overlay and path not in self.reads:
            self._touch()
        self.overlay[path] = None

    def owned(self, domid: int) -> int:
        """Committed ownership count plus our own changes."""
        return self.store.owned(domid) + self.owned_delta.get(domid, 0)

    def adjust_owned(self, domid: int, delta: int) -> None:
        """Record an ownership change, applied at commit."""
        self.owned_delta[domid] = self.owned_delta.get(domid, 0) + delta

    # -- commit -------------------------------------------------------------
    def conflicts(self) -> list[str]:
        """Paths read by this transaction that changed in the store since."""
        nodes = self.store.nodes
        out = []
        for path, gen in self.reads.items():
            node = nodes.get(path)
            if (node.generation if node is not None else NO_GENERATION) != gen:
                out.append(path)
        return out

    def commit(self) -> list[Event]:
        """Apply the overlay atomically or raise EAGAIN; return the events to fire."""
        changed = self.conflicts()
        if changed:
            log.debug("tx %d conflicts on %s", self.id, changed[:4])
            raise XenstoreError(XsError.EAGAIN, f"conflict on {changed[0]}")
        store = self.store
        for path, node in self.overlay.items():
            if node is None:
                store.delete(path)
            else:
                store.put(path, node)
        for domid, delta in self.owned_delta.items():
            store.adjust_owned(domid, delta)
        return self.events

    def _touch(self) -> None:
        """Count a newly touched node against the transaction-nodes quota."""
        if self.node_limit is not None and self.touched >= self.node_limit:
            raise XenstoreError(XsError.ENOSPC, "too many nodes in transaction")
        self.touched += 1
