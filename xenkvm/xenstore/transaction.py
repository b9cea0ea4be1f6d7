"""Transactions with per-node conflict detection (C xenstored since 2017).

A transaction holds its own copy of every node it has accessed, as C
xenstored does: "Read type accesses will copy the node to the transaction
specific data base part, write type accesses go there anyway"
(tools/xenstored/transaction.c, ``access_node``).  So once a transaction has
seen a node -- its value, its children, its perms, or that it does not exist
-- it keeps seeing exactly that until it changes the node itself, whatever
happens to the committed tree meanwhile.  Committed nodes are immutable, so
the "copy" is a reference to the node object: a transaction costs one dict
entry per node it touches, never a copy of the tree.

Nodes not yet accessed are read from the committed tree when first needed
(lazily, as in C).  The generation of every node whose first access was a
read is recorded: "Transaction conflicts are detected by checking the
generation count of all nodes read in the transaction".  If one differs from
the committed node's at commit, the reply is EAGAIN; otherwise the written
nodes replace the committed ones and the queued watch events fire.  Nodes
only written are not checked, and unrelated changes elsewhere in the tree
never cause EAGAIN.
"""

from __future__ import annotations

import logging

from .protocol import XenstoreError, XsError
from .store import NO_GENERATION, Event, Node, Store

log = logging.getLogger(__name__)

_UNSEEN = object()   # get() sentinel: not yet accessed by this transaction


class Transaction:
    """One open transaction of one connection; implements the store View protocol."""

    __slots__ = ("id", "store", "nodes", "written", "reads", "owned_delta", "events",
                 "node_limit")

    def __init__(self, tx_id: int, store: Store, node_limit: int | None) -> None:
        self.id = tx_id
        self.store = store
        # Every node accessed: the committed node as first read, or our own
        # version; None for a node seen missing or deleted by us.
        self.nodes: dict[str, Node | None] = {}
        self.written: dict[str, None] = {}          # paths changed by us, in order
        self.reads: dict[str, int] = {}             # path -> generation first read
        self.owned_delta: dict[int, int] = {}
        self.events: list[Event] = []
        self.node_limit = node_limit                # transaction-nodes quota, None = unlimited

    # -- View protocol ------------------------------------------------------
    def get(self, path: str) -> Node | None:
        """Our copy of ``path``.  "Read type accesses will copy the node to the
        transaction": the first access takes the committed node (or its
        absence) and records its generation for the commit check."""
        node = self.nodes.get(path, _UNSEEN)
        if node is not _UNSEEN:
            return node  # type: ignore[return-value]
        self._touch()
        node = self.store.nodes.get(path)
        self.nodes[path] = node
        self.reads[path] = node.generation if node is not None else NO_GENERATION
        return node

    def put(self, path: str, node: Node) -> None:
        """Write privately; the node gets a fresh generation again at commit."""
        if path not in self.nodes:
            self._touch()
        node.generation = self.store.next_generation()
        self.nodes[path] = node
        self.written[path] = None

    def delete(self, path: str) -> None:
        """Delete privately."""
        if path not in self.nodes:
            self._touch()
        self.nodes[path] = None
        self.written[path] = None

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
        """Apply our changes atomically or raise EAGAIN; return the events to fire."""
        changed = self.conflicts()
        if changed:
            log.debug("tx %d conflicts on %s", self.id, changed[:4])
            raise XenstoreError(XsError.EAGAIN, f"conflict on {changed[0]}")
        store, nodes = self.store, self.nodes
        for path in self.written:
            node = nodes[path]
            if node is None:
                store.delete(path)
            else:
                store.put(path, node)
        for domid, delta in self.owned_delta.items():
            store.adjust_owned(domid, delta)
        return self.events

    def _touch(self) -> None:
        """Count a newly accessed node against the transaction-nodes quota."""
        if self.node_limit is not None and len(self.nodes) >= self.node_limit:
            raise XenstoreError(XsError.ENOSPC, "too many nodes in transaction")
