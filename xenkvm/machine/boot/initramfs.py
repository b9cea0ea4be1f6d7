"""A deterministic "newc" cpio writer for building Linux initramfs images.

Format (the SVR4 "new ASCII" cpio that Linux's init/initramfs.c reads): each
member is a 110-byte header -- the magic "070701" and thirteen 8-digit hex
fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize including the NUL, check) -- then the name and
its NUL padded to a multiple of 4, then the data padded to a multiple of 4.
The archive ends with a member named "TRAILER!!!".

Output depends only on what was added and in which order (inode numbers are
assigned in order, mtimes default to 0, gzip output has no timestamp), so the
same input always gives the same bytes.
"""
from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from enum import Enum

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_U32_MAX = 0xFFFF_FFFF


class InitramfsError(ValueError):
    """A path, mode or size that cannot go into a newc archive."""


class DeviceKind(Enum):
    CHAR = "c"
    BLOCK = "b"


@dataclass(frozen=True)
class _Member:
    name: str
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _check_path(path: str) -> str:
    """An archive name: relative, no '.', '..' or empty components, no NUL."""
    if not isinstance(path, str) or not path:
        raise InitramfsError(f"bad archive path {path!r}")
    if path.startswith("/") or "\0" in path:
        raise InitramfsError(f"archive path {path!r} must be relative and contain no NUL")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InitramfsError(f"archive path {path!r} has an empty, '.' or '..' component")
    return path


def _check_u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        raise InitramfsError(f"{what} {value!r} does not fit in 32 bits")
    return value


def _check_perm(mode: int) -> int:
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InitramfsError(f"permission bits {mode!r} out of range (0..0o7777)")
    return mode


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Cpio:
    """Builds a newc archive in memory; parents of added paths are created as needed."""

    def __init__(self, uid: int = 0, gid: int = 0, mtime: int = 0):
        self._members: dict[str, _Member] = {}
        self._defaults = (_check_u32(uid, "uid"), _check_u32(gid, "gid"), _check_u32(mtime, "mtime"))

    def __contains__(self, path: str) -> bool:
        return path in self._members

    def _add(self, path: str, mode: int, *, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
             uid: int | None = None, gid: int | None = None, mtime: int | None = None) -> "Cpio":
        path = _check_path(path)
        if path in self._members:
            raise InitramfsError(f"{path!r} is already in the archive")
        self._parents(path)
        d_uid, d_gid, d_mtime = self._defaults
        self._members[path] = _Member(
            path, mode, _check_u32(d_uid if uid is None else uid, "uid"),
            _check_u32(d_gid if gid is None else gid, "gid"),
            _check_u32(d_mtime if mtime is None else mtime, "mtime"), bytes(data), rdev)
        return self

    def _parents(self, path: str) -> None:
        """Add missing parent directories (0755) so the kernel can create ``path``."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            member = self._members.get(parent)
            if member is None:
                self.add_dir(parent)
            elif not stat.S_ISDIR(member.mode):
                raise InitramfsError(f"{parent!r} is not a directory")

    def add_dir(self, path: str, mode: int = 0o755, **owner: int) -> "Cpio":
        """A directory (``owner`` may give uid, gid, mtime)."""
        return self._add(path, stat.S_IFDIR | _check_perm(mode), **owner)

    def add_file(self, path: str, data: bytes | str, mode: int = 0o644, **owner: int) -> "Cpio":
        """A regular file with ``data`` (str is UTF-8 encoded)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        _check_u32(len(raw), "file size")
        return self._add(path, stat.S_IFREG | _check_perm(mode), data=raw, **owner)

    def add_symlink(self, path: str, target: str, **owner: int) -> "Cpio":
        """A symbolic link; the target is stored as the member's data, unchecked."""
        if not target or "\0" in target:
            raise InitramfsError(f"bad symlink target {target!r}")
        return self._add(path, stat.S_IFLNK | 0o777, data=target.encode(), **owner)

    def add_device(self, path: str, kind: str | DeviceKind, major: int, minor: int,
                   mode: int = 0o600, **owner: int) -> "Cpio":
        """A character ('c') or block ('b') device node."""
        try:
            kind = DeviceKind(kind)
        except ValueError:
            raise InitramfsError(f"device kind {kind!r} is neither 'c' nor 'b'") from None
        fmt = stat.S_IFCHR if kind is DeviceKind.CHAR else stat.S_IFBLK
        rdev = (_check_u32(major, "major"), _check_u32(minor, "minor"))
        return self._add(path, fmt | _check_perm(mode), rdev=rdev, **owner)

    def to_bytes(self, compress: str | None = None) -> bytes:
        """The archive, optionally gzip-compressed (``compress='gzip'``), deterministically."""
        out = bytearray()
        for ino, m in enumerate(self._members.values(), start=1):
            out += _member_bytes(m, ino)
        out += _member_bytes(_Member(TRAILER, 0, 0, 0, 0), 0)
        if compress is None:
            return bytes(out)
        if compress == "gzip":
            return gzip.compress(bytes(out), compresslevel=9, mtime=0)
        raise InitramfsError(f"unsupported compression {compress!r}")


def _member_bytes(m: _Member, ino: int) -> bytes:
    """Header, padded name and padded data of one member."""
    name = m.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(m.mode) else 1
    fields = (ino, m.mode, m.uid, m.gid, nlink, m.mtime, len(m.data),
              0, 0, m.rdev[0], m.rdev[1], len(name), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad4(len(head)) + m.data + _pad4(len(m.data))
