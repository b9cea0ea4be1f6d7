"""Debian's unmodified cloud kernel boots to a busybox shell that prints the marker.

Run by ``make test-linux`` (``pytest -m linux -s tests``) after ``make linux-image``
has written guests/linux.yaml and .cache/linux.  On PVM hosts this takes minutes
(see docs/linux-boot.md); the measured time is printed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guests" / "linux.yaml"
MARKER = "XENKVM-LINUX-BOOT-OK"
TIMEOUT = float(os.environ.get("XENKVM_LINUX_BOOT_TIMEOUT", "2400"))

pytestmark = [pytest.mark.linux, pytest.mark.hw, pytest.mark.linux_host, pytest.mark.timeout(TIMEOUT + 120)]


@pytest.fixture(scope="module")
def guest() -> Path:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    if not GUEST.is_file() or not (ROOT / ".cache" / "linux" / "vmlinuz").is_file():
        pytest.skip("no Linux image: run `make linux-image` first")
    return GUEST


def test_debian_kernel_boots_to_marker(guest: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    cmd = [sys.executable, "-m", "xenkvm", "run", str(guest), "--console", f"file:{console}"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
        pytest.fail(f"no power-off within {TIMEOUT:.0f}s; console tail:\n{tail}")
    elapsed = time.monotonic() - t0
    out = console.read_text(errors="replace")
    print(f"\nDebian kernel boot to power-off: {elapsed:.1f}s wall "
          f"(marker {'seen' if MARKER in out else 'missing'}, exit {proc.returncode})")
    assert MARKER in out, f"marker missing; stderr:\n{proc.stderr[-2000:]}\nconsole tail:\n{out[-3000:]}"
    assert proc.returncode == 0, f"exit status {proc.returncode}; stderr:\n{proc.stderr[-2000:]}"
