"""console_io: the hypervisor console, which the guest writes (and reads) by hypercall.

Its output goes to the hypervisor log (``xen.hypervisor_log``), not to the
guest console: in Xen it is Xen's own console (``xl dmesg``).  The domain's
``console_io`` (a ``xen.console.ConsoleIo``) is made with the domain.
"""
from __future__ import annotations

from xenkvm.xen.abi import lib
from xenkvm.xen.console import ConsoleIo
from xenkvm.xen.dispatch import Call
from xenkvm.xen.errors import einval

MAX_WRITE = 16 * 1024


def console_io(call: Call) -> int:
    """CONSOLEIO_write to the hypervisor log, CONSOLEIO_read of host keystrokes (domain.console_io)."""
    cmd, count, buf = call.args[0] & 0xFFFFFFFF, call.args[1] & 0xFFFFFFFF, call.args[2]
    cons: ConsoleIo = call.domain.console_io
    if cmd == lib.CONSOLEIO_write:
        if count > MAX_WRITE:
            raise einval(f"console write of {count} bytes")
        cons.write(call.guest.read(buf, count))
        return 0
    if cmd == lib.CONSOLEIO_read:
        data = cons.read(min(count, MAX_WRITE))
        call.guest.write(buf, data)
        return len(data)
    call.domain.dispatcher.unknown(call.nr, cmd)
    raise einval(f"console_io command {cmd}")
