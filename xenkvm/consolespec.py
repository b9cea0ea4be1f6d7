"""Extra PV consoles of the guest definition (``consoles:``), parsed and checked.

    consoles:
      - {backend: pty}                          # a host pty; its path is logged and written as `tty`
      - {backend: file, path: logs/c2.log}      # appended to a file (relative to the YAML file)
      - "pty"                                   # the same as strings, xl-like
      - "backend=file, path=/var/log/c3.log"
      - "file:/var/log/c4.log"

The n-th entry is ``device/console/<n+1>`` (console 0 is the primary console,
``console:``, unchanged).  Every problem is a ConfigError naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xenkvm.config import ConfigError

MAX_CONSOLES = 16


@dataclass(frozen=True)
class ConsoleSpec:
    """One extra console: ``devid`` >= 1, a pty or a log file."""

    devid: int
    backend: str                  #: "pty" or "file"
    path: Path | None = None


def _keys(value: object) -> dict:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"consoles: expected {{backend: pty}}, {{backend: file, path: P}} or 'pty', got {value!r}")
    text = value.strip()
    if text == "pty":
        return {"backend": "pty"}
    if text.startswith("file:"):
        return {"backend": "file", "path": text[5:]}
    keys: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"consoles: {item!r} is not key=value in {value!r}")
        keys[k.strip()] = v.strip()
    return keys


def parse_console(value: object, devid: int, base: Path) -> ConsoleSpec:
    keys = _keys(value)
    unknown = sorted(set(keys) - {"backend", "path"})
    if unknown:
        raise ConfigError(f"consoles: unknown key {unknown[0]!r} in {value!r} (known: backend, path)")
    backend = keys.get("backend")
    if backend == "pty":
        if "path" in keys:
            raise ConfigError("consoles: 'path' is for backend file (a pty's path is chosen by the host)")
        return ConsoleSpec(devid, "pty")
    if backend != "file":
        raise ConfigError(f"consoles: backend={backend!r}: expected pty or file")
    raw = keys.get("path")
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ConfigError(f"consoles: backend file needs 'path', got {raw!r}")
    p = Path(raw).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.parent.is_dir():
        raise ConfigError(f"consoles: path {str(p)!r}: no such directory")
    return ConsoleSpec(devid, "file", p)


def parse_consoles(value: object, base: Path) -> tuple[ConsoleSpec, ...]:
    """The ``consoles:`` list: device/console/1, 2, ..."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"consoles: expected a list, got {value!r}")
    if len(value) > MAX_CONSOLES:
        raise ConfigError(f"consoles: at most {MAX_CONSOLES} extra consoles")
    return tuple(parse_console(v, i + 1, base) for i, v in enumerate(value))
