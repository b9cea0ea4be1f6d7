"""The introduce protocol: how a VMM hands a domain's ring to the shared xenstored.

On Xen the toolstack calls XS_INTRODUCE(domid, mfn, port) and xenstored maps
the ring page with the hypervisor's help.  Here there is no hypervisor to ask,
so the VMM passes the page itself, over a UNIX ``SOCK_SEQPACKET`` socket with
``SCM_RIGHTS`` (docs/xenstore.md, "Shared xenstored"):

* request: one JSON object (UTF-8, at most :data:`MAX_MESSAGE` bytes);
  ``{"v": 1, "op": "introduce", "domid": N, "page_offset": OFF, "info": {...}}``
  with exactly three descriptors: a sealed memfd holding the ring page at
  ``page_offset``, the *kick* eventfd (guest -> store: the VMM writes it when
  the guest notifies the store's event channel) and the *notify* eventfd
  (store -> guest: xenstored writes it, the VMM raises the event channel).
  ``info`` is what the initial tree says about the domain (layout.DomainInfo).
* ``{"v": 1, "op": "release"}``: the domain of this connection goes away
  (its subtree removed, ``@releaseDomain`` fired), synchronously.
* ``{"v": 1, "op": "export"}``: the domain's part of the store for a snapshot
  (xenstore/domstate.py), in the reply's ``state``; the daemon then leaves the
  ring page alone until ``{"v": 1, "op": "resume"}`` (guest RAM is being saved).
* ``{"v": 1, "op": "import", "state": {...}}``: an exported state loaded into
  the domain just introduced on this connection (a restored snapshot).
  ``export`` replies and ``import`` requests may be up to :data:`MAX_STATE` bytes.
* reply: ``{"v": 1, "ok": true, "domid": N}`` or ``{"v": 1, "ok": false,
  "error": "one line"}``.

The connection lives as long as the domain: when it closes without a
``release`` (the VMM crashed or was killed) the domain is released all the
same.  Everything here is pure validation; the server is :mod:`.hostd`, the
VMM side ``xenkvm.xen.shared_store``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, fields
from typing import Any

from .layout import DomainInfo
from .protocol import RING_PAGE_SIZE

VERSION = 1
MAX_MESSAGE = 8192
MAX_STATE = 160 * 1024      #: an export reply or import request (below the default socket buffer)
FDS = 3                     #: memfd, kick eventfd, notify eventfd
MAX_DOMID = 0x7FEF          #: DOMID_FIRST_RESERVED - 1
_INFO_INT = {"vcpus": 4096, "memory_kib": 1 << 40, "store_port": 1 << 17, "store_gfn": 1 << 40,
             "console_port": 1 << 17, "console_gfn": 1 << 40, "online_vcpus": 4097}
_OPTIONAL = ("console_port", "console_gfn", "online_vcpus")
_INFO_STR = {"name": 256, "uuid": 64}
#: the uuid names /vm/<uuid>: one path element of the characters a uuid has
_UUID = re.compile(r"[0-9A-Za-z-]{1,64}")


class IntroduceError(Exception):
    """A request the shared xenstored refuses (its message goes back in the reply)."""


@dataclass(frozen=True)
class Introduce:
    """A checked ``introduce`` request (the descriptors are checked by :func:`check_fds`)."""

    domid: int
    page_offset: int
    info: DomainInfo


def encode(obj: dict[str, Any]) -> bytes:
    """One message on the wire."""
    return json.dumps({"v": VERSION, **obj}, separators=(",", ":")).encode()


def decode(data: bytes, limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """A message's JSON object; IntroduceError for anything else."""
    if len(data) > limit:
        raise IntroduceError(f"message of {len(data)} bytes (at most {limit})")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntroduceError("not a JSON message") from None
    if not isinstance(obj, dict):
        raise IntroduceError("not a JSON object")
    if obj.get("v") != VERSION:
        raise IntroduceError(f"unsupported version {obj.get('v')!r} (expected {VERSION})")
    if not isinstance(obj.get("op"), str):
        raise IntroduceError("op: expected a string")
    return obj


