"""Who may import whom inside xenkvm/ (docs/architecture.md, "Layers"), read from the source with ``ast``.

Every import is checked, at module level, under ``if TYPE_CHECKING:`` and
inside functions:

* ``xenkvm/kvm`` imports only itself; ``xenkvm/machine`` only itself, ``kvm``
  and ``config``: the machine knows nothing of Xen (not even for types).
* ``xenkvm/xenstore`` imports nothing of xenkvm outside itself.
* ``xenkvm/xen`` imports ``kvm`` only from the trap layer (``xen/traps.py``:
  exits, the MSR filter and KVM_XEN are KVM-specific by nature) and, anywhere,
  under ``if TYPE_CHECKING:`` (type names only, nothing runs).
* ``xenkvm/sharedwords.py`` (tear-free words of pages a guest shares) is a leaf every layer may
  import; it imports nothing of xenkvm.
* No function-level import in ``machine/``, ``kvm/``, ``xen/`` or ``xenstore/``
  (they hide import cycles) except the optional third-party modules in
  :data:`FUNCTION_IMPORTS_ALLOWED`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "xenkvm"

#: xenkvm sub-packages each layer may import (type-only imports included, except where noted)
LEAVES = {"sharedwords"}    #: stdlib-only modules any layer may import
MAY_IMPORT = {
    "kvm": {"kvm"} | LEAVES,
    "machine": {"machine", "kvm", "config"} | LEAVES,
    "xenstore": {"xenstore"} | LEAVES,
    "xen": {"xen", "machine", "config", "xenstore", "kvm"} | LEAVES,   # kvm: see KVM_FROM_XEN
}
#: the cffi build helper, imported by each layer's build script (_build.py, _abi_build.py) when run
BUILD_HELPER = "_cffi_modules"
#: the only xen/ modules that may import xenkvm.kvm at run time (others: TYPE_CHECKING only)
KVM_FROM_XEN = {"xen/traps.py"}
#: (module path, imported module) -> why it is imported inside a function
FUNCTION_IMPORTS_ALLOWED = {
    ("machine/boot/extract.py", "zstandard"): "optional: only zstd-compressed kernels need it",
    ("machine/boot/extract.py", "lz4.block"): "optional: only lz4-compressed kernels need it",
    ("machine/gaps.py", "unicorn"): "heavy and optional: loaded on PVM hosts when a refused instruction is met",
}
CHECKED = ("kvm", "machine", "xen", "xenstore")


@dataclass(frozen=True)
class Import:
    path: str          #: the importing module, relative to xenkvm/
    module: str        #: the absolute module imported
    line: int
    in_function: bool
    type_only: bool    #: under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "type-only" if self.type_only else "module level"
        return f"xenkvm/{self.path}:{self.line}: imports {self.module} ({where})"


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(PKG.parent).with_suffix("").parts)[:-node.level]
    return ".".join(package + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import statement in ``path`` (or in ``source``, as if it were at ``path``) and where it sits."""
    rel = path.relative_to(PKG).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(rel, a.name, child.lineno, in_function, type_only) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(Import(rel, _absolute(child, path), child.lineno, in_function, type_only))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_only)
            else:
                visit(child, in_function, type_only)

    visit(ast.parse(path.read_text() if source is None else source, str(path)), False, False)
    return found


def all_imports() -> list[Import]:
    return [imp for p in sorted(PKG.rglob("*.py")) for imp in imports_of(p)]


def layer(imp: Import) -> str:
    return imp.path.split("/")[0]


def xenkvm_package(module: str) -> str | None:
    """``machine`` for ``xenkvm.machine.memory``; None outside xenkvm."""
    parts = module.split(".")
    if parts[0] != "xenkvm":
        return None
    return parts[1].removesuffix(".py") if len(parts) > 1 else ""


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        target = xenkvm_package(imp.module)
        own = layer(imp)
        if own not in MAY_IMPORT or target is None:
            continue
        if target not in MAY_IMPORT[own] and target != BUILD_HELPER:
            bad.append(f"{imp}: {own}/ may import only {sorted(MAY_IMPORT[own])}")
        elif (own, target) == ("xen", "kvm") and not imp.type_only and imp.path not in KVM_FROM_XEN:
            bad.append(f"{imp}: xen/ imports kvm only in {sorted(KVM_FROM_XEN)} or for types")
    return bad


def function_import_violations(imports: list[Import]) -> list[str]:
    return [f"{imp}: a function-level import (hides a cycle or a cost; move it to the top)"
            for imp in imports
            if imp.in_function and layer(imp) in CHECKED and (imp.path, imp.module) not in FUNCTION_IMPORTS_ALLOWED]


def test_layers_import_only_what_they_may():
    assert layer_violations(all_imports()) == []


def test_no_function_level_imports_in_the_core_packages():
    assert function_import_violations(all_imports()) == []


def test_the_allow_list_has_no_stale_entries():
    imports = {(imp.path, imp.module) for imp in all_imports() if imp.in_function}
    assert set(FUNCTION_IMPORTS_ALLOWED) <= imports


def _parse(rel: str, source: str) -> list[Import]:
    """Imports of a made-up module placed at ``xenkvm/<rel>`` (for the checker's own tests)."""
    return imports_of(PKG / rel, source)


CASES = [
    ("machine/x.py", "from xenkvm.xen.domain import XenDomain\n", "layer"),
    ("machine/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xenkvm.xen import abi\n", "layer"),
    ("machine/devices/x.py", "from ...xen import abi\n", "layer"),
    ("kvm/x.py", "import xenkvm.machine.memory\n", "layer"),
    ("xenstore/x.py", "from xenkvm.config import GuestConfig\n", "layer"),
    ("xen/evtchn/x.py", "from xenkvm.kvm._kvm_cffi import lib\n", "layer"),
    ("xen/x.py", "def f():\n    from xenkvm.xen import abi\n", "function"),
    ("machine/x.py", "class C:\n    def m(self):\n        import os\n", "function"),
]


def test_the_checker_catches_each_kind_of_violation():
    for rel, source, kind in CASES:
        imports = _parse(rel, source)
        check = layer_violations if kind == "layer" else function_import_violations
        assert check(imports), (rel, source)


def test_the_checker_accepts_what_the_rules_allow():
    ok = [("xen/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xenkvm.kvm.vcpu import Vcpu\n"),
          ("xen/traps.py", "from xenkvm.kvm.vm import MsrRange\n"),
          ("machine/x.py", "from xenkvm.kvm.vcpu import Vcpu\nimport numpy\n"),
          ("xenstore/x.py", "from . import store\n")]
    for rel, source in ok:
        imports = _parse(rel, source)
        assert layer_violations(imports) == [] and function_import_violations(imports) == [], rel


def test_leaves_import_nothing_of_xenkvm():
    for leaf in LEAVES:
        path = PKG / f"{leaf}.py"
        assert [str(i) for i in imports_of(path) if i.module.split(".")[0] == "xenkvm"] == []
