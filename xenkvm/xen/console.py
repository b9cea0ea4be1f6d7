"""The guest's two Xen consoles: the primary console ring and the hypervisor console.

The primary console ring (the guest's PV console, Linux ``hvc0``) goes to the
machine's console sink (``console:``).  The hypervisor console is what the
guest writes with ``console_io`` (Linux ``earlyprintk=xen``): in Xen it is
Xen's own console, what ``xl dmesg`` shows, so here it goes to a sink of its
own (``xen.hypervisor_log``), never mixed into the guest console.

Host keystrokes go to one console only; the rule is in ``devices/stdin.py``
(``StdinReader.route``): the ring once the guest has used it, else the
console_io read queue once the guest has read it, else the UART.

The primary console: ``struct xencons_interface`` in a special page.

The guest (Linux ``hvc_xen``) finds the page and its event channel in
``HVM_PARAM_CONSOLE_PFN`` / ``HVM_PARAM_CONSOLE_EVTCHN``.  Output: it copies
bytes into ``out[]``, advances ``out_prod`` and sends on the port; we copy
``out[out_cons..out_prod)`` to the machine's console sink, advance ``out_cons``
and notify back (a guest with a full ring waits for that).  Input: host
keystrokes go into ``in[]`` up to the free space, ``in_prod`` advances and the
guest is notified; what does not fit waits here until the guest consumes.

Indices are free-running u32s written by the guest and therefore hostile: a
ring whose ``prod - cons`` exceeds its size is marked broken (logged once) and
ignored from then on; every access is masked into the page.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from xenkvm.config import ConfigError
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.sharedwords import Words
from xenkvm.xen.abi import HvmParam, ffi

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
_MASK = 0xFFFFFFFF
#: Host input held back while the guest's in[] is full; beyond it, input is dropped.
PENDING_MAX = 64 * 1024


@dataclass(frozen=True)
class ConsLayout:
    """Offsets and sizes of ``struct xencons_interface`` (from the compiled header)."""

    in_off: int
    in_size: int
    out_off: int
    out_size: int
    in_cons: int
    in_prod: int
    out_cons: int
    out_prod: int

    @classmethod
    def from_abi(cls) -> "ConsLayout":
        ctype = "struct xencons_interface"
        fields = dict(ffi.typeof(ctype).fields)
        off = lambda name: ffi.offsetof(ctype, name)  # noqa: E731
        return cls(off("in"), fields["in"].type.length, off("out"), fields["out"].type.length,
                   off("in_cons"), off("in_prod"), off("out_cons"), off("out_prod"))


LAYOUT = ConsLayout.from_abi()


class RingBroken(Exception):
    """The guest put impossible indices in the ring."""


class ConsoleRing:
    """Host side of one ``xencons_interface`` page (no locking, no event channels)."""

    def __init__(self, page: memoryview, layout: ConsLayout = LAYOUT):
        page = memoryview(page)
        if page.format != "B" or page.ndim != 1:
            page = page.cast("B")
        if page.readonly or page.nbytes < PAGE_SIZE or layout.out_prod + 4 > PAGE_SIZE:
            raise ValueError("console ring needs one writable 4096-byte page")
        self.page = page
        self._words = Words(page[:PAGE_SIZE])   # indexes read and written whole (sharedwords.py)
        self.lay = layout

    def _u32(self, off: int) -> int:
        return self._words.get(off)

    def _set_u32(self, off: int, value: int) -> None:
        self._words.set(off, value)

    @property
    def out_used(self) -> int:
        return (self._u32(self.lay.out_prod) - self._u32(self.lay.out_cons)) & _MASK

    def take_output(self) -> bytes:
        """Everything the guest produced since the last call; advances ``out_cons``."""
        lay = self.lay
        cons, prod = self._u32(lay.out_cons), self._u32(lay.out_prod)
        used = (prod - cons) & _MASK
        if used > lay.out_size:
            raise RingBroken(f"out_cons={cons:#x} out_prod={prod:#x}")
        if not used:
            return b""
        data = _read_wrapped(self.page, lay.out_off, lay.out_size, cons, used)
        self._set_u32(lay.out_cons, cons + used)
        return data

    def put_input(self, data: bytes) -> int:
        """Copy as much of ``data`` into ``in[]`` as fits; returns the count written."""
        lay = self.lay
        cons, prod = self._u32(lay.in_cons), self._u32(lay.in_prod)
        used = (prod - cons) & _MASK
        if used > lay.in_size:
            raise RingBroken(f"in_cons={cons:#x} in_prod={prod:#x}")
        count = min(len(data), lay.in_size - used)
        if count:
            _write_wrapped(self.page, lay.in_off, lay.in_size, prod, data[:count])
            # Data before index: the guest reads in_prod, then the bytes.
            self._set_u32(lay.in_prod, prod + count)
        return count


def _read_wrapped(page: memoryview, base: int, size: int, index: int, count: int) -> bytes:
    start = index % size
    first = min(count, size - start)
    data = bytes(page[base + start:base + start + first])
    if count > first:
        data += bytes(page[base:base + count - first])
    return data


def _write_wrapped(page: memoryview, base: int, size: int, index: int, data: bytes) -> None:
    start = index % size
    first = min(len(data), size - start)
    page[base + start:base + start + first] = data[:first]
    if len(data) > first:
        page[base:base + len(data) - first] = data[first:]


class PrimaryConsole:
    """The domain's primary console ring, wired to the machine console and host input."""

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self.sink = domain.machine.console
        gpa = domain.params[HvmParam.CONSOLE_PFN] << 12
        self.gfn = gpa >> 12
        self.ring = ConsoleRing(domain.mem.view(gpa, PAGE_SIZE))
        self._lock = threading.Lock()
        self._pending = bytearray()
        self.broken: str | None = None
        #: the guest has used this ring (sent on its port): host keystrokes go here
        self.connected = False
        self.port = domain.evtchn.alloc_vmm_port(self.on_guest_notify)
        domain.params[HvmParam.CONSOLE_EVTCHN] = self.port
        log.debug("primary console: gfn %#x, port %d", self.gfn, self.port)

    @classmethod
    def attach(cls, domain: "XenDomain") -> "PrimaryConsole":
        """Create the console for ``domain`` (call from ``XenDomain._build_services``)."""
        return cls(domain)

    # -- guest -> host ---------------------------------------------------------
    def on_guest_notify(self) -> None:
        """The guest sent on the console port (I/O thread): drain out[], refill in[].

        Any send marks the ring connected, a guest that only reads (hvc_xen
        notifies after consuming in[]) included.
        """
        self.connected = True
        with self._lock:
            out = self._guarded(self.ring.take_output)
            wrote = self._fill_input_locked()
        if out:
            self.sink.write(out)
        if out or wrote:
            self._notify()

    # -- host -> guest ----------------------------------------------------------
    def push_input(self, data: bytes) -> int:
        """Queue host keystrokes for the guest; returns how many were accepted."""
        with self._lock:
            room = PENDING_MAX - len(self._pending)
            accepted = min(room, len(data))
            self._pending += data[:accepted]
            wrote = self._fill_input_locked()
        if wrote:
            self._notify()
        return accepted

    @property
    def pending_input(self) -> int:
        """Bytes of host input waiting for room in the guest's in[]."""
        return len(self._pending)

    def _fill_input_locked(self) -> int:
        if not self._pending or self.broken:
            return 0
        chunk = bytes(self._pending[:self.ring.lay.in_size])
        count = self._guarded(lambda: self.ring.put_input(chunk)) or 0
        del self._pending[:count]
        return count

    def _guarded(self, fn):
        """Run a ring access; a hostile index marks the ring broken (logged once)."""
        if self.broken:
            return None
        try:
            return fn()
        except RingBroken as e:
            self.broken = str(e)
            self._pending.clear()
            log.error("dom%d: primary console ring broken (%s); ignoring it from now on",
                      self.domain.domid, e)
            return None

    def _notify(self) -> None:
        self.domain.evtchn.notify(self.port)

    def close(self) -> None:
        """Nothing to release: the page belongs to the domain's special region."""


