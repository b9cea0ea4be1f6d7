"""Host keystrokes into the guest: stdin read on the I/O thread, routed to the active console.

With ``console: stdio`` and a terminal on stdin, the terminal goes into raw
mode (no echo, no line editing, no signals: Ctrl-C reaches the guest) with
output post-processing kept, as QEMU's stdio chardev does; it is restored on
close, at interpreter exit and on SIGTERM/SIGHUP.  Ctrl-] (0x1d) ends the run
with ``ExitStatus.INTERRUPTED``, like ``virsh console``.

Each byte goes to exactly one console, the one the guest takes input from
(``StdinReader.route``): the first machine extension's ``input_sink()`` that
names one (Xen: its primary console ring once the guest has used it, else its
``console_io`` read queue once the guest has issued CONSOLEIO_read), else the
16550 UART.  When stdin is not a terminal (a pipe, a file, a test) it
is read the same way without raw mode and without the escape byte; EOF stops
reading, not the VM.  The descriptor's O_NONBLOCK flag is never changed (it is
shared with whoever else holds stdin): the I/O thread reads only when the
selector says the descriptor is readable, and descriptors epoll refuses
(regular files, /dev/null) are read by a small helper thread instead.
"""
from __future__ import annotations

import atexit
import logging
import os
import selectors
import signal
import termios
import threading
from typing import TYPE_CHECKING

from xenkvm.machine.status import ExitStatus

if TYPE_CHECKING:
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

ESCAPE = 0x1D          #: Ctrl-]
READ_SIZE = 4096
_AUTO = object()
_RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def raw_attrs(attrs: list) -> list:
    """Terminal attributes for raw input with output processing left on (QEMU's choice)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def pollable(fd: int) -> bool:
    """Whether the selector accepts ``fd`` (epoll refuses regular files and /dev/null)."""
    with selectors.DefaultSelector() as sel:
        try:
            sel.register(fd, selectors.EVENT_READ)
        except (PermissionError, OSError, ValueError):
            return False
    return True


class StdinReader:
    """Reads host input and hands it to the guest's active console."""

    def __init__(self, machine: "Machine", fd: int = 0, *, escape: int | None | object = _AUTO):
        self.machine = machine
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self.escape: int | None = (ESCAPE if self.is_tty else None) if escape is _AUTO else escape  # type: ignore[assignment]
        self._saved_attrs: list | None = None
        self._old_handlers: dict[int, object] = {}
        self._reading = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._escaped = False

    @classmethod
    def attach(cls, machine: "Machine", fd: int = 0) -> "StdinReader | None":
        """Start reading if the console is ``stdio`` (call from ``Machine.run`` after ``io.start``)."""
        if machine.cfg.console != "stdio":
            return None
        reader = cls(machine, fd)
        reader.start()
        return reader

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if self.is_tty:
            self._enter_raw()
        self._reading = True
        if pollable(self.fd):
            self.machine.io.add_reader(self.fd, self._on_readable)
        else:
            self._thread = threading.Thread(target=self._read_blocking, name="stdin", daemon=True)
            self._thread.start()
        log.debug("stdin: reading fd %d (%s)", self.fd, "raw terminal" if self.is_tty else "not a terminal")

    def close(self) -> None:
        """Stop reading and give the terminal back as it was (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self.restore_terminal()
        for signum, handler in self._old_handlers.items():
            try:
                signal.signal(signum, handler)  # type: ignore[arg-type]
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        atexit.unregister(self.restore_terminal)

    def restore_terminal(self) -> None:
        attrs, self._saved_attrs = self._saved_attrs, None
        if attrs is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)
            except (termios.error, OSError):
                pass

    def _enter_raw(self) -> None:
        try:
            saved = termios.tcgetattr(self.fd)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, raw_attrs(saved))
        except termios.error as e:
            log.warning("stdin: cannot enter raw mode: %s", e)
            return
        self._saved_attrs = saved
        atexit.register(self.restore_terminal)
        for signum in _RESTORE_SIGNALS:
            try:
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:   # not the main thread: atexit and close() still restore
                break

    def _on_signal(self, signum: int, frame: object) -> None:
        self.restore_terminal()
        self.machine.stop(ExitStatus.INTERRUPTED, f"interrupted ({signal.Signals(signum).name})")

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self._thread is None:
                self.machine.io.remove_reader(self.fd)

    # -- reading (I/O thread) ----------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:   # EIO: the terminal hung up
            log.debug("stdin: %s; no more input", e)
            data = b""
        if not data:
            self._stop_reading()
            return
        self.feed(data)

    def _read_blocking(self) -> None:
        while self._reading:
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError as e:
                log.debug("stdin: %s; no more input", e)
                break
            if not data:
                break
            self.machine.io.call_soon(lambda d=data: self.feed(d))
        self._reading = False

    def feed(self, data: bytes) -> None:
        """Route ``data`` to the guest; the escape byte ends the run (what precedes it is sent)."""
        if self._closed or self._escaped:
            return
        if self.escape is not None and self.escape in data:
            head = data[:data.index(self.escape)]
            if head:
                self.route(head)
            self._escaped = True
            self._stop_reading()
            self.restore_terminal()
            self.machine.stop(ExitStatus.INTERRUPTED, "console closed (Ctrl-])")
            return
        self.route(data)

    def route(self, data: bytes) -> None:
        """Deliver ``data`` once, to the console the guest reads input from.

        1. the console an attached extension names (``input_sink``; Xen's
           ring once connected, else its CONSOLEIO_read queue once read);
        2. else the 16550 UART (every guest, Xen or not, that uses neither).
        """
        target = self.input_target()
        accepted = target.push_input(data)
        if accepted < len(data):
            log.debug("stdin: guest input full, %d bytes dropped", len(data) - accepted)

    def input_target(self):
        """The console that gets host input now (see ``route``)."""
        for ext in self.machine.extensions:
            sink = ext.input_sink()
            if sink is not None:
                return sink
        return self.machine.serial
