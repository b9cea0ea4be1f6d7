"""Where guest console bytes go (stdout, a file, nowhere) and where input comes from.

The sink also keeps the last lines written, so a crash report or a test can
quote what the guest printed last.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import BinaryIO, Callable


class ConsoleSink:
    """A thread-safe byte sink with a bounded tail of recent output."""

    def __init__(self, out: BinaryIO | None, tail_bytes: int = 64 * 1024):
        self._out = out
        self._lock = threading.Lock()
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_len = 0
        self._tail_max = tail_bytes
        self._listeners: list[Callable[[bytes], None]] = []

    def add_listener(self, fn: Callable[[bytes], None]) -> None:
        """Call ``fn`` with every chunk written (e.g. to watch for a marker)."""
        self._listeners.append(fn)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._out is not None:
                self._out.write(data)
                if b"\n" in data or len(data) > 1:
                    self._out.flush()
            self._tail.append(data)
            self._tail_len += len(data)
            while self._tail_len > self._tail_max and len(self._tail) > 1:
                self._tail_len -= len(self._tail.popleft())
        for fn in self._listeners:
            fn(data)

    def flush(self) -> None:
        with self._lock:
            if self._out is not None:
                self._out.flush()

    def tail(self) -> bytes:
        with self._lock:
            return b"".join(self._tail)

    def last_lines(self, n: int) -> list[str]:
        text = self.tail().decode("utf-8", "replace").replace("\r", "")
        return text.splitlines()[-n:]


def open_sink(spec: str) -> ConsoleSink:
    """``stdio`` (the terminal), ``none``, or ``file:PATH``."""
    if spec == "stdio":
        return ConsoleSink(os.fdopen(os.dup(1), "wb", buffering=0))
    if spec == "none":
        return ConsoleSink(None)
    if spec.startswith("file:"):
        return ConsoleSink(open(spec[5:], "ab", buffering=0))
    raise ValueError(f"console {spec!r}: expected stdio, none or file:PATH")
