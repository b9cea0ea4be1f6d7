"""Errors raised by the /dev/kvm bindings."""
from __future__ import annotations

import errno as _errno
import os

from xenkvm.kvm._kvm_cffi import ffi


class KvmError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed; names the ioctl and errno."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        super().__init__(err, msg + (f": {detail}" if detail else ""))
        self.ioctl = ioctl

    def __str__(self) -> str:  # OSError's default prefixes "[Errno n]"
        return self.args[1]


def check(ioctl: str, ret: int, detail: str = "") -> int:
    """Return ``ret`` or raise KvmError for the helper's in-band ``-errno``."""
    if ret < 0:
        raise KvmError(ioctl, -ret, detail)
    return ret


def new_varstruct(ctype: str, field: str, n: int):
    """Allocate ``struct X`` followed by ``n`` elements of its flexible array ``field``.

    cffi cannot size a partially declared struct with a flexible array, so the
    buffer is sized from the compiler's offsetof and element size.  Returns
    (owner, pointer): keep ``owner`` referenced while the pointer is in use.
    """
    fields = dict(ffi.typeof(ctype).fields)
    item = fields[field].type.item
    size = max(ffi.offsetof(ctype, field) + n * ffi.sizeof(item), ffi.sizeof(ctype))
    owner = ffi.new("char[]", size)
    return owner, ffi.cast(f"{ctype} *", owner)
