"""The store engine: nodes, the committed tree and the tree operations.

Data model (as C xenstored's tdb records): every node has a value (bytes), a
permission list, an ordered child-name list and a generation count.  The
committed tree is a flat ``path -> Node`` dict.  Nodes are never mutated once
stored: every change stores a new node, which :meth:`Store.put` gives a new
generation.  That is what lets a transaction "copy" a node it reads by keeping
a reference, and what makes every change visible to its conflict check.

Every operation runs against a *view* -- the :class:`Store` itself, or a
:class:`~xenkvm.xenstore.transaction.Transaction` overlaying it -- on behalf of
a caller, and appends the watch events it causes to ``Access.events``.  All
checks that can fail run before the first change, so a failed operation
leaves the view untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import paths
from .paths import ROOT, basename, child_path, parent_of
from .perms import DEFAULT_PERMS, OWNER, READ, WRITE, Caller, Perm, Perms, perm_for
from .protocol import XenstoreError, XsError
from .quota import Quotas

NO_GENERATION = -1
# sizeof(struct xs_tdb_record_hdr): u64 generation + 3 x u32, padded to 8.
RECORD_HEADER_SIZE = 24
PERM_RECORD_SIZE = 8


class Node:
    """One xenstore node.  Treat as immutable once stored in a view."""

    __slots__ = ("value", "perms", "children", "generation", "_blob")

    def __init__(self, value: bytes, perms: Perms, children: tuple[str, ...] = (),
                 generation: int = NO_GENERATION) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.generation = generation
        self._blob: bytes | None = None

    def child_blob(self) -> bytes:
        """Children as the DIRECTORY reply: ``name\\0name\\0...`` (cached)."""
        if self._blob is None:
            self._blob = "".join(c + "\0" for c in self.children).encode()
        return self._blob

    def record_size(self) -> int:
        """Size C xenstored would store; compared against the node-size quota."""
        return (RECORD_HEADER_SIZE + PERM_RECORD_SIZE * len(self.perms)
                + len(self.value) + len(self.child_blob()))

    def __repr__(self) -> str:
        return (f"Node(value={self.value!r}, perms={[p.wire() for p in self.perms]}, "
                f"children={self.children}, gen={self.generation})")


@dataclass(slots=True, frozen=True)
class Event:
    """A change that may fire watches.

    ``exact`` events (one per node removed by RM) fire only watches on exactly
    that path; others fire watches on the path and its ancestors.  ``perms``
    are permission lists that no longer exist in the tree (old perms of
    SET_PERMS, perms of removed nodes); a watcher able to read under any of
    them, or under the node's or its parent's current perms, sees the event.
    """

    path: str
    exact: bool = False
    perms: tuple[Perms, ...] = ()


class View(Protocol):
    """What tree operations need from the store or a transaction."""

    def get(self, path: str) -> Node | None: ...
    def put(self, path: str, node: Node) -> None: ...
    def delete(self, path: str) -> None: ...
    def owned(self, domid: int) -> int: ...
    def adjust_owned(self, domid: int, delta: int) -> None: ...


class Store:
    """The committed tree, generation counter, node ownership counts and special-path perms."""

    def __init__(self, populate: bool = True) -> None:
        self.nodes: dict[str, Node] = {}
        self.generation = 0
        self.owned_counts: dict[int, int] = {}
        self.special_perms: dict[str, Perms] = {p: DEFAULT_PERMS for p in paths.SPECIAL_PATHS}
        if populate:
            self._setup_structure()

    def _setup_structure(self) -> None:
        """Initial tree: C xenstored's ``/``, ``/tool``, ``/tool/xenstored`` plus
        ``/local/domain`` (as oxenstored), all ``n0``."""
        self.nodes[ROOT] = Node(b"", DEFAULT_PERMS, (), 0)
        for path in ("/tool/xenstored", "/local/domain"):
            if self.get(path) is None:
                Access(self, _DOM0, Quotas(), []).mkdir(path)

    # -- View protocol ------------------------------------------------------
    def get(self, path: str) -> Node | None:
        """The committed node at ``path``."""
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        """Store ``node``; "every write sets the node's generation to a new global count"."""
        self.generation += 1
        node.generation = self.generation
        self.nodes[path] = node

    def delete(self, path: str) -> None:
        """Remove ``path`` (children are removed by the caller)."""
        self.nodes.pop(path, None)

    def owned(self, domid: int) -> int:
        """Number of nodes owned by ``domid``."""
        return self.owned_counts.get(domid, 0)

    def adjust_owned(self, domid: int, delta: int) -> None:
        """Account created/removed/re-owned nodes."""
        count = self.owned_counts.get(domid, 0) + delta
        if count:
            self.owned_counts[domid] = count
        else:
            self.owned_counts.pop(domid, None)

    def next_generation(self) -> int:
        """Reserve a generation number (transactions use these for their private nodes)."""
        self.generation += 1
        return self.generation

    def recount_owned(self) -> None:
        """Rebuild ownership counts from the tree (after loading state)."""
        self.owned_counts.clear()
        for path, node in self.nodes.items():
            if path != ROOT:
                self.adjust_owned(node.perms[0].domid, 1)

    def check(self) -> list[str]:
        """Consistency check (CONTROL ``check``): every child exists, every node is reachable."""
        problems, seen, stack = [], set(), [ROOT]
        while stack:
            path = stack.pop()
            seen.add(path)
            for name in self.nodes[path].children:
                child = child_path(path, name)
                if child not in self.nodes:
                    problems.append(f"missing child {child}")
                else:
                    stack.append(child)
        problems += [f"orphan {p}" for p in self.nodes if p not in seen]
        return problems


@dataclass(slots=True, frozen=True)
class _Dom0:
    domid: int = 0
    privileged: bool = True
    target: int | None = None


_DOM0 = _Dom0()


@dataclass(slots=True)
class Access:
    """One caller's operations against one view; events go to ``events``."""

    view: View
    caller: Caller
    quotas: Quotas
    events: list[Event] = field(default_factory=list)

    # -- lookup ---------------------------------------------------------------
    def lookup(self, path: str, perm: int) -> Node:
        """The node at ``path`` if the caller has ``perm`` on it (C ``get_node``)."""
        node = self.view.get(path)
        if node is not None:
            if perm_for(self.caller, node.perms) & perm == perm:
                return node
            err = XsError.EACCES
        else:
            err = XsError.ENOENT
        # "Clean up errno if they weren't supposed to know."
        raise XenstoreError(self._errno_from_parents(path, err, perm), path)

    def _errno_from_parents(self, path: str, err: XsError, perm: int) -> XsError:
        """ENOENT only if the nearest existing ancestor grants ``perm``; else EACCES."""
        for anc in paths.ancestors(path):
            node = self.view.get(anc)
            if node is not None:
                return err if perm_for(self.caller, node.perms) & perm else XsError.EACCES
        return XsError.EACCES

    def _lookup_or_none(self, path: str, perm: int) -> Node | None:
        """Like :meth:`lookup` but a creatable missing node gives None."""
        try:
            return self.lookup(path, perm)
        except XenstoreError as exc:
            if exc.err != XsError.ENOENT:
                raise
            return None

    # -- reads ----------------------------------------------------------------
    def read(self, path: str) -> bytes:
        """READ: the raw value."""
        return self.lookup(path, READ).value

    def directory(self, path: str) -> Node:
        """DIRECTORY / DIRECTORY_PART: the node, for its child list and generation."""
        return self.lookup(path, READ)

    def get_perms(self, path: str) -> Perms:
        """GET_PERMS."""
        return self.lookup(path, READ).perms

    # -- writes ---------------------------------------------------------------
    def write(self, path: str, value: bytes) -> None:
        """WRITE: set the value, creating missing parents with empty values."""
        node = self._lookup_or_none(path, WRITE)
        if node is None:
            self._create(path, value)
        else:
            self._put(path, Node(value, node.perms, node.children))
        self.events.append(Event(path))

    def mkdir(self, path: str) -> None:
        """MKDIR: create ``path`` (and parents) unless it exists; existing values stay."""
        if self._lookup_or_none(path, WRITE) is None:
            self._create(path, b"")
            self.events.append(Event(path))

    def rm(self, path: str) -> None:
        """RM: remove ``path`` and its subtree.

        "It is not an error if <path> does not exist, but it _is_ an error if
        <path>'s immediate parent does not exist either."
        """
        try:
            node = self.lookup(path, WRITE)
        except XenstoreError as exc:
            if exc.err == XsError.ENOENT and path != ROOT \
                    and self.view.get(parent_of(path)) is not None:
                return
            raise
        if path == ROOT:
            raise XenstoreError(XsError.EINVAL, "cannot remove /")
        parent_path = parent_of(path)
        parent = self.view.get(parent_path)
        doomed = self._collect_subtree(path, node, parent.perms)
        # Non-exact event first, while the node can still be seen.
        self.events.append(Event(path, perms=(node.perms, parent.perms)))
        for sub_path, sub_node, parent_perms in doomed:
            self.events.append(Event(sub_path, True, (sub_node.perms, parent_perms)))
            self.view.delete(sub_path)
            self.view.adjust_owned(sub_node.perms[0].domid, -1)
        name = basename(path)
        kept = tuple(c for c in parent.children if c != name)
        self.view.put(parent_path, Node(parent.value, parent.perms, kept))

    def set_perms(self, path: str, perms: Perms) -> None:
        """SET_PERMS: needs WRITE and OWNER; only privileged callers may change the owner."""
        node = self.lookup(path, WRITE | OWNER)
        if not self.caller.privileged and perms[0].domid != node.perms[0].domid:
            # "Unprivileged domains may not change the owner."
            raise XenstoreError(XsError.EPERM, "cannot change owner")
        self._put(path, Node(node.value, perms, node.children))
        self.view.adjust_owned(node.perms[0].domid, -1)
        self.view.adjust_owned(perms[0].domid, 1)
        self.events.append(Event(path, perms=(node.perms,)))

    # -- helpers --------------------------------------------------------------
    def _put(self, path: str, node: Node) -> None:
        """Store a node after the node-size quota check (unprivileged callers)."""
        if not self.caller.privileged and node.record_size() >= self.quotas.node_size:
            raise XenstoreError(XsError.ENOSPC, f"node {path} too large")
        self.view.put(path, node)

    def _create(self, path: str, value: bytes) -> None:
        """Create ``path`` and its missing ancestors; they inherit the nearest
        existing ancestor's perms, "except unprivileged domains own what they create"."""
        missing = [path]
        anc_path = parent_of(path)
        anc = self.view.get(anc_path)
        while anc is None:
            missing.append(anc_path)
            anc_path = parent_of(anc_path)
            anc = self.view.get(anc_path)
        perms = anc.perms
        if not self.caller.privileged:
            perms = (Perm(perms[0].flags, self.caller.domid),) + perms[1:]
            if self.view.owned(self.caller.domid) + len(missing) > self.quotas.nodes:
                raise XenstoreError(XsError.ENOSPC, "node quota exceeded")
        # A transaction's copy of the ancestor may still list a child that was
        # removed outside it (the transaction is then doomed to EAGAIN); never
        # list a name twice.
        name = basename(missing[-1])
        kids = anc.children if name in anc.children else anc.children + (name,)
        top = Node(anc.value, anc.perms, kids)
        leaf = Node(value, perms)
        self._check_size(anc_path, top)
        self._check_size(path, leaf)
        self.view.put(anc_path, top)
        for upper, lower in zip(reversed(missing), list(reversed(missing))[1:]):
            self.view.put(upper, Node(b"", perms, (basename(lower),)))
        self.view.put(path, leaf)
        self.view.adjust_owned(perms[0].domid, len(missing))

    def _check_size(self, path: str, node: Node) -> None:
        if not self.caller.privileged and node.record_size() >= self.quotas.node_size:
            raise XenstoreError(XsError.ENOSPC, f"node {path} too large")

    def _collect_subtree(self, path: str, node: Node,
                         parent_perms: Perms) -> list[tuple[str, Node, Perms]]:
        """Nodes under and including ``path`` in C's deletion order (children
        first, in child-list order)."""
        out: list[tuple[str, Node, Perms]] = []
        stack: list[tuple[str, Node, Perms, bool]] = [(path, node, parent_perms, False)]
        while stack:
            p, n, pp, expanded = stack.pop()
            if expanded or not n.children:
                out.append((p, n, pp))
                continue
            stack.append((p, n, pp, True))
            for name in reversed(n.children):
                cp = child_path(p, name)
                child = self.view.get(cp)
                if child is not None:
                    stack.append((cp, child, n.perms, False))
        return out
