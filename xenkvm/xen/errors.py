"""Hypercall errors: a handler raises HypercallError and the dispatcher returns -errno."""
from __future__ import annotations

from xenkvm.xen.abi import Errno


class HypercallError(Exception):
    """End a hypercall with ``-errno`` (Xen errno values)."""

    def __init__(self, errno: int, why: str = ""):
        super().__init__(why)
        self.errno = int(errno)

    def __str__(self) -> str:  # named lazily: error returns are a hot path for hostile guests
        return self.args[0] or Errno(self.errno).name


def efault(why: str = "bad guest address") -> HypercallError:
    return HypercallError(Errno.EFAULT, why)


def einval(why: str = "invalid argument") -> HypercallError:
    return HypercallError(Errno.EINVAL, why)
