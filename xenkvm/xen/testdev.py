"""The Xen test backend: a port device that plays dom0 for the test guests.

Guests built with the toolkit (``firmware/include/xen_testdev.h``) use it to
check their grants and event channels from the other side.  It exists only
when the guest YAML says ``xen: {test_device: true}``.

Protocol (port ``layout.XEN_TESTDEV_PORT``, registered 4 ports wide):

* ``OUT`` 32-bit at offset 0: the guest-physical address of a 64-byte
  command block (:class:`Command`, 8-byte aligned, inside one page).  The
  command runs synchronously; ``result`` (and ``value``) are written back
  into the block before the guest's next instruction.
* ``IN`` 32-bit at offset 0: the last command's result (two's complement),
  the only way to see :attr:`Result.EBLOCK` for a block that could not be
  read.  Other sizes/offsets read as all-ones and make the next ``IN`` read
  :attr:`Result.EACCESS`; such writes are ignored likewise.

Results: 0, a negative ``GNTST_*`` code from the grant-table backend, or a
negative :class:`Result`.  Every guest-supplied field is checked; bad input
is an error code, never an exception in the VMM.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Callable

from xenkvm.machine.memory import GuestMemoryError

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

MAGIC = 0x58544443          #: "CDTX" little-endian
PAGE = 4096
BLOCK = struct.Struct("<IIHHIIIQIiQ16x")    #: struct xk_testdev_cmd (64 bytes)
RESULT_AT = 36              #: offsetof(struct xk_testdev_cmd, result)
RESULT = struct.Struct("<iQ")               #: result, value (contiguous at 36..48)
RESERVED_AT = 48
FLAG_WRITE = 0x1
KNOWN_FLAGS = FLAG_WRITE

assert BLOCK.size == 64


class Op(IntEnum):
    """Commands (``enum xk_testdev_op``)."""

    COPY_FROM = 1       #: grant [offset, +length) -> buffer
    COPY_TO = 2         #: buffer -> grant [offset, +length)
    MAP_SUM = 3         #: map; value = FNV-1a 32 of [offset, +length); FLAG_WRITE: buffer -> mapping first
    ALLOC_ECHO = 4      #: value = a new guest port bound to this backend (interdomain, dom0); echoes
    BIND_ECHO = 5       #: bind to the guest's ``port`` (alloc_unbound, remote dom0); value = port; echoes
    NOTIFY = 6          #: notify guest ``port`` (one bound to this backend)
    ECHO_COUNT = 7      #: value = notifies this backend received on guest ``port``


class Result(IntEnum):
    """Device errors (``enum xk_testdev_error``); -1..-12 are GNTST codes."""

    OK = 0
    EBLOCK = -100       #: block unaligned, crossing a page or not in guest memory
    EMAGIC = -101
    EOP = -102
    ERANGE = -103       #: offset/length outside one page, or zero length
    EBUFFER = -104      #: buffer not in guest memory
    EEVTCHN = -105      #: event-channel operation refused
    EACCESS = -106      #: port accessed with the wrong size/offset
    EINTERNAL = -107    #: the backend failed unexpectedly (a VMM bug, logged)


class CommandError(Exception):
    """Ends a command with ``code`` (a negative Result or GNTST value)."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = int(code)


@dataclass(frozen=True)
class Command:
    """One command block, as read from guest memory."""

    magic: int
    op: int
    domid: int
    flags: int
    ref: int
    offset: int
    length: int
    buffer: int
    port: int
    result: int
    value: int

    @classmethod
    def parse(cls, data: bytes) -> "Command":
        return cls(*BLOCK.unpack(data))

    def pack(self) -> bytes:
        return BLOCK.pack(self.magic, self.op, self.domid, self.flags, self.ref, self.offset,
                          self.length, self.buffer, self.port, self.result, self.value)


