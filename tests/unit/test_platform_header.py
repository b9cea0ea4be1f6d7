"""firmware/include/platform.h must agree with xenkvm/machine/layout.py.

The freestanding test guests hard-code the platform contract in C; this test
parses every ``#define XK_<NAME> <literal>`` in the header and checks it
against ``layout.<NAME>``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from xenkvm.machine import layout

HEADER = Path(__file__).resolve().parents[2] / "firmware" / "include" / "platform.h"

_DEFINE = re.compile(r"^\s*#\s*define\s+(XK_\w+)\s+(.*?)\s*$")
_LITERAL = re.compile(r"^\(?\s*(0[xX][0-9a-fA-F]+|[0-9]+)(?:[uU]?[lL]{0,2}|[lL]{1,2}[uU]?)\s*\)?$")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_header(path: Path = HEADER) -> dict[str, int]:
    """Return {NAME-without-XK_: value} for every XK_ macro in the header."""
    values: dict[str, int] = {}
    for line in _strip_comments(path.read_text()).splitlines():
        m = _DEFINE.match(line)
        if not m:
            continue
        name, body = m.groups()
        if name == "XK_PLATFORM_H":  # include guard
            continue
        lit = _LITERAL.match(body)
        if lit is None:
            raise AssertionError(f"{name}: value {body!r} is not a plain integer literal")
        key = name[len("XK_"):]
        assert key not in values, f"{name} defined twice"
        values[key] = int(lit.group(1), 0)
    return values


def test_header_exists_and_has_constants():
    values = parse_header()
    # the guests use at least these
    for key in ("COM1", "PM1A_CNT", "SLP_EN", "SLP_TYP_S5", "RESET_PORT", "LAPIC_BASE", "KERNEL_LOAD"):
        assert key in values, f"XK_{key} missing from {HEADER}"


@pytest.mark.parametrize("key,value", sorted(parse_header().items()))
def test_constant_matches_layout(key: str, value: int):
    assert hasattr(layout, key), f"XK_{key} has no counterpart in xenkvm/machine/layout.py"
    expected = getattr(layout, key)
    assert isinstance(expected, int)
    assert value == expected, f"XK_{key} = {value:#x}, layout.{key} = {expected:#x}"


def test_literal_parser():
    assert _LITERAL.match("0xFEE00000UL").group(1) == "0xFEE00000"
    assert _LITERAL.match("5").group(1) == "5"
    assert _LITERAL.match("(0x10)").group(1) == "0x10"
    assert _LITERAL.match("XK_PM_BASE + 4") is None
