"""Node permissions: parsing, formatting and the access check.

A node's permission list is ``[owner-entry, entry...]``.  The owner has full
access; the owner entry's letter is the default for every domain without an
entry of its own (``perm_for_conn`` in C xenstored, xenstore.txt "Permissions").
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol

from .protocol import XenstoreError, XsError, c_strtoul0


class PermFlag(enum.IntFlag):
    """``XS_PERM_*`` from xenstore_lib.h."""

    NONE = 0x00
    READ = 0x01
    WRITE = 0x02
    ENOENT_OK = 0x04
    OWNER = 0x08
    IGNORE = 0x10


READ = int(PermFlag.READ)
WRITE = int(PermFlag.WRITE)
OWNER = int(PermFlag.OWNER)
IGNORE = int(PermFlag.IGNORE)
ALL = READ | WRITE | OWNER

_LETTER_TO_FLAGS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_FLAGS_TO_LETTER = {v: k for k, v in _LETTER_TO_FLAGS.items()}


class Perm(NamedTuple):
    """One ``xs_permissions`` entry: access flags and the domain they apply to."""

    flags: int
    domid: int

    def wire(self) -> str:
        """``<letter><domid>``, e.g. ``r5``."""
        return f"{_FLAGS_TO_LETTER[self.flags & (READ | WRITE)]}{self.domid}"


Perms = tuple[Perm, ...]
DEFAULT_PERMS: Perms = (Perm(0, 0),)  # "n0": dom0 owns it, nobody else may look


class Caller(Protocol):
    """What the access check needs to know about a connection."""

    domid: int
    privileged: bool
    target: int | None


def parse_perm(text: str) -> Perm:
    """Parse ``[rwbn]<domid>`` (domid in C ``strtol(.., 0)`` syntax) or raise EINVAL."""
    flags = _LETTER_TO_FLAGS.get(text[:1])
    domid = c_strtoul0(text[1:]) if flags is not None else None
    if domid is None:
        raise XenstoreError(XsError.EINVAL, f"bad permission {text!r}")
    return Perm(flags, domid)


def parse_perms(strings: list[str]) -> Perms:
    """Parse a non-empty permission list."""
    if not strings:
        raise XenstoreError(XsError.EINVAL, "empty permission list")
    return tuple(parse_perm(s) for s in strings)


def format_perms(perms: Perms) -> bytes:
    """Wire form ``r0\\0b5\\0``; entries flagged IGNORE are not reported."""
    return b"".join(p.wire().encode() + b"\0" for p in perms if not p.flags & IGNORE)


def perm_for(caller: Caller, perms: Perms) -> int:
    """Access flags ``caller`` has on a node with ``perms``."""
    # "Owners and tools get it all..."
    if caller.privileged:
        return ALL
    owner = perms[0].domid
    me, target = caller.domid, caller.target
    if owner == me or (target is not None and owner == target):
        return ALL
    for flags, domid in perms[1:]:
        if not flags & IGNORE and (domid == me or (target is not None and domid == target)):
            return flags & ALL
    # The owner entry's letter is the default for everybody else.
    return perms[0].flags & ALL


def without_domain(perms: Perms, domid: int) -> Perms:
    """Drop non-owner entries naming ``domid`` (a released domain)."""
    kept = tuple(p for p in perms[1:] if p.domid != domid)
    return perms[:1] + kept
