"""One hypercall dispatcher fed by every trap kind: ``dispatch(vcpu, nr, args) -> rax``.

Handlers are registered per hypercall number; most hypercalls are
``(cmd, arg)`` pairs and use :func:`subops` to dispatch on ``cmd``.  A handler
returns a non-negative result or raises :class:`HypercallError`; anything else
it raises is a VMM bug, logged with its traceback, and the guest gets
``-EINVAL``: the VMM never dies from a hypercall.  Unknown numbers and
sub-ops get ``-ENOSYS`` and one log line each.  All Xen state is changed
under the domain's big lock.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from xenkvm.xen.abi import Errno, Hypercall
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.cdeliver import changes_delivery
from xenkvm.xen.guestmem import GuestVirtual

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)
trace_log = logging.getLogger("xenkvm.trace")

MASK64 = (1 << 64) - 1
#: the one key every unregistered hypercall number (``stats``, ``ops``) and every unknown sub-op (``ops``)
#: is counted under: both are guest-chosen, so keying on them would let a guest grow our tables forever
UNKNOWN = -1
MAX_UNKNOWN_LOGGED = 64     #: distinct unknown (hypercall, sub-op) pairs logged; later ones are only counted


@dataclass
class Call:
    """One hypercall in flight."""

    domain: "XenDomain"
    vcpu: "Vcpu"
    nr: int
    args: tuple[int, ...]
    long_mode: bool
    guest: GuestVirtual

    @property
    def vcpu_id(self) -> int:
        return self.vcpu.id


Handler = Callable[[Call], int]
SubHandler = Callable[[Call, int], int]


@dataclass
class Stat:
    count: int = 0
    seconds: float = 0.0


def _name(nr: int) -> str:
    if nr == UNKNOWN:
        return "unknown hypercalls"
    try:
        return Hypercall(nr).name
    except ValueError:
        return f"hypercall#{nr}"


@dataclass
class Dispatcher:
    domain: "XenDomain"
    trace: bool = False
    handlers: dict[int, Handler] = field(default_factory=dict)
    stats: dict[int, Stat] = field(default_factory=dict)
    #: calls per (hypercall, sub-op): the sub-op (``cmd``, args[0]) of the hypercalls that have
    #: a sub-op table, else None.  Which ops a workload makes (benchmarks divide by its requests).
    ops: collections.Counter = field(default_factory=collections.Counter)
    _unknown_seen: set[tuple[int, int | None]] = field(default_factory=set)

    subop_tables: dict[int, dict[int, SubHandler]] = field(default_factory=dict)

    def register(self, nr: int, handler: Handler) -> None:
        self.handlers[int(nr)] = handler

    def register_subop(self, nr: int, cmd: int, handler: SubHandler) -> None:
        """Add ``cmd`` to the ``(cmd, arg)`` table of hypercall ``nr`` (modules share tables)."""
        table = self.subop_tables.get(int(nr))
        if table is None:
            table = self.subop_tables[int(nr)] = {}
            self.register(nr, subops(table))
        table[int(cmd)] = handler

    def dispatch(self, vcpu: "Vcpu", nr: int, args: tuple[int, ...], long_mode: bool = True) -> int:
        """Run hypercall ``nr``; returns the value for RAX (negative errors as 64-bit)."""
        t0 = time.perf_counter()
        self.domain.vcpus[vcpu.id].up = True
        handler = self.handlers.get(nr)
        if handler is None:
            self.unknown(nr, None)
            result = -Errno.ENOSYS
        else:
            call = Call(self.domain, vcpu, nr, args, long_mode, GuestVirtual(vcpu, self.domain.mem))
            result = self._invoke(handler, call)
        key = nr if handler is not None else UNKNOWN
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = Stat()
        stat.count += 1
        stat.seconds += time.perf_counter() - t0
        self.ops[self._op_key(key, args)] += 1
        if self.trace:
            trace_log.info("vcpu%d hypercall %s(%s) = %d", vcpu.id, _name(nr),
                           ", ".join(f"{a:#x}" for a in args[:5]), result)
        return result & MASK64

    def _op_key(self, nr: int, args: tuple[int, ...]) -> tuple[int, int | None]:
        """The ``ops`` key of a call: a sub-op outside the hypercall's table counts as UNKNOWN."""
        table = self.subop_tables.get(nr)
        if table is None:
            return nr, None
        cmd = args[0] & 0xFFFFFFFF
        return nr, cmd if cmd in table else UNKNOWN

    def _invoke(self, handler: Handler, call: Call) -> int:
        try:
            with self.domain.lock:
                cdeliver = getattr(self.domain, "cdeliver", None)
                if cdeliver is not None and cdeliver.loaded and changes_delivery(call.nr, call.args):
                    return self._held(cdeliver, handler, call)
                return int(handler(call))
        except HypercallError as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("vcpu%d %s: -%s (%s)", call.vcpu_id, _name(call.nr), Errno(e.errno).name, e)
            return -e.errno
        except Exception:
            log.exception("vcpu%d %s%s failed inside the VMM", call.vcpu_id, _name(call.nr), call.args[:2])
            return -Errno.EINVAL

    @staticmethod
    def _held(cdeliver, handler: Handler, call: Call) -> int:
        """Run a handler that may change what C delivery knows (cdeliver.py): C declines every
        notify meanwhile, and gets the state as the handler left it (under the lock)."""
        cdeliver.hold()
        try:
            return int(handler(call))
        finally:
            cdeliver.reload()

    def unknown(self, nr: int, cmd: int | None) -> None:
        """One log line per unknown (hypercall, sub-op), for the first MAX_UNKNOWN_LOGGED of them."""
        key = (nr, cmd)
        if key in self._unknown_seen or len(self._unknown_seen) > MAX_UNKNOWN_LOGGED:
            return
        self._unknown_seen.add(key)
        if len(self._unknown_seen) > MAX_UNKNOWN_LOGGED:
            log.warning("more than %d distinct unimplemented hypercalls: -ENOSYS, no longer logged",
                        MAX_UNKNOWN_LOGGED)
            return
        what = _name(nr) if cmd is None else f"{_name(nr)} sub-op {cmd}"
        log.warning("unimplemented %s: -ENOSYS (further calls not logged)", what)


def op_name(nr: int, cmd: int | None) -> str:
    """``event_channel_op/4`` for a key of :attr:`Dispatcher.ops` (sub-op numbers as Xen's headers)."""
    if cmd is None:
        return _name(nr)
    return f"{_name(nr)}/{'unknown' if cmd == UNKNOWN else cmd}"


def subops(table: dict[int, SubHandler]) -> Handler:
    """A handler for ``hypercall(cmd, arg)``: dispatch on cmd (args[0]) with arg (args[1])."""
    def handler(call: Call) -> int:
        cmd = call.args[0] & 0xFFFFFFFF
        sub = table.get(cmd)
        if sub is None:
            call.domain.dispatcher.unknown(call.nr, cmd)
            raise HypercallError(Errno.ENOSYS)
        return sub(call, call.args[1])
    return handler
