"""The host's shared xenstored for managed domains, as on Xen: one store, every domain's ring.

It lives in ``RUN/.xenstored/`` (a name no domain can have)::

    socket            the xenstore socket (XENSTORED_PATH for xenstore-utils), 0600
    introduce.sock    where VMMs introduce their domains (xenkvm/xenstore/introduce.py), 0600
    xenstored.pid     the daemon's pid
    xenstored.log     its log

``xenkvm create`` starts it on demand (:meth:`SharedXenstored.ensure`, under the
run directory's lock, so two creates at once start one daemon); it stays when
the last domain goes, until ``xenkvm xenstored --shared --stop``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from xenkvm.config import ConfigError
from xenkvm.toolstack.rundir import SOCKET_PATH_MAX, RunDir, ensure_private_dir, process_start_time

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0       #: seconds for a new daemon to listen (PVM hosts under load)
STOP_TIMEOUT = 30.0
POLL = 0.05


@dataclass(frozen=True)
class SharedXenstored:
    """The shared daemon's files under the run directory."""

    dir: Path

    socket = property(lambda self: self.dir / "socket")
    introduce = property(lambda self: self.dir / "introduce.sock")
    pid_file = property(lambda self: self.dir / "xenstored.pid")
    log_file = property(lambda self: self.dir / "xenstored.log")

    @classmethod
    def of(cls, run: RunDir) -> "SharedXenstored":
        return cls(run.path / ".xenstored")

    def running(self) -> bool:
        """Whether a daemon answers on the xenstore socket."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.socket))
            return self.introduce.exists()
        except OSError:
            return False
        finally:
            probe.close()

    def pid(self) -> int | None:
        """The daemon's pid, if its pid file names a live xenstored process."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"xenstored" in cmdline and process_start_time(pid) is not None else None

    def ensure(self, run: RunDir) -> None:
        """Start the daemon unless one is running (ConfigError with its log if it cannot)."""
        if len(str(self.introduce)) > SOCKET_PATH_MAX:
            raise ConfigError(f"run directory {run.path}: {self.introduce} would exceed {SOCKET_PATH_MAX} "
                              "bytes; set XENKVM_RUN_DIR to a shorter path")
        with run.locked():
            if self.running():
                return
            ensure_private_dir(self.dir)
            self._start()

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "xenkvm", "xenstored", "-v", "--socket", str(self.socket),
               "--introduce", str(self.introduce), "--pid-file", str(self.pid_file)]
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
        finally:
            os.close(fd)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.running():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = self.log_file.read_text(errors="replace").splitlines()[-5:]
                raise ConfigError(f"the shared xenstored did not start: {' / '.join(tail) or 'no log'}")
            time.sleep(POLL)
        proc.returncode = 0      # it outlives us: no "still running" warning from Popen.__del__
        log.info("started the shared xenstored (pid %d): XENSTORED_PATH=%s", proc.pid, self.socket)

    def stop(self) -> bool:
        """SIGTERM the daemon and wait for it to go; False if none was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while process_start_time(pid) is not None:
            if time.monotonic() > deadline:
                raise ConfigError(f"the shared xenstored (pid {pid}) did not stop in {STOP_TIMEOUT:g} s")
            time.sleep(POLL)
        return True


def main(argv: list[str]) -> int:
    """``xenkvm xenstored --shared [--stop]``: start (or find) the shared daemon, or stop it."""
    p = argparse.ArgumentParser(prog="xenkvm xenstored --shared",
                                description="the managed domains' shared xenstored (in the run directory)")
    p.add_argument("--shared", action="store_true", required=True)
    p.add_argument("--stop", action="store_true", help="stop it (domains still introduced are released)")
    args = p.parse_args(argv)
    run = RunDir()
    xsd = SharedXenstored.of(run)
    if args.stop:
        print("stopped" if xsd.stop() else "not running")
        return 0
    xsd.ensure(run)
    print(f"XENSTORED_PATH={xsd.socket}")
    return 0
