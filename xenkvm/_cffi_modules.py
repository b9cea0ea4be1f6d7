"""The project's cffi API-mode extensions, and building them in place.

setup.py compiles these at install time (``pip install -e .`` does it for a
checkout); ``python -m xenkvm._cffi_modules`` rebuilds them in the source
tree after a header or cdef change, without reinstalling.
"""
from __future__ import annotations

import importlib
import pathlib
import sys

#: "path/to/builder.py:ffibuilder" entries, as setuptools' cffi_modules wants them.
CFFI_MODULES = [
    "xenkvm/kvm/_build.py:ffibuilder",
    "xenkvm/machine/boot/_abi_build.py:ffibuilder",
    "xenkvm/xen/_abi_build.py:ffibuilder",
    "xenkvm/backends/_blkif_build.py:ffibuilder",
    "xenkvm/backends/_netif_build.py:ffibuilder",
    "xenkvm/backends/_nbd_build.py:ffibuilder",
    "xenkvm/xen/_fast_build.py:ffibuilder",
]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_inplace(ffibuilder) -> pathlib.Path:
    """Compile one builder's extension into its package directory."""
    module = ffibuilder._assigned_source[0]  # e.g. "xenkvm.kvm._kvm_cffi"
    tmp = ROOT / "build" / "cffi" / module
    tmp.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(ffibuilder.compile(tmpdir=str(tmp), verbose=False))
    dest = ROOT.joinpath(*module.split(".")[:-1]) / out.name
    dest.write_bytes(out.read_bytes())
    return dest


def main() -> int:
    for entry in CFFI_MODULES:
        path = entry.split(":")[0]
        builder = importlib.import_module(path[:-3].replace("/", "."))
        print(build_inplace(builder.ffibuilder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
