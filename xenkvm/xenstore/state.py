"""Durable state: the whole store as a versioned JSON document.

Saved: every node (value, raw permission entries, generation, ordered
children), the global generation count, special-path permissions, quotas and
introduced domains with the watches of their ring connections.  Watches of
socket clients are not saved: the client's socket does not survive the daemon.

Writes are atomic: the document goes to a temporary file in the same
directory, is fsync'ed, then renamed over the target ("a crash mid-save never
leaves a half-written state file").
"""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
from typing import Any

from .dispatch import Xenstored
from .perms import Perm
from .quota import Quotas
from .store import Node, Store

log = logging.getLogger(__name__)

FORMAT = "xenkvm-xenstore-state"
VERSION = 1


class StateError(Exception):
    """The state file is not one we can load."""


def snapshot(core: Xenstored) -> dict[str, Any]:
    """The daemon state as a JSON-serialisable document."""
    with core.lock:
        store = core.store
        return {
            "format": FORMAT,
            "version": VERSION,
            "generation": store.generation,
            "nodes": [_node_doc(path, node) for path, node in store.nodes.items()],
            "special_perms": {k: _perms_doc(v) for k, v in store.special_perms.items()},
            "quotas": core.quotas.as_dict(),
            "domains": [_domain_doc(dom) for dom in core.domains],
        }


def restore(doc: dict[str, Any]) -> Xenstored:
    """Build a daemon core from a :func:`snapshot` document."""
    if doc.get("format") != FORMAT:
        raise StateError("not a xenkvm xenstore state file")
    if doc.get("version") != VERSION:
        raise StateError(f"unsupported state version {doc.get('version')}")
    store = Store(populate=False)
    for item in doc["nodes"]:
        store.nodes[item["path"]] = Node(base64.b64decode(item["value"]),
                                         _perms_from(item["perms"]),
                                         tuple(item["children"]), item["generation"])
    if "/" not in store.nodes:
        raise StateError("state has no root node")
    store.generation = doc["generation"]
    store.special_perms.update({k: _perms_from(v) for k, v in doc["special_perms"].items()})
    store.recount_owned()
    quotas = Quotas()
    for name, value in doc.get("quotas", {}).items():
        quotas.set(name, value)
    core = Xenstored(quotas=quotas, store=store)
    for item in doc.get("domains", []):
        dom, _ = core.domains.introduce(item["domid"], item["gfn"], item["port"])
        dom.shutdown, dom.target = item["shutdown"], item["target"]
        dom.saved_watches = [(w[0], w[1], w[2]) for w in item["watches"]]
    return core


def save(core: Xenstored, path: str) -> None:
    """Atomically write the state of ``core`` to ``path``."""
    data = json.dumps(snapshot(core), separators=(",", ":")).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xenstore-state.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("saved %d nodes to %s", len(core.store.nodes), path)


def load(path: str) -> Xenstored:
    """Read a state file written by :func:`save`."""
    with open(path, "rb") as fh:
        try:
            doc = json.loads(fh.read())
        except ValueError as exc:
            raise StateError(f"{path}: {exc}") from exc
    try:
        core = restore(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"{path}: malformed state ({exc!r})") from exc
    log.info("loaded %d nodes from %s", len(core.store.nodes), path)
    return core


def _node_doc(path: str, node: Node) -> dict[str, Any]:
    return {"path": path, "value": base64.b64encode(node.value).decode(),
            "perms": _perms_doc(node.perms), "generation": node.generation,
            "children": list(node.children)}


def _perms_doc(perms: tuple[Perm, ...]) -> list[list[int]]:
    return [[p.flags, p.domid] for p in perms]


def _perms_from(doc: list[list[int]]) -> tuple[Perm, ...]:
    return tuple(Perm(int(f), int(d)) for f, d in doc)


def _domain_doc(dom: Any) -> dict[str, Any]:
    watches = list(dom.saved_watches)
    if dom.conn is not None:
        watches += [(w.path, w.token, w.relative) for w in dom.conn.watches.values()]
    return {"domid": dom.domid, "gfn": dom.gfn, "port": dom.port, "shutdown": dom.shutdown,
            "target": dom.target, "watches": [list(w) for w in watches]}
