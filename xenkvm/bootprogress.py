"""Boot phases read from a Debian guest's console, shown while the console is quiet.

On a PVM host Debian's kernel takes minutes to reach a shell, with long silent
stretches (the kernel's own work under emulated ring 0, the initramfs waiting for
xen-blkfront).  ``xenkvm create -c --progress`` and ``xenkvm console --progress``
(what ``make run`` uses) feed every byte the console shows to :class:`BootProgress`,
which follows the boot through the phases of :data:`RULES` (the kernel's log lines and
the ``xenkvm-initramfs:`` / ``XENKVM-ROOTFS-UP`` / ``XENKVM-NET-UP`` / ``XENKVM-SHELL``
lines of xenkvm/rootfs.py's inits).  When nothing has been printed for
``quiet_after`` seconds, :meth:`BootProgress.status` returns one line such as
``xenkvm: booting debian-pvh, 2m13s: root file system mounted (quiet 12s)`` that
:class:`StatusLine` draws on the terminal's last line and erases before the guest's
next output, so the console is never held up and never garbled.  Once the shell is
up, or the user types, it stays silent: from then on the console is the user's.

The clock is injectable (tests feed a recorded transcript with their own times).
"""
from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xenkvm.rootfs import INITRAMFS_STEP, NET_UP, ROOTFS_MARKER, SHELL_BANNER

#: Seconds without console output before the status line appears.
QUIET_AFTER = 5.0
#: Longest console line kept for matching (a longer one is matched on its start).
MAX_LINE = 4096


class Phase(enum.IntEnum):
    """Where a Debian disk boot is, in the order it goes through them."""

    STARTING = 0
    KERNEL = 1
    INITRAMFS_UNPACK = 2
    KERNEL_INIT_DONE = 3
    INITRAMFS_INIT = 4
    ROOT_WAIT = 5
    ROOT_MOUNTED = 6
    USERSPACE = 7
    NETWORK = 8
    SHELL = 9


PHASE_TEXT = {
    Phase.STARTING: "waiting for the kernel's first message",
    Phase.KERNEL: "kernel started",
    Phase.INITRAMFS_UNPACK: "unpacking the initramfs",
    Phase.KERNEL_INIT_DONE: "kernel initialised",
    Phase.INITRAMFS_INIT: "initramfs /init running",
    Phase.ROOT_WAIT: "waiting for the root disk (xen-blkfront)",
    Phase.ROOT_MOUNTED: "root file system mounted",
    Phase.USERSPACE: "root's /sbin/init running",
    Phase.NETWORK: "network up",
    Phase.SHELL: "shell ready",
}

#: A console line -> the phase it starts (Debian bookworm's 6.1 kernel log; xenkvm/rootfs.py).
RULES: tuple[tuple[Phase, re.Pattern[bytes]], ...] = (
    # hvc0 starts ~10 s of guest time into the boot, after "Linux version" went to the boot
    # console (earlyprintk=xen: the hypervisor log), so any kernel log line counts.
    (Phase.KERNEL, re.compile(rb"Linux version \d|^\[ *\d+\.\d{6}\] ")),
    (Phase.INITRAMFS_UNPACK, re.compile(rb"Trying to unpack rootfs image as initramfs|Unpacking initramfs")),
    (Phase.KERNEL_INIT_DONE, re.compile(rb"Freeing unused kernel image|Write protecting the kernel")),
    (Phase.INITRAMFS_INIT, re.compile(rb"Run /init as init process")),
    (Phase.ROOT_WAIT, re.compile(re.escape(INITRAMFS_STEP.encode()) + rb" waiting for ")),
    (Phase.ROOT_MOUNTED, re.compile(re.escape(INITRAMFS_STEP.encode()) + rb" \S+ mounted|EXT4-fs \(xvda\): mounted")),
    (Phase.USERSPACE, re.compile(re.escape(ROOTFS_MARKER.encode()))),
    (Phase.NETWORK, re.compile(re.escape(NET_UP.encode()))),
    (Phase.SHELL, re.compile(re.escape(SHELL_BANNER.encode()))),
)


def phase_of(line: bytes) -> Phase | None:
    """The latest phase a console line marks the start of, or None (a specific kernel line also
    matches the any-kernel-line rule of Phase.KERNEL: the later phase wins)."""
    for phase, rx in reversed(RULES):
        if rx.search(line):
            return phase
    return None


def elapsed_text(seconds: float) -> str:
    """``42s``, ``3m07s``."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class BootProgress:
    """The boot phase of one console stream and when each phase began (clock seconds)."""

    name: str
    clock: Callable[[], float] = time.monotonic
    quiet_after: float = QUIET_AFTER
    phase: Phase = Phase.STARTING
    reached: dict[Phase, float] = field(default_factory=dict)
    finished: bool = False            #: the shell is up or the user typed: show nothing more
    _start: float = 0.0
    _last_output: float = 0.0
    _partial: bytes = b""

    def __post_init__(self) -> None:
        self._start = self._last_output = self.clock()
        self.reached[Phase.STARTING] = self._start

    def feed(self, data: bytes) -> None:
        """Console output: note the time, advance the phase on each complete line (never back)."""
        if not data:
            return
        self._last_output = self.clock()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-MAX_LINE:]
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        phase = phase_of(line[:MAX_LINE])
        if phase is not None and phase > self.phase:
            self.phase = phase
            self.reached[phase] = self.clock()
            if phase is Phase.SHELL:
                self.finished = True

    def user_typed(self) -> None:
        """The user has the console now: no more status lines."""
        self.finished = True

    def status(self) -> str | None:
        """The status line to show now, or None (output is recent, or the boot is over)."""
        if self.finished or self._partial:     # mid-line: drawing would erase the guest's text
            return None
        now = self.clock()
        quiet = now - self._last_output
        if quiet < self.quiet_after:
            return None
        return (f"xenkvm: booting {self.name}, {elapsed_text(now - self._start)}: {PHASE_TEXT[self.phase]} "
                f"(console quiet {elapsed_text(quiet)}; Ctrl-] detaches)")

    def summary(self) -> str:
        """Each phase reached with its time since the start, e.g. for a log line."""
        return ", ".join(f"{PHASE_TEXT[p]} {self.reached[p] - self._start:.1f}s"
                         for p in sorted(self.reached) if p is not Phase.STARTING)


class StatusLine:
    """One status line on a terminal, below the console output: drawn with ``\\r`` and erased
    (``\\r`` + erase-line) before anything else is written, so it never mixes with the guest's
    output.  On a descriptor that is not a terminal it does nothing."""

    ERASE = b"\r\x1b[K"

    def __init__(self, fd: int):
        self.fd = fd
        self.enabled = os.isatty(fd)
        self.shown = False

    def show(self, text: str) -> None:
        """Draw ``text``, cut to the terminal's width: a wrapped line could not be erased."""
        if self.enabled:
            try:
                width = os.get_terminal_size(self.fd).columns
            except OSError:
                width = 80
            if width > 1 and len(text) >= width:
                text = text[:width - 4] + "..."
            os.write(self.fd, self.ERASE + text.encode(errors="replace"))
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            os.write(self.fd, self.ERASE)
            self.shown = False
