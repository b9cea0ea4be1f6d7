"""``xenkvm console NAME``: the terminal joined to a domain's console, as ``xl console``.

The terminal goes into raw mode (stdin.raw_attrs: no echo, no signals, output
processing kept) and is restored on every way out; Ctrl-] (0x1d) detaches and
leaves the domain running.  Output is the VMM's replay of recent console
output, then whatever the guest prints.
"""
from __future__ import annotations

import os
import selectors
import sys
import termios

from xenkvm.config import ConfigError
from xenkvm.machine.devices.stdin import ESCAPE, raw_attrs
from xenkvm.toolstack.client import ControlClient


def attach(control_path, name: str, stdin: int = 0, stdout: int = 1) -> int:
    """Copy bytes both ways until Ctrl-] (0) or the domain goes away (0 as well, with a line)."""
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
            head = client.attach_console()
            if head:
                os.write(stdout, head)
            client.sock.setblocking(False)
            return _pump(client, name, stdin, stdout)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _pump(client: ControlClient, name: str, stdin: int, stdout: int) -> int:
    with selectors.DefaultSelector() as sel:
        sel.register(client.sock, selectors.EVENT_READ, "guest")
        sel.register(stdin, selectors.EVENT_READ, "user")
        while True:
            for key, _ in sel.select():
                if key.data == "guest":
                    try:
                        data = client.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        print(f"\r\nxenkvm: {name}: console closed (the domain stopped)", file=sys.stderr)
                        return 0
                    os.write(stdout, data)
                else:
                    data = os.read(stdin, 4096)
                    if not data:
                        sel.unregister(stdin)      # EOF: keep showing output until the domain goes
                        continue
                    if ESCAPE in data:
                        head = data[:data.index(ESCAPE)]
                        if head:
                            client.sock.setblocking(True)
                            client.send_raw(head)
                        return 0
                    client.sock.setblocking(True)
                    client.send_raw(data)
                    client.sock.setblocking(False)
