"""The snapshot state file: a fixed header, a checksummed JSON index, checksummed JSON sections.

Layout (all integers little-endian; docs/snapshots.md is the reference)::

    0   8   magic  b"XKSNAP\\r\\n"   (the CR LF catches text-mode mangling, as PNG's does)
    8   4   format version (FORMAT_VERSION)
    12  4   index length N
    16  32  SHA-256 of the index
    48  N   index: JSON {"xenkvm", "config_sha256", "snapshot_id", "ram", "sections": [...]}
    ..      sections, each JSON; the index gives each one's name, offset, length and SHA-256

Nothing is interpreted before its checksum matched: a foreign, truncated, corrupted or newer
file raises :class:`SnapshotError` whose message is one line naming the file and the fault.
Binary state (kernel structs) is base64 inside the JSON (:func:`b64`, :func:`unb64`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"XKSNAP\r\n"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sII32s")
MAX_INDEX = 1 << 20


class SnapshotError(Exception):
    """A snapshot that cannot be taken or read; ``str()`` is one line for the user."""


@dataclass
class Index:
    """What the header says about the snapshot (the sections' own data aside)."""

    xenkvm: str                 #: the version that wrote it
    config_sha256: str          #: digest of the guest config section (what was run)
    snapshot_id: str            #: random hex id, also in the RAM file's header page
    ram: dict[str, Any]         #: the RAM file: name, size, regions (see ramfile.py)
    sections: list[dict[str, Any]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical(obj: Any) -> bytes:
    """The JSON bytes of ``obj`` with sorted keys (digests of the same data agree)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_state(path: str, index: Index, sections: dict[str, Any]) -> None:
    """Write the state file (to ``path``.tmp, then renamed: a crash leaves no half file)."""
    bodies = [(name, canonical(body)) for name, body in sections.items()]
    offsets, entries = 0, []
    for name, raw in bodies:
        entries.append({"name": name, "offset": offsets, "length": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest()})
        offsets += len(raw)
    index.sections = entries
    idx = canonical(index.__dict__)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_FIXED.pack(MAGIC, FORMAT_VERSION, len(idx), hashlib.sha256(idx).digest()))
        f.write(idx)
        for _name, raw in bodies:
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state(path: str) -> tuple[Index, dict[str, Any]]:
    """Read and check a state file; every fault is a one-line SnapshotError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read the snapshot: {e.strerror or e}") from None
    index, base = _read_index(path, data)
    sections = {}
    for entry in index.sections:
        sections[entry["name"]] = _read_section(path, data, base, entry)
    return index, sections


def _read_index(path: str, data: bytes) -> tuple[Index, int]:
    if len(data) < _FIXED.size or not data.startswith(MAGIC):
        raise SnapshotError(f"{path}: not a xenkvm snapshot (no {MAGIC!r} header)")
    _magic, version, n, digest = _FIXED.unpack_from(data)
    if version > FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format version {version} is newer than this xenkvm reads "
                            f"({FORMAT_VERSION}): restore it with the xenkvm that wrote it")
    if version < FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format version {version} is older than this xenkvm reads "
                            f"({FORMAT_VERSION}) and is not converted")
    if n > MAX_INDEX or _FIXED.size + n > len(data):
        raise SnapshotError(f"{path}: truncated snapshot (index of {n} bytes, file of {len(data)})")
    raw = data[_FIXED.size:_FIXED.size + n]
    if hashlib.sha256(raw).digest() != digest:
        raise SnapshotError(f"{path}: corrupted snapshot (the index checksum does not match)")
    try:
        fields = json.loads(raw)
        index = Index(**fields)
    except (ValueError, TypeError) as e:
        raise SnapshotError(f"{path}: malformed snapshot index ({e})") from None
    return index, _FIXED.size + n


def _read_section(path: str, data: bytes, base: int, entry: dict[str, Any]) -> Any:
    try:
        name, off, length, digest = entry["name"], int(entry["offset"]), int(entry["length"]), entry["sha256"]
    except (KeyError, TypeError, ValueError):
        raise SnapshotError(f"{path}: malformed snapshot index entry") from None
    if off < 0 or length < 0 or base + off + length > len(data):
        raise SnapshotError(f"{path}: truncated snapshot (section {name!r} ends past the file)")
    raw = data[base + off:base + off + length]
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SnapshotError(f"{path}: corrupted snapshot (section {name!r} fails its checksum)")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise SnapshotError(f"{path}: malformed snapshot section {name!r} ({e})") from None
