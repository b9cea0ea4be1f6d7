"""The dom0 conveniences a backend uses, over any ``call(type, payload) -> bytes``.

Shared by the VMM's in-process connection to an embedded store
(``xenkvm.backends.xsclient.VmmXsClient``) and its socket connection to the
shared xenstored (:class:`.watchclient.XsWatchClient`), so a backend works the
same against either.
"""
from __future__ import annotations

from .perms import Perm
from .protocol import XenstoreError, XsError, XsType


def arg(text: str) -> bytes:
    """A NUL-terminated request argument."""
    return text.encode() + b"\0"


class XsOps:
    """READ/WRITE/MKDIR/DIRECTORY/RM on top of ``self.call``."""

    def call(self, type_: XsType, payload: bytes) -> bytes:
        raise NotImplementedError

    def read(self, path: str) -> str | None:
        """The value at ``path`` (None if absent); bytes that are not UTF-8 are replaced."""
        try:
            return self.call(XsType.READ, arg(path)).decode("utf-8", "replace")
        except XenstoreError as e:
            if e.err == XsError.ENOENT:
                return None
            raise

    def write(self, path: str, value: str | int) -> None:
        """WRITE (creates parents, inheriting their permissions)."""
        self.call(XsType.WRITE, arg(path) + str(value).encode())

    def mkdir(self, path: str, perms: tuple[Perm, ...] | None = None) -> None:
        """MKDIR, then SET_PERMS if ``perms`` is given."""
        self.call(XsType.MKDIR, arg(path))
        if perms is not None:
            self.call(XsType.SET_PERMS, arg(path) + b"".join(arg(p.wire()) for p in perms))

    def directory(self, path: str) -> list[str]:
        """Child names ([] if absent)."""
        try:
            data = self.call(XsType.DIRECTORY, arg(path))
        except XenstoreError as e:
            if e.err == XsError.ENOENT:
                return []
            raise
        return [s.decode("utf-8", "replace") for s in data.split(b"\0")[:-1]]

    def rm(self, path: str) -> None:
        """RM (a missing node is fine)."""
        try:
            self.call(XsType.RM, arg(path))
        except XenstoreError as e:
            if e.err != XsError.ENOENT:
                raise
