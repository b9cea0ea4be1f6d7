"""console_io: the hypervisor console, which the guest writes (and reads) by hypercall.

Its output goes to the hypervisor log (``xen.hypervisor_log``), not to the
guest console: in Xen it is Xen's own console (``xl dmesg``).  The domain's
``console_io`` (a ``xen.console.ConsoleIo``) is created here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.xen.abi import Hypercall, lib
from xenkvm.xen.console import ConsoleIo, HypervisorLog
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import einval

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

MAX_WRITE = 16 * 1024


def register(domain: "XenDomain") -> None:
    cons = domain.console_io = ConsoleIo(HypervisorLog.open(domain.cfg.hypervisor_log), domain.console_input)

    def console_io(call: Call) -> int:
        cmd, count, buf = call.args[0] & 0xFFFFFFFF, call.args[1] & 0xFFFFFFFF, call.args[2]
        if cmd == lib.CONSOLEIO_write:
            if count > MAX_WRITE:
                raise einval(f"console write of {count} bytes")
            data = call.guest.read(buf, count)
            cons.write(data)
            return 0
        if cmd == lib.CONSOLEIO_read:
            data = cons.read(min(count, MAX_WRITE))
            call.guest.write(buf, data)
            return len(data)
        domain.dispatcher.unknown(call.nr, cmd)
        raise einval(f"console_io command {cmd}")

    domain.dispatcher.register(Hypercall.console_io, console_io)