#: Xen prints its console lines with this prefix (``(XEN) ``), as on a Xen host's serial line.
XEN_PREFIX = b"(XEN) "


class _FdWriter:
    """Unbuffered writes to a descriptor we do not own (stderr): nothing to close, nothing held back."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return              # stderr closed: the log has nowhere to go

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """The descriptor is not ours."""


class HypervisorLog:
    """Where console_io output goes: stderr with each line prefixed, a file, or nowhere.

    ``sink`` keeps the recent (unprefixed) output, as the guest console's sink
    does, for tests and reports.
    """

    def __init__(self, out: BinaryIO | None, prefix: bytes = b""):
        self._out = out
        self.prefix = prefix
        self.sink = ConsoleSink(out if not prefix else None)
        self._line_start = True
        self._lock = threading.Lock()

    @classmethod
    def open(cls, spec: str) -> "HypervisorLog":
        """``stderr``, ``none`` or ``file:PATH`` (validated by ``config.parse_hypervisor_log``)."""
        if spec == "stderr":
            return cls(_FdWriter(2), XEN_PREFIX)
        if spec == "none":
            return cls(None)
        if spec.startswith("file:"):
            try:
                return cls(open(spec[5:], "ab", buffering=0))
            except OSError as e:
                raise ConfigError(f"xen.hypervisor_log: cannot open {spec[5:]}: {e.strerror}") from None
        raise ConfigError(f"xen.hypervisor_log: expected stderr, none or file:PATH, got {spec!r}")

    def write(self, data: bytes) -> None:
        """Log what the guest wrote; with a prefix, every line starts with it."""
        if not data:
            return
        if not self.prefix:
            self.sink.write(data)
            return
        with self._lock:
            body = data[:-1].replace(b"\n", b"\n" + self.prefix) + data[-1:]
            out = (self.prefix if self._line_start else b"") + body
            self._line_start = data.endswith(b"\n")
            self.sink.write(data)
            if self._out is not None:
                self._out.write(out)

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()


class ConsoleIo:
    """The guest's hypervisor console: console_io writes to ``log``, reads from ``input``.

    ``reading`` records that the guest has issued CONSOLEIO_read: until its
    ring is connected, host keystrokes go to this queue.
    """

    def __init__(self, log_: HypervisorLog, input_queue):
        self.log = log_
        self.input = input_queue
        self.reading = False

    def write(self, data: bytes) -> None:
        self.log.write(data)

    def read(self, count: int) -> bytes:
        self.reading = True
        return self.input.take(count)

    def push_input(self, data: bytes) -> int:
        return self.input.push(data)
