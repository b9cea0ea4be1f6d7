"""``xenkvm console NAME``: the terminal joined to a domain's console, as ``xl console``.

The terminal goes into raw mode (stdin.raw_attrs: no echo, no signals, output
processing kept) and is restored on every way out; Ctrl-] (0x1d) detaches and
leaves the domain running.  Output is the VMM's replay of recent console
output, then whatever the guest prints.  With ``progress`` (``--progress``,
``make run``) a quiet console gets a status line with the boot phase
(xenkvm/bootprogress.py), checked once a second between reads.
"""
from __future__ import annotations

import os
import selectors
import sys
import termios

from xenkvm.bootprogress import BootProgress, StatusLine
from xenkvm.config import ConfigError
from xenkvm.machine.devices.stdin import ESCAPE, raw_attrs
from xenkvm.toolstack.client import ControlClient


PROGRESS_TICK = 1.0     #: seconds between status line updates while the console is quiet


def attach(control_path, name: str, stdin: int = 0, stdout: int = 1, progress: bool = False) -> int:
    """Copy bytes both ways until Ctrl-] (0) or the domain goes away (0 as well, with a line);
    ``progress``: the boot phase on a status line while the console is quiet."""
    try:
        client = ControlClient(str(control_path), timeout=10.0)
    except OSError:
        raise ConfigError(f"{name}: its VMM is not running") from None
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        termios.tcsetattr(stdin, termios.TCSADRAIN, raw_attrs(saved))
    try:
        with client:
            boot = BootProgress(name) if progress else None
            status = StatusLine(2 if os.isatty(2) else stdout) if progress else None
            head = client.attach_console()
            if head:
                os.write(stdout, head)
                if boot is not None:
                    boot.feed(head)
            client.sock.setblocking(False)
            try:
                return _pump(client, name, stdin, stdout, boot, status)
            finally:
                if status is not None:
                    status.clear()
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _pump(client: ControlClient, name: str, stdin: int, stdout: int,
          boot: BootProgress | None = None, status: StatusLine | None = None) -> int:
    with selectors.DefaultSelector() as sel:
        sel.register(client.sock, selectors.EVENT_READ, "guest")
        try:
            sel.register(stdin, selectors.EVENT_READ, "user")
        except PermissionError:    # /dev/null or a regular file (nohup, CI): epoll refuses it
            print(f"xenkvm: {name}: standard input is not a terminal or pipe: output only",
                  file=sys.stderr)
        while True:
            ready = sel.select(PROGRESS_TICK if boot is not None and not boot.finished else None)
            if boot is not None and status is not None:
                _update_status(boot, status, bool(ready))
            for key, _ in ready:
                if key.data == "guest":
                    try:
                        data = client.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        print(f"\r\nxenkvm: {name}: console closed (the domain stopped)", file=sys.stderr)
                        return 0
                    os.write(stdout, data)
                    if boot is not None:
                        boot.feed(data)
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        sel.unregister(stdin)      # EOF: keep showing output until the domain goes
                        continue
                    if boot is not None:
                        boot.user_typed()
                    if ESCAPE in data:
                        head = data[:data.index(ESCAPE)]
                        if head:
                            client.sock.setblocking(True)
                            client.send_raw(head)
                        return 0
                    client.sock.setblocking(True)
                    client.send_raw(data)
                    client.sock.setblocking(False)


def _update_status(boot: BootProgress, status: StatusLine, output_ready: bool) -> None:
    """Erase the status line before any output; redraw it while the console stays quiet."""
    if output_ready or boot.finished:
        status.clear()
        return
    text = boot.status()
    if text is None:
        status.clear()
    else:
        status.show(text)