def fnv1a32(data: bytes | bytearray | memoryview) -> int:
    """FNV-1a 32-bit hash (``xk_fnv1a`` in the guest header)."""
    h = 0x811C9DC5
    for b in bytes(data):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def grant_status(exc: BaseException) -> int | None:
    """The GNTST code carried by a grant-table error, or None if it is not one."""
    if type(exc).__name__ != "GrantError":
        return None
    for attr in ("status", "code", "gntst"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return int(value)
    if exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    return None


class TestDevice:
    """Port device executing :class:`Command` blocks against the domain's backends."""

    __test__ = False    # not a pytest class

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self.last = Result.OK.value
        #: guest port -> notifies received (ports bound to this device)
        self.echo_counts: dict[int, int] = {}
        self._handlers: dict[Op, Callable[[Command], int]] = {
            Op.COPY_FROM: self._copy_from,
            Op.COPY_TO: self._copy_to,
            Op.MAP_SUM: self._map_sum,
            Op.ALLOC_ECHO: self._alloc_echo,
            Op.BIND_ECHO: self._bind_echo,
            Op.NOTIFY: self._notify,
            Op.ECHO_COUNT: self._echo_count,
        }

    # -- port interface -------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 4:
            self.last = Result.EACCESS.value
            return (1 << (8 * size)) - 1
        return self.last & 0xFFFFFFFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            log.debug("testdev: ignored %d-byte write at offset %d", size, offset)
            self.last = Result.EACCESS.value
            return
        self.last = self.execute(value & 0xFFFFFFFF)

    # -- commands ---------------------------------------------------------------------
    def execute(self, gpa: int) -> int:
        """Run the block at ``gpa``; returns the result (also written to the block if possible)."""
        try:
            cmd = self._read_block(gpa)
        except CommandError as e:
            log.debug("testdev: block %#x: %s", gpa, e)
            return e.code
        value = 0
        try:
            value = self._run(cmd)
            code = Result.OK.value
        except CommandError as e:
            log.debug("testdev: op %d at %#x: %s (%d)", cmd.op, gpa, e, e.code)
            code = e.code
        self._write_result(gpa, code, value)
        return code

    def _read_block(self, gpa: int) -> Command:
        if gpa % 8 or (gpa % PAGE) + BLOCK.size > PAGE:
            raise CommandError(Result.EBLOCK, "block unaligned or crossing a page")
        try:
            data = self.domain.mem.read(gpa, BLOCK.size)
        except GuestMemoryError:
            raise CommandError(Result.EBLOCK, "block outside guest memory") from None
        return Command.parse(data)

    def _write_result(self, gpa: int, code: int, value: int) -> None:
        try:
            self.domain.mem.write(gpa + RESULT_AT, RESULT.pack(code, value & (1 << 64) - 1))
        except GuestMemoryError:    # checked on read; the guest cannot move RAM meanwhile
            log.warning("testdev: block %#x vanished before the result was written", gpa)

    def _run(self, cmd: Command) -> int:
        if cmd.magic != MAGIC:
            raise CommandError(Result.EMAGIC, f"magic {cmd.magic:#x}")
        try:
            handler = self._handlers[Op(cmd.op)]
        except ValueError:
            raise CommandError(Result.EOP, f"unknown op {cmd.op}") from None
        try:
            with self.domain.lock:
                return handler(cmd)
        except CommandError:
            raise
        except Exception as e:  # the backend's own errors become codes, never VMM crashes
            status = grant_status(e)
            if status is not None:
                raise CommandError(status, f"grant error {e}") from None
            log.exception("testdev: op %s failed inside the VMM", Op(cmd.op).name)
            raise CommandError(Result.EINTERNAL, repr(e)) from None

    # -- grant ops ----------------------------------------------------------------------
    @staticmethod
    def _check_range(cmd: Command) -> None:
        if not 0 < cmd.length <= PAGE or cmd.offset >= PAGE or cmd.offset + cmd.length > PAGE:
            raise CommandError(Result.ERANGE, f"offset {cmd.offset} length {cmd.length}")
        if cmd.flags & ~KNOWN_FLAGS:
            raise CommandError(Result.ERANGE, f"unknown flags {cmd.flags:#x}")

    def _read_buffer(self, cmd: Command) -> bytes:
        try:
            return self.domain.mem.read(cmd.buffer, cmd.length)
        except GuestMemoryError:
            raise CommandError(Result.EBUFFER, f"buffer {cmd.buffer:#x}+{cmd.length}") from None

    def _check_buffer(self, cmd: Command) -> None:
        if not self.domain.mem.contains(cmd.buffer, cmd.length):
            raise CommandError(Result.EBUFFER, f"buffer {cmd.buffer:#x}+{cmd.length}")

    def _copy_from(self, cmd: Command) -> int:
        self._check_range(cmd)
        self._check_buffer(cmd)
        data = self.domain.gnttab.copy_from(cmd.domid, cmd.ref, cmd.offset, cmd.length)
        self.domain.mem.write(cmd.buffer, bytes(data))
        return len(data)

    def _copy_to(self, cmd: Command) -> int:
        self._check_range(cmd)
        data = self._read_buffer(cmd)
        self.domain.gnttab.copy_to(cmd.domid, cmd.ref, cmd.offset, data)
        return len(data)

    def _map_sum(self, cmd: Command) -> int:
        self._check_range(cmd)
        writable = bool(cmd.flags & FLAG_WRITE)
        data = self._read_buffer(cmd) if writable else b""
        mapping = self.domain.gnttab.map(cmd.domid, cmd.ref, writable)
        try:
            with memoryview(_buffer_of(mapping)) as outer, outer.cast("B") as view:
                if len(view) < PAGE:
                    raise CommandError(Result.EINTERNAL, f"mapping of {len(view)} bytes")
                if writable:
                    view[cmd.offset:cmd.offset + cmd.length] = data
                return fnv1a32(view[cmd.offset:cmd.offset + cmd.length])
        finally:
            _unmap(self.domain.gnttab, mapping)

    # -- event-channel ops ------------------------------------------------------------------
    def _echo(self, port: int) -> None:
        """A notify from the guest on one of our ports: count it and notify straight back."""
        self.echo_counts[port] = self.echo_counts.get(port, 0) + 1
        self.domain.evtchn.notify(port)

    def _evtchn_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, KeyError, LookupError, TypeError) as e:
            raise CommandError(Result.EEVTCHN, str(e)) from None
        except Exception as e:
            if type(e).__name__ in ("HypercallError", "EvtchnError"):
                raise CommandError(Result.EEVTCHN, str(e)) from None
            raise

    def _alloc_echo(self, cmd: Command) -> int:
        holder: list[int] = []
        port = int(self._evtchn_call(self.domain.evtchn.alloc_vmm_port, lambda *_: self._echo(holder[0])))
        holder.append(port)
        self.echo_counts[port] = 0
        return port

    def _bind_echo(self, cmd: Command) -> int:
        port = cmd.port
        self._evtchn_call(self.domain.evtchn.bind_vmm_to_guest_port, port, lambda *_: self._echo(port))
        self.echo_counts[port] = 0
        return port

    def _notify(self, cmd: Command) -> int:
        if cmd.port not in self.echo_counts:
            raise CommandError(Result.EEVTCHN, f"port {cmd.port} is not one of this device's")
        self._evtchn_call(self.domain.evtchn.notify, cmd.port)
        return 0

    def _echo_count(self, cmd: Command) -> int:
        if cmd.port not in self.echo_counts:
            raise CommandError(Result.EEVTCHN, f"port {cmd.port} is not one of this device's")
        return self.echo_counts[cmd.port]


def _buffer_of(mapping: Any) -> Any:
    """The page buffer of a grant mapping (a GrantMapping's ``view``, or the mapping itself)."""
    view = getattr(mapping, "view", None)
    return mapping if view is None or callable(view) else view


def _unmap(gnttab: Any, mapping: Any) -> None:
    """Drop a mapping: its own ``unmap()`` (GrantMapping), else the backend's ``unmap(mapping)``."""
    fn = getattr(mapping, "unmap", None)
    if callable(fn):
        fn()
        return
    fn = getattr(gnttab, "unmap", None)
    if callable(fn):
        fn(mapping)
