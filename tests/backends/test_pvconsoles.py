"""Extra PV consoles (xenkvm/backends/console.py) under /dev/kvm, with guests/xen_pvconsoles.c.

Console 1 is a host pty: the test finds its path in the VMM's log line, reads
what the guest wrote, types a line and reads the guest's answer.  Console 2
is a file: 500 numbered lines must be there, in order, after the ring
wrapped; then the guest breaks that ring and console 1 and the primary
console keep working.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest

from xenkvm.config import ConfigError
from xenkvm.consolespec import ConsoleSpec, parse_consoles
from guestbuild import build_guests

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
TTY = re.compile(r"console 1: (/dev/pts/\d+)")


def read_until(fd: int, needle: bytes, seconds: float = 60) -> bytes:
    got, end = b"", time.monotonic() + seconds
    while needle not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.5)[0]:
            got += os.read(fd, 4096)
    return got


@pytest.mark.slow
def test_pty_and_file_consoles(tmp_path):
    build_guests()
    log = tmp_path / "c2.log"
    y = tmp_path / "g.yaml"
    y.write_text(f'kernel: {GUESTS / "out/xen_pvconsoles.elf"}\ncmdline: "xk.trap=page"\nmemory: 64M\n'
                 f'xen: {{domid: 1}}\nconsoles: [{{backend: pty}}, "backend=file, path={log}"]\n')
    p = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", str(y)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        lines = []
        for _ in range(50):             # the pty line is logged when the device is created
            lines.append(p.stderr.readline().decode())
            m = TTY.search(lines[-1])
            if m or not lines[-1]:
                break
        assert m, "".join(lines)
        fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        try:
            assert b"hello from console 1\r\n" in read_until(fd, b"hello from console 1\r\n")
            os.write(fd, b"ping\n")
            assert b"pong: ping\r\n" in read_until(fd, b"pong: ping\r\n")
            assert b"still here" in read_until(fd, b"still here")
        finally:
            os.close(fd)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    assert "SUMMARY: " in out and " 0 failed" in out and "FAIL" not in out, out + err
    assert "PASS cons.libxl_keys" in out and "PASS cons.1.after_broken_ring" in out and "CONS-DONE" in out
    assert "ring broken" in err and "Traceback" not in err
    assert log.read_bytes() == b"".join(b"line %04d\n" % i for i in range(500))


def test_console_specs(tmp_path):
    c = parse_consoles([{"backend": "pty"}, "file:c.log", "backend=file, path=/tmp/x.log", "pty"], tmp_path)
    assert c == (ConsoleSpec(1, "pty"), ConsoleSpec(2, "file", tmp_path / "c.log"),
                 ConsoleSpec(3, "file", Path("/tmp/x.log")), ConsoleSpec(4, "pty"))
    for bad, needle in (({"backend": "tcp"}, "backend='tcp'"), ({"backend": "file"}, "needs 'path'"),
                        ({"backend": "pty", "path": "x"}, "'path' is for backend file"), ("pty, x", "key=value"),
                        ({"backend": "pty", "mode": 1}, "unknown key 'mode'"), ("file:/nonexistent/dir/x", "no such")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_consoles([bad], tmp_path)
