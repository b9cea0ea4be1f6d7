"""A minimal QMP client: enough to look at a silent L1 and poke it (docs/hw-rig.md, "A silent L1").

QMP is QEMU's JSON monitor protocol: a greeting, ``qmp_capabilities`` to leave negotiation
mode, then one JSON object per line each way; asynchronous events (``{"event": ...}``) may
come between a command and its reply and are skipped here.
"""
from __future__ import annotations

import bisect
import json
import re
import socket
from pathlib import Path


class QmpError(RuntimeError):
    """No QMP answer, or QEMU refused the command: one line."""


class Qmp:
    """One QMP connection to a running QEMU (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise QmpError(f"no QMP socket at {path}: {e.strerror or e}") from None
        self._buf = b""
        try:
            if "QMP" not in self._message():
                raise QmpError("the QMP greeting has no QMP key")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self) -> dict:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QmpError(f"QMP read failed: {e}") from None
            if not chunk:
                raise QmpError("QEMU closed the QMP connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP sent something that is not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError("QMP sent a JSON value that is not an object")
        return msg

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; its ``return`` value, or :class:`QmpError` with QEMU's ``desc``."""
        req: dict[str, object] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP write failed: {e}") from None
        while True:
            msg = self._message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QmpError(f"QEMU refused {command}: {desc}")
            # an event: not ours

    def hmp(self, command_line: str) -> str:
        """An HMP command (``info registers``...) through QMP; its text."""
        out = self.execute("human-monitor-command", **{"command-line": command_line})
        return out if isinstance(out, str) else str(out)


_RIP = re.compile(r"\bRIP=([0-9a-fA-F]{16})")
_CPL = re.compile(r"\bCPL=(\d)")


def registers_rip(text: str) -> tuple[int, int | None] | None:
    """RIP and CPL from ``info registers`` text, or None when it has no RIP."""
    m = _RIP.search(text)
    if m is None:
        return None
    cpl = _CPL.search(text)
    return int(m.group(1), 16), (int(cpl.group(1)) if cpl else None)


class SymbolMap:
    """``/proc/kallsyms`` or ``System.map`` (``address type name``): the kernel text symbol at or
    before an address (KASLR off: ``nokaslr``)."""

    def __init__(self, text: str):
        pairs = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                try:
                    pairs.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    @classmethod
    def load(cls, path: Path | None) -> "SymbolMap":
        try:
            return cls(path.read_text(errors="replace") if path is not None else "")
        except OSError:
            return cls("")

    def name(self, addr: int) -> str | None:
        """``symbol+0xoff`` for a kernel text address, None outside what the map knows."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or addr - self._addrs[i] > 0x100000:
            return None
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"
