"""The hypercall table: number -> family handler -> sub-op handlers, in one place.

Read it as Xen's ``xen/include/hypercall-defs.c``: one row per hypercall an
HVM/PVH domU may make, naming the module that owns its family.  A row is
either a handler ``fn(call) -> int`` (the hypercall decodes its own
arguments) or a sub-op table ``{cmd: fn(call, arg) -> int}`` for the
``hypercall(cmd, arg)`` families, dispatched on ``cmd`` by
:func:`xenkvm.xen.dispatch.subops`.  Every handler finds the state it acts on
through ``call.domain`` (``.evtchn``, ``.gnttab``, ``.timers``, ...), so the
table holds plain functions and is the same for every domain.

Numbers not listed get ``-ENOSYS`` from the dispatcher (one log line each),
as do sub-ops missing from a family's table.
"""
from __future__ import annotations

from typing import Mapping, Union

from xenkvm.xen.abi import Hypercall
from xenkvm.xen.dispatch import Dispatcher, Handler, SubHandler
from xenkvm.xen.evtchn import ops as evtchn_ops
from xenkvm.xen.gnttab import ops as gnttab_ops
from xenkvm.xen.hypercalls import console, hvm, memory, misc, sched, vcpu, version

Row = Union[Handler, Mapping[int, SubHandler]]

HYPERCALLS: dict[Hypercall, Row] = {
    # number                      family (module)         decoding
    Hypercall.set_timer_op:       vcpu.set_timer_op,      # deadline in args[0] (two words in 32-bit mode)
    Hypercall.memory_op:          memory.memory_op,       # cmd & 0x3f; extent start in cmd >> 6
    Hypercall.xen_version:        version.SUBOPS,
    Hypercall.console_io:         console.console_io,     # (cmd, count, buffer)
    Hypercall.grant_table_op:     gnttab_ops.SUBOPS,      # (cmd, uop, count)
    Hypercall.vm_assist:          misc.vm_assist,         # (cmd, type)
    Hypercall.vcpu_op:            vcpu.SUBOPS,            # (cmd, vcpuid, arg): timers included
    Hypercall.sched_op:           sched.SUBOPS,           # poll included (xen/evtchn/poll.py)
    Hypercall.event_channel_op:   evtchn_ops.SUBOPS,
    Hypercall.physdev_op:         misc.PHYSDEV_SUBOPS,
    Hypercall.hvm_op:             hvm.SUBOPS,
    # a domU is refused the toolstack's and the platform's hypercalls: -EPERM
    **{nr: misc.privileged for nr in misc.PRIVILEGED},
}


def install(dispatcher: Dispatcher, table: Mapping[Hypercall, Row] = HYPERCALLS) -> None:
    """Register every row of ``table`` on ``dispatcher``."""
    for nr, row in table.items():
        if callable(row):
            dispatcher.register(nr, row)
        else:
            for cmd, fn in row.items():
                dispatcher.register_subop(nr, cmd, fn)
