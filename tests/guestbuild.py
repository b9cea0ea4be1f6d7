"""Build the freestanding test guests (guests/) once per test process.

Every guest test needs ``make -C guests`` to have run; it used to run once per module.  Inside
the hardware rig's L1 (``XENKVM_RIG``) nothing is built: the rig runner builds the guests on
the host before L1 starts (xenkvm/rig/__main__.py), and a no-op ``make`` there costs ~20 s of
TCG time per call over 9p.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

GUESTS = Path(__file__).resolve().parents[1] / "guests"


@functools.cache
def build_guests() -> Path:
    """``make -s -C guests`` (not in the rig), once; the guests directory."""
    if not os.environ.get("XENKVM_RIG"):
        subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    return GUESTS
