"""The boot progress display (xenkvm/bootprogress.py): phases parsed from a recorded console
transcript of make run's guest, the status line's timing with an injected clock, and the
terminal side (drawn and erased on a pty, nothing on a pipe)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
from pathlib import Path

import pytest

from xenkvm.bootprogress import PHASE_TEXT, BootProgress, Phase, StatusLine, elapsed_text, phase_of
from xenkvm.toolstack.console import _update_status

#: What `python -m xenkvm.quickstart` showed on its terminal (tests/linux/test_make_run.py with
#: XENKVM_MAKERUN_TRANSCRIPT, on the PVM host, 2026-12-02: 31 minutes to the shell under load) with the
#: status lines taken out: the launcher's lines, Debian's kernel log on hvc0 (from its 10th second:
#: what came before went to the boot console), the inits' lines, the shell's prompt.
TRANSCRIPT = Path(__file__).parent / "data" / "debian-pvh-console.txt"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recorded_boot_goes_through_every_phase_in_order():
    clock = Clock()
    boot = BootProgress("debian-pvh", clock=clock)
    seen = [boot.phase]
    for line in TRANSCRIPT.read_bytes().splitlines(keepends=True):
        clock.now += 0.5
        boot.feed(line)
        if boot.phase != seen[-1]:
            seen.append(boot.phase)
    assert seen == list(Phase), [p.name for p in seen]
    assert boot.finished and boot.status() is None
    assert [p for p in boot.reached] == list(Phase)
    times = [boot.reached[p] for p in Phase]
    assert times == sorted(times)
    assert "shell ready" in boot.summary() and "kernel started " in boot.summary()


def test_recorded_boot_fed_in_odd_chunks_gives_the_same_phases():
    """Console reads split lines anywhere: the parser keeps the partial line."""
    data = TRANSCRIPT.read_bytes()
    boot = BootProgress("g", clock=Clock())
    for i in range(0, len(data), 7):
        boot.feed(data[i:i + 7])
    assert boot.phase is Phase.SHELL and set(boot.reached) == set(Phase)


def test_status_only_after_a_quiet_stretch_and_at_a_line_start():
    clock = Clock()
    boot = BootProgress("debian-pvh", clock=clock, quiet_after=5.0)
    assert boot.status() is None                          # just started
    clock.now += 6
    assert boot.status() == ("xenkvm: booting debian-pvh, 6s: waiting for the kernel's first message "
                             "(console quiet 6s; Ctrl-] detaches)")
    boot.feed(b"[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org)\r\n")
    assert boot.phase is Phase.KERNEL and boot.status() is None
    clock.now += 4.9
    assert boot.status() is None
    clock.now += 125.1
    assert boot.status() == "xenkvm: booting debian-pvh, 2m16s: kernel started (console quiet 2m10s; Ctrl-] detaches)"
    boot.feed(b"xenkvm-initramfs: waiting for /dev/xvda\r\n/ # partial")
    clock.now += 60
    assert boot.phase is Phase.ROOT_WAIT
    assert boot.status() is None                          # mid-line: drawing would erase "/ # partial"


def test_phases_never_go_back_and_typing_ends_the_display():
    clock = Clock()
    boot = BootProgress("g", clock=clock)
    boot.feed(b"XENKVM-ROOTFS-UP 6.1.0 root=/dev/xvda ext4\n")
    boot.feed(b"[    1.0] Run /init as init process\n")         # an older phase's line (a replay)
    assert boot.phase is Phase.USERSPACE
    boot.user_typed()
    clock.now += 100
    assert boot.finished and boot.status() is None


def test_hostile_console_lines():
    boot = BootProgress("g", clock=Clock())
    boot.feed(b"\xff\xfe\x00" * 10000 + b"Linux version 6\n")    # binary, one very long line: its start counts
    assert boot.phase is Phase.STARTING
    boot.feed(b"Linux version 6 " + b"\xff" * 100000 + b"\n")
    assert boot.phase is Phase.KERNEL
    boot.feed(b"x" * (1 << 20))                                   # no newline at all: bounded
    assert len(boot._partial) <= 4096
    boot.feed(b"")
    assert phase_of(b"nothing to see") is None


@pytest.mark.parametrize("line, phase", [
    (b"[    0.000000] Linux version 6.1.0-57-cloud-amd64", Phase.KERNEL),
    (b"[   10.387042] printk: console [hvc0] enabled", Phase.KERNEL),      # hvc0's first line
    (b"[    0.3] Trying to unpack rootfs image as initramfs...", Phase.INITRAMFS_UNPACK),
    (b"[    0.9] Freeing unused kernel image (initmem) memory: 2528K", Phase.KERNEL_INIT_DONE),
    (b"[    0.9] Run /init as init process", Phase.INITRAMFS_INIT),
    (b"xenkvm-initramfs: waiting for /dev/xvda", Phase.ROOT_WAIT),
    (b"xenkvm-initramfs: /dev/xvda mounted, switching root", Phase.ROOT_MOUNTED),
    (b"XENKVM-ROOTFS-UP 6.1.0-57-cloud-amd64 root=/dev/xvda ext4", Phase.USERSPACE),
    (b"XENKVM-NET-UP eth0 10.87.0.2/24, host 10.87.0.1", Phase.NETWORK),
    (b"XENKVM-SHELL: a shell on hvc0", Phase.SHELL),
])
def test_each_rule(line, phase):
    assert phase_of(line) is phase
    assert PHASE_TEXT[phase]


def test_elapsed_text():
    assert [elapsed_text(s) for s in (0, 59.9, 60, 187, 3600)] == ["0s", "59s", "1m00s", "3m07s", "60m00s"]


def test_status_line_on_a_terminal_is_drawn_and_erased():
    master, slave = pty.openpty()
    try:
        line = StatusLine(slave)
        line.clear()                                   # nothing shown: nothing written
        line.show("xenkvm: booting")
        line.clear()
        line.clear()
        assert os.read(master, 1000) == b"\r\x1b[Kxenkvm: booting\r\x1b[K"
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 20, 0, 0))
        line.show("xenkvm: booting debian-pvh, 2m16s: kernel started")
        assert os.read(master, 1000) == b"\r\x1b[Kxenkvm: booting ..."   # 19 columns: never wraps
    finally:
        os.close(master)
        os.close(slave)


def test_status_line_on_a_pipe_writes_nothing():
    r, w = os.pipe()
    try:
        line = StatusLine(w)
        line.show("xenkvm: booting")
        line.clear()
        os.write(w, b"end")
        assert os.read(r, 1000) == b"end"
    finally:
        os.close(r)
        os.close(w)


def test_console_pump_erases_before_output_and_redraws_when_quiet():
    """console._update_status: output ready -> erased; quiet -> the status text; finished -> erased."""
    class Line:
        def __init__(self):
            self.calls = []

        def show(self, text):
            self.calls.append(("show", text))

        def clear(self):
            self.calls.append(("clear",))

    clock = Clock()
    boot = BootProgress("g", clock=clock)
    line = Line()
    clock.now += 10
    _update_status(boot, line, output_ready=False)
    _update_status(boot, line, output_ready=True)
    boot.feed(b"Linux version 6\n")
    _update_status(boot, line, output_ready=False)     # output just now: nothing to show
    boot.user_typed()
    clock.now += 10
    _update_status(boot, line, output_ready=False)
    assert line.calls[0][0] == "show" and "10s" in line.calls[0][1]
    assert line.calls[1:] == [("clear",), ("clear",), ("clear",)]


def test_console_with_stdin_at_dev_null_shows_the_output(capsys):
    """``make run < /dev/null`` (CI, nohup): epoll refuses /dev/null, so the console shows the
    guest's output without reading input, and ends when the domain does, instead of a traceback."""
    import socket
    from types import SimpleNamespace

    from xenkvm.toolstack.console import _pump
    ours, vmm = socket.socketpair()
    ours.setblocking(False)
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        vmm.sendall(b"guest says hi\n")
        vmm.close()                                    # the domain stopped
        client = SimpleNamespace(sock=ours, send_raw=lambda data: None)
        assert _pump(client, "g", null, w) == 0
        assert os.read(r, 1000) == b"guest says hi\n"
        assert "standard input is not a terminal or pipe" in capsys.readouterr().err
    finally:
        for fd in (r, w, null):
            os.close(fd)
        ours.close()
