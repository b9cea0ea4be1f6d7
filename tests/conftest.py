"""Shared test configuration: make the repo importable and expose the test-guest generator."""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def private_xenstore_socket(monkeypatch):
    """Each test's Xen guests get their own xenstored socket (never the host's /run/xenstored).

    A short directory under /tmp: UNIX socket paths are limited to 107 bytes.
    """
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="xks", dir="/tmp")
    monkeypatch.setenv("XENSTORED_PATH", f"{d}/sock")
    yield
    shutil.rmtree(d, ignore_errors=True)
