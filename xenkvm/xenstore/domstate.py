"""One domain's part of the shared xenstored, out and back in (snapshots of managed domains).

On Xen the domain's store state is the toolstack's business: a migration
stream carries, for the domain alone, "a record for the nodes relating to the
domain being migrated", its ring connection with "any pending data not yet
written to the connection", and "a WATCH_DATA record for each watch registered
by a connection" (docs/designs/xenstore-migration.md).  The VMM asks the
daemon for that over the introduce socket (``export``) and hands it back to
the restored domain's fresh introduction (``import``).

What is exported, as JSON (:func:`export_domain`):

* ``nodes``: the domain's home subtree, each node relative to
  ``/local/domain/<domid>`` with its value and permissions.  ``/vm/<uuid>`` and
  the backend directories are the toolstack's: the restoring side writes its own.
* ``watches``: (path, token, relative) of every watch on the domain's ring.
* ``partial``: request bytes already taken from the ring but not yet a whole
  message (the ring's indexes in guest RAM say they were consumed).
* ``output``: replies and watch events queued for the ring but not yet in it
  (with :func:`hold`, nothing more reaches the page until guest RAM is saved).

Refused: a domain with an open transaction.  Xen's stream has TRANSACTION_DATA
records for them; xenkvm does not carry transactions, and dropping one would
turn the guest's TRANSACTION_END into a wrong answer, so the snapshot is
refused with one line (the guest ends its transaction; try again).

On import the domain may have a new domid (a copy restored beside the
original: Xen gives a restored domain a new domid too).  Nodes and watch paths
under the old home move to the new one, and permission entries naming the old
domid name the new one.  Then the toolstack's own entries of the initial tree
(the ones with a value: name, domid, vm, store/*, console/*, memory/*, cpu/*)
are written again, so the guest reads its new identity where Xen's toolstack
puts it.  Everything here is validated: the document comes from a VMM.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .connection import Connection
from .layout import DomainInfo, initial_tree, write_tree
from .paths import SPECIAL_PATHS, check_node, domain_path, is_child
from .perms import Perm, PermFlag
from .protocol import HEADER_SIZE, PAYLOAD_MAX, XenstoreError
from .ring import RingConnection
from .watch import Watch

VERSION = 1
MAX_NODES = 2000                    #: twice the default per-domain node quota
MAX_OUTPUT = 64 * 1024              #: queued output carried over (bytes)
MAX_PATH = 3072


class StateError(ValueError):
    """An export that cannot be made, or an import document that is refused."""


def export_domain(conn: Connection, ring: RingConnection, core: Any) -> dict[str, Any]:
    """The domain's nodes, watches and ring connection state (core lock held by the caller)."""
    if conn.transactions:
        raise StateError(f"dom{conn.domid} has {len(conn.transactions)} open xenstore transaction(s), "
                         "which are not saved: try again when it has ended them")
    home = domain_path(conn.domid)
    nodes = [{"path": path[len(home):], "value": base64.b64encode(node.value).decode(),
              "perms": [[int(p.flags), p.domid] for p in node.perms]}
             for path, node in core.store.nodes.items() if path == home or is_child(path, home)]
    return {"version": VERSION, "domid": conn.domid, "nodes": nodes,
            "watches": [[w.path, w.token, w.relative] for w in conn.watches.values()],
            "partial": ring.pending_input().hex(),
            "output": [[frame.hex(), is_event] for frame, is_event in conn.out.frames()]}


def import_domain(core: Any, ring: RingConnection, info: DomainInfo, doc: Any) -> None:
    """Load an :func:`export_domain` document into the freshly introduced ``info.domid``
    (core lock held); StateError if any part is refused (nothing is half-loaded then:
    everything is checked before the first write)."""
    saved, nodes, watches, partial, output = _parse(doc)
    new = info.domid
    move = _mover(saved, new)
    entries = [(move(domain_path(saved) + rel), value, _perms(perms, saved, new))
               for rel, value, perms in nodes]
    watches = [(path if path in SPECIAL_PATHS else move(path), token, relative)
               for path, token, relative in watches]
    for path in [e[0] for e in entries] + [w[0] for w in watches if w[0] not in SPECIAL_PATHS]:
        try:
            check_node(path)            # still valid under the new domid (length)
        except XenstoreError as e:
            raise StateError(f"state: {path[:64]!r} under dom{new}: {e}") from None
    for path, value, perms in entries:
        core.write_path(path, value, perms)
    write_tree(core, [e for e in initial_tree(info) if e.value])   # the toolstack's, for the new domain
    conn = ring.conn
    for path, token, relative in watches:
        if (path, token) not in conn.watches:
            core.watches.add(Watch(conn, path, token, relative))
    for frame, is_event in output:
        if is_event:
            conn.out.push_event(frame, None)
        else:
            conn.out.push_reply(frame)
    ring.feed_input(partial)


