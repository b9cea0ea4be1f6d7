"""Kernel modules of an unpacked Debian kernel package, with their dependencies.

Debian's ``linux-image-*`` packages ship ``lib/modules/<abi>/kernel/**/*.ko`` but
no ``modules.dep`` (``depmod`` writes it at install time), so the load order is
worked out here from each module's own ``.modinfo`` ELF section: NUL-separated
``key=value`` strings, of which ``depends=`` lists the modules whose symbols it
uses (comma-separated, possibly empty).  Names compare with ``-`` and ``_`` as
one, as the kernel's module loader does.
"""
from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

_SUFFIXES = (".ko", ".ko.xz")


class ModuleError(RuntimeError):
    """A module that cannot be found, read or ordered."""


def canonical(name: str) -> str:
    """The module name the kernel uses: ``kvm-amd`` and ``kvm_amd`` are one module."""
    return name.replace("-", "_")


def _section(elf: bytes, wanted: str) -> bytes | None:
    """The contents of ELF64 section ``wanted``, or None if there is none."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2:
        raise ModuleError("not an ELF64 object")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shoff == 0 or shentsize < 64 or shoff + shnum * shentsize > len(elf) or shstrndx >= shnum:
        raise ModuleError("ELF section table out of bounds")

    def header(i: int) -> tuple[int, int, int]:
        name, _, _, _, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, strsize = header(shstrndx)
    for i in range(shnum):
        name, off, size = header(i)
        end = elf.find(b"\0", stroff + name, stroff + strsize)
        if end >= 0 and elf[stroff + name:end].decode(errors="replace") == wanted:
            if off + size > len(elf):
                raise ModuleError(f"section {wanted} out of bounds")
            return elf[off:off + size]
    return None


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` (the last value of a repeated key)."""
    raw = _section(elf, ".modinfo")
    if raw is None:
        raise ModuleError("no .modinfo section")
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            out[key] = value
    return out


def depends(elf: bytes) -> list[str]:
    """The canonical names a module depends on (``depends=`` of its ``.modinfo``)."""
    value = modinfo(elf).get("depends", "")
    return [canonical(d) for d in value.split(",") if d]


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes (``.ko.xz`` decompressed)."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    elf: bytes


class ModuleTree:
    """The ``.ko`` files below one ``lib/modules/<abi>`` directory, by canonical name."""

    def __init__(self, moddir: Path):
        self.moddir = moddir
        self._paths: dict[str, Path] = {}
        for p in sorted(moddir.rglob("*.ko*")):
            for suffix in _SUFFIXES:
                if p.name.endswith(suffix):
                    self._paths.setdefault(canonical(p.name[:-len(suffix)]), p)
        builtin = moddir / "modules.builtin"
        self.builtin = {canonical(Path(line.strip()).name.removesuffix(".ko"))
                        for line in (builtin.read_text().splitlines() if builtin.is_file() else []) if line.strip()}

    def load_order(self, wanted: list[str]) -> list[Module]:
        """``wanted`` and everything they depend on, dependencies first, each once.

        A name built into the kernel (``modules.builtin``) needs no loading; a name
        neither built in nor present is an error, as is a dependency cycle.
        """
        order: list[Module] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = canonical(name)
            if name in done:
                return
            if name in chain:
                raise ModuleError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            path = self._paths.get(name)
            if path is None:
                if name in self.builtin:
                    done.add(name)
                    return
                raise ModuleError(f"kernel module {name} not found below {self.moddir}")
            elf = read_module(path)
            for dep in depends(elf):
                visit(dep, (*chain, name))
            done.add(name)
            order.append(Module(name, path, elf))

        for w in wanted:
            visit(w, ())
        return order