def check_keys(obj: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """No keys but ``v``, ``op`` and ``allowed``."""
    if extra := set(obj) - {"v", "op", *allowed}:
        raise IntroduceError(f"{obj['op']}: unknown keys {sorted(extra)[:8]}")


def _int(obj: dict[str, Any], key: str, limit: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise IntroduceError(f"{key}: expected an integer in [0, {limit})")
    return value


def parse_info(raw: Any, domid: int) -> DomainInfo:
    """``info`` as a DomainInfo, every field type- and range-checked."""
    if not isinstance(raw, dict):
        raise IntroduceError("info: expected an object")
    known = {f.name for f in fields(DomainInfo)} - {"domid"}
    if extra := set(raw) - known:
        raise IntroduceError(f"info: unknown keys {sorted(extra)}")
    kw: dict[str, Any] = {}
    for key, limit in _INFO_STR.items():
        value = raw.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= limit or "\0" in value:
            raise IntroduceError(f"info.{key}: expected a string of 1..{limit} characters")
        kw[key] = value
    if not _UUID.fullmatch(kw["uuid"]):
        raise IntroduceError("info.uuid: expected hex digits and dashes")
    for key, limit in _INFO_INT.items():
        if key in _OPTIONAL and raw.get(key) is None:
            kw[key] = None
            continue
        kw[key] = _int(raw, key, limit)
    if not isinstance(raw.get("hvm", False), bool):
        raise IntroduceError("info.hvm: expected true or false")
    kw["hvm"] = raw.get("hvm", False)
    if kw["vcpus"] < 1:
        raise IntroduceError("info.vcpus: expected at least 1")
    if kw["online_vcpus"] is not None and not 1 <= kw["online_vcpus"] <= kw["vcpus"]:
        raise IntroduceError("info.online_vcpus: expected 1..vcpus")
    return DomainInfo(domid=domid, **kw)


def parse_introduce(obj: dict[str, Any]) -> Introduce:
    """Check an ``introduce`` request's fields (not its descriptors)."""
    if extra := set(obj) - {"v", "op", "domid", "page_offset", "info"}:
        raise IntroduceError(f"introduce: unknown keys {sorted(extra)}")
    domid = _int(obj, "domid", MAX_DOMID + 1)
    if domid == 0:
        raise IntroduceError("domid: 0 is the host's own domain")
    offset = _int(obj, "page_offset", 1 << 40)
    if offset % RING_PAGE_SIZE:
        raise IntroduceError("page_offset: not page aligned")
    return Introduce(domid, offset, parse_info(obj.get("info"), domid))


def check_fds(fds: list[int], page_offset: int) -> None:
    """The three descriptors are what they claim to be.

    The memfd must be sealed against shrinking (F_SEAL_SHRINK): a VMM that
    truncated the file under our mapping would otherwise make the daemon's next
    ring access a SIGBUS.  The other two must be eventfds.
    """
    if len(fds) != FDS:
        raise IntroduceError(f"expected {FDS} descriptors (memfd, kick eventfd, notify eventfd), "
                             f"got {len(fds)}")
    memfd, kick, notify = fds
    st = os.fstat(memfd)
    if not stat.S_ISREG(st.st_mode):
        raise IntroduceError("descriptor 0: not a memfd")
    try:
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    except OSError:
        raise IntroduceError("descriptor 0: not a memfd (no seals)") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise IntroduceError("descriptor 0: memfd not sealed against shrinking (F_SEAL_SHRINK)")
    if st.st_size < page_offset + RING_PAGE_SIZE:
        raise IntroduceError(f"descriptor 0: {st.st_size} bytes, the page at {page_offset:#x} is outside")
    for i, fd in ((1, kick), (2, notify)):
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = "?"
        if kind != "anon_inode:[eventfd]":
            raise IntroduceError(f"descriptor {i}: not an eventfd")


def info_doc(info: DomainInfo) -> dict[str, Any]:
    """``info`` as sent by the VMM."""
    return {f.name: getattr(info, f.name) for f in fields(DomainInfo) if f.name != "domid"}
