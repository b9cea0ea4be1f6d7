"""console_io: the hypervisor console, which the guest writes (and reads) by hypercall."""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.xen.abi import Hypercall, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import einval

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

MAX_WRITE = 16 * 1024


def register(domain: "XenDomain") -> None:
    def console_io(call: Call) -> int:
        cmd, count, buf = call.args[0] & 0xFFFFFFFF, call.args[1] & 0xFFFFFFFF, call.args[2]
        if cmd == lib.CONSOLEIO_write:
            if count > MAX_WRITE:
                raise einval(f"console write of {count} bytes")
            data = call.guest.read(buf, count)
            domain.machine.console.write(data)
            return 0
        if cmd == lib.CONSOLEIO_read:
            data = domain.console_input.take(min(count, MAX_WRITE))
            call.guest.write(buf, data)
            return len(data)
        domain.dispatcher.unknown(call.nr, cmd)
        raise einval(f"console_io command {cmd}")

    domain.dispatcher.register(Hypercall.console_io, console_io)