def _mover(old: int, new: int):
    """Paths under ``/local/domain/<old>`` moved under ``<new>``; others unchanged."""
    src, dst = domain_path(old), domain_path(new)

    def move(path: str) -> str:
        if path == src or is_child(path, src):
            return dst + path[len(src):]
        return path
    return move


def _perms(perms: tuple[Perm, ...], old: int, new: int) -> tuple[Perm, ...]:
    return tuple(Perm(p.flags, new if p.domid == old else p.domid) for p in perms)


def _parse(doc: Any) -> tuple[int, list, list, bytes, list]:
    """Every field type-, range- and path-checked (StateError names the first bad one)."""
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StateError(f"state: expected an object of version {VERSION}")
    saved = doc.get("domid")
    if isinstance(saved, bool) or not isinstance(saved, int) or not 0 < saved < 0x7FF0:
        raise StateError("state.domid: expected a domain id")
    nodes = _list(doc, "nodes", MAX_NODES)
    parsed_nodes = [_node(n, saved) for n in nodes]
    watches = [_watch(w) for w in _list(doc, "watches", 4096)]
    try:
        partial = bytes.fromhex(_str(doc.get("partial"), "state.partial", 2 * (HEADER_SIZE + PAYLOAD_MAX)))
        output = [(bytes.fromhex(_str(f, "state.output", 2 * MAX_OUTPUT)), ev)
                  for f, ev in _list(doc, "output", 4096) if isinstance(ev, bool)]
    except (TypeError, ValueError) as e:
        raise StateError(f"state.partial/output: {e}") from None
    if len(output) != len(doc["output"]) or sum(len(f) for f, _ in output) > MAX_OUTPUT:
        raise StateError(f"state.output: expected [hex, bool] frames, at most {MAX_OUTPUT} bytes")
    return saved, parsed_nodes, watches, partial, output


def _list(doc: dict, key: str, limit: int) -> list:
    value = doc.get(key)
    if not isinstance(value, list) or len(value) > limit:
        raise StateError(f"state.{key}: expected a list of at most {limit}")
    return value


def _str(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise StateError(f"{what}: expected a string of at most {limit} characters")
    return value


def _node(n: Any, saved: int) -> tuple[str, bytes, tuple[Perm, ...]]:
    if not isinstance(n, dict):
        raise StateError("state.nodes: expected objects")
    rel = _str(n.get("path"), "state.nodes.path", MAX_PATH)
    if rel and not rel.startswith("/"):
        raise StateError(f"state.nodes.path: {rel[:64]!r} is not under the domain's home")
    try:
        check_node(domain_path(saved) + rel)
        value = base64.b64decode(_str(n.get("value"), "state.nodes.value", 4 * PAYLOAD_MAX), validate=True)
    except (XenstoreError, binascii.Error, ValueError) as e:
        raise StateError(f"state.nodes: {rel[:64]!r}: {e}") from None
    if len(value) > PAYLOAD_MAX:
        raise StateError(f"state.nodes: {rel[:64]!r}: a value of {len(value)} bytes (at most {PAYLOAD_MAX})")
    perms = n.get("perms")
    if not isinstance(perms, list) or not 1 <= len(perms) <= 64:
        raise StateError(f"state.nodes: {rel[:64]!r}: expected 1..64 permissions")
    out = []
    for p in perms:
        if not (isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
                and 0 <= p[0] <= int(PermFlag.READ | PermFlag.WRITE) and 0 <= p[1] < 0x10000):
            raise StateError(f"state.nodes: {rel[:64]!r}: bad permission {p!r:.64}")
        out.append(Perm(PermFlag(p[0]), p[1]))
    if out[0].domid not in (0, saved):       # the owner: the toolstack or the domain itself
        raise StateError(f"state.nodes: {rel[:64]!r} is owned by dom{out[0].domid}")
    return rel, value, tuple(out)


def _watch(w: Any) -> tuple[str, str, bool]:
    if not (isinstance(w, list) and len(w) == 3 and isinstance(w[2], bool)):
        raise StateError("state.watches: expected [path, token, relative]")
    path = _str(w[0], "state.watches.path", MAX_PATH)
    token = _str(w[1], "state.watches.token", PAYLOAD_MAX)
    if "\0" in token:
        raise StateError("state.watches.token: NUL")
    if path not in SPECIAL_PATHS:
        try:
            check_node(path)
        except XenstoreError as e:
            raise StateError(f"state.watches.path: {path[:64]!r}: {e}") from None
    return path, token, w[2]
