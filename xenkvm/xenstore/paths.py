"""Xenstore path syntax: validation, canonicalisation and tree relations.

Rules from ``docs/misc/xenstore.txt`` and C xenstored's ``is_valid_nodename``:
absolute paths start with ``/``, use only ``[A-Za-z0-9-/_@]``, have no ``//``
and no trailing ``/`` (except the root itself).  Relative paths are resolved
under the connection's ``/local/domain/<domid>``.
"""

from __future__ import annotations

import re

from .protocol import ABS_PATH_MAX, REL_PATH_MAX, XenstoreError, XsError

ROOT = "/"
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# "Nodes can have lots of crap" -- but only these characters.
_VALID_CHARS = re.compile(r"[A-Za-z0-9/_@-]*").fullmatch
_LOCAL_DOMAIN = re.compile(r"/local/domain/\d{1,5}/").match


def domain_path(domid: int) -> str:
    """The home of a domain: ``/local/domain/<domid>``."""
    return f"/local/domain/{domid}"


def canonicalize(path: str, base: str) -> str:
    """Resolve a relative path against ``base`` (paths starting ``/`` or ``@`` are absolute)."""
    if path[:1] in ("/", "@"):
        return path
    return f"{base}/{path}"


def is_valid_node(path: str) -> bool:
    """True if ``path`` is a syntactically valid absolute node name."""
    if not path.startswith("/"):
        return False
    # "Cannot end in / (unless it's just /)", "No double //".
    if path.endswith("/") and path != "/":
        return False
    if "//" in path or len(path) > ABS_PATH_MAX:
        return False
    return _VALID_CHARS(path) is not None


def check_node(path: str) -> str:
    """Return ``path`` if valid, else raise EINVAL."""
    if not is_valid_node(path):
        raise XenstoreError(XsError.EINVAL, f"invalid path {path!r}")
    return path


def quota_path_len(path: str) -> int:
    """Length counted against the path-max quota: the part below ``/local/domain/<id>/``."""
    m = _LOCAL_DOMAIN(path)
    return len(path) - (m.end() if m else 0)


def check_special(path: str) -> str:
    """Validate an ``@`` watch path (any name up to REL_PATH_MAX)."""
    if len(path) > REL_PATH_MAX:
        raise XenstoreError(XsError.EINVAL, "special path too long")
    return path


def parent_of(path: str) -> str:
    """Parent of a non-root node."""
    idx = path.rfind("/")
    return path[:idx] if idx > 0 else ROOT


def basename(path: str) -> str:
    """Last component of a non-root node."""
    return path[path.rfind("/") + 1:]


def child_path(parent: str, name: str) -> str:
    """Join a parent path and a child name."""
    return f"/{name}" if parent == ROOT else f"{parent}/{name}"


def ancestors(path: str) -> list[str]:
    """All proper ancestors of ``path``, nearest first, ending with ``/``."""
    out = []
    while path != ROOT:
        path = parent_of(path)
        out.append(path)
    return out


def is_child(path: str, parent: str) -> bool:
    """``path`` is ``parent`` or lies below it (``/`` matches every node)."""
    if parent == ROOT:
        return path.startswith("/")
    return path == parent or path.startswith(parent + "/")
