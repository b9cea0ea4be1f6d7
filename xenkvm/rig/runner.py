"""Boot the L1 system under QEMU TCG and run one command inside it, on the host's own files.

QEMU (``-accel tcg -cpu max``) emulates an AMD CPU with SVM and nested paging, so
L1's kvm_amd gives a hardware-flavoured ``/dev/kvm`` whatever the host's KVM is.
Two 9p shares: the host's ``/`` read-only (L1 puts an overlay with a tmpfs upper
layer over it and chroots into it, so the repository, its ``.venv`` and the
package caches are used unchanged) and a private results directory, writable,
that carries the command in (``command.sh``) and its output and exit status out
(``output.log``, ``status``).  The serial console is copied to ``console.log``
there and, optionally, to a stream as it arrives.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from xenkvm.rig.image import CHROOT_OUT, ERROR, HOST_TAG, OUT_TAG, READY, L1Image

log = logging.getLogger("xenkvm.rig")

#: Set inside the rig's chroot: tests read it (tests/conftest.py) to skip what the rig cannot do.
RIG_ENV = "XENKVM_RIG"
RIG_NAME = "qemu-tcg-svm"

#: ``idle=poll``: L1 never halts its CPU.  Twice (CI stop 19, make test 2026-12-03 11:26) a
#: Debian test in the rig stopped dead: QEMU's TCG vCPU thread asleep on its halt condition, its
#: main loop polling with a 12-hour timeout (no timer armed: L1's last timer interrupt was never
#: taken), nothing on the console for the rest of the hour.  A halted TCG vCPU that misses its
#: wake-up is the one state that can do that; a polling idle loop never enters it.
L1_CMDLINE = ("console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 mitigations=off nowatchdog "
              "random.trust_cpu=on cryptomgr.notests idle=poll")
#: QEMU using no CPU at all for this long means L1 is stuck as above: give up then, not at the limit.
STALL_S = 300
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RigError(RuntimeError):
    """The rig itself failed (no QEMU, L1 could not provide /dev/kvm, a timeout): one line."""


@dataclass
class RigResult:
    status: int
    output: str
    console: str
    #: Wall seconds from QEMU's start to L1 ready (kvm_amd loaded, shares mounted) and to the end.
    ready_s: float
    total_s: float
    #: L1's own uptime at ready (guest time, from /proc/uptime).
    l1_uptime_s: float | None = None


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RigError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 (make deps does)")
    return qemu


def qemu_command(qemu: str, image: L1Image, out_dir: Path, *, memory_mb: int, cpus: int) -> list[str]:
    """The QEMU command line: TCG, -cpu max (SVM + NPT), two 9p shares, console on stdio."""
    share = "local,security_model=none,multidevs=remap"
    return [qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", L1_CMDLINE,
            "-virtfs", f"{share},path=/,mount_tag={HOST_TAG},readonly=on",
            "-virtfs", f"{share},path={out_dir},mount_tag={OUT_TAG}"]


def command_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """``command.sh``: run ``argv`` in ``cwd`` inside the chroot; output to the console and
    ``output.log``, exit status to ``status``."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return (f"#!/bin/sh\nexport {exports}\ncd {shlex.quote(str(cwd))} || exit 1\n"
            f"{{ {shlex.join(argv)}; echo $? > {CHROOT_OUT}/status; }} 2>&1 | tee {CHROOT_OUT}/output.log\n")


class _Console:
    """Collects QEMU's stdout (L1's serial console) and notes when markers appear."""

    def __init__(self, stream: IO[bytes], log_path: Path, echo: IO[str] | None, t0: float):
        self.lines: list[str] = []
        self.ready_at: float | None = None
        self.error: str | None = None
        self.l1_uptime: float | None = None
        self._t0 = t0
        self._echo = echo
        self._log = log_path.open("w", errors="replace")
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            self._log.write(line + "\n")
            self._log.flush()
            if self._echo is not None:
                self._echo.write(line + "\n")
                self._echo.flush()
            if line.startswith(READY) and self.ready_at is None:
                self.ready_at = time.monotonic() - self._t0
                try:
                    self.l1_uptime = float(line.split()[1])
                except (IndexError, ValueError):
                    pass
            elif line.startswith(ERROR) and self.error is None:
                self.error = line[len(ERROR):].strip()
        self._log.close()


#: Folders L1 mounts afresh (tmpfs, devtmpfs...) over the host's: a repository there is invisible in L1.
L1_OWN_DIRS = ("/tmp", "/run", "/dev", "/proc", "/sys")


def check_cwd(cwd: Path) -> None:
    """Refuse a working folder L1 cannot see (its own ``/tmp`` etc. hide the host's)."""
    resolved = Path(cwd).resolve()
    for own in L1_OWN_DIRS:
        if resolved == Path(own) or Path(own) in resolved.parents:
            raise RigError(f"{resolved} is under {own}, which L1 mounts afresh (the host's is not visible "
                           f"there): run the rig from a checkout elsewhere")


def run(image: L1Image, argv: list[str], *, cwd: Path, out_dir: Path, env: dict[str, str] | None = None,
        memory_mb: int = 4096, cpus: int = 1, boot_timeout: float = 600, timeout: float = 3600,
        echo: IO[str] | None = None) -> RigResult:
    """Boot L1, run ``argv`` in ``cwd`` inside it, power off; raise :class:`RigError` when the rig fails.

    ``boot_timeout`` bounds QEMU's start to L1 ready, ``timeout`` the whole run.
    """
    check_cwd(cwd)
    qemu = qemu_binary()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("status", "output.log"):
        (out_dir / stale).unlink(missing_ok=True)
    full_env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", RIG_ENV: RIG_NAME,
                **(env or {})}
    (out_dir / "command.sh").write_text(command_script(argv, cwd, full_env))
    cmd = qemu_command(qemu, image, out_dir, memory_mb=memory_mb, cpus=cpus)
    log.info("$ %s", shlex.join(cmd))
    t0 = time.monotonic()
    proc = spawn(cmd)
    try:
        console = _Console(proc.stdout, out_dir / "console.log", echo, t0)
        why = _wait(proc, console, t0, boot_timeout, timeout)
    finally:
        if proc.poll() is None:     # an exception or a signal (KeyboardInterrupt) on our side
            proc.kill()
            proc.wait()
    console.thread.join(timeout=5)
    total = time.monotonic() - t0
    text = "\n".join(console.lines)
    if console.error:
        raise RigError(f"L1 failed: {console.error}")
    if why:
        raise RigError(f"{why}; console tail: {' | '.join(console.lines[-5:])}")
    if console.ready_at is None:
        raise RigError(f"QEMU exited with status {proc.returncode} before L1 was ready; "
                       f"console tail: {' | '.join(console.lines[-5:])}")
    status_file = out_dir / "status"
    if not status_file.is_file():
        raise RigError(f"the command left no exit status (L1 ended early); console tail: "
                       f"{' | '.join(console.lines[-5:])}")
    output = (out_dir / "output.log").read_text(errors="replace") if (out_dir / "output.log").is_file() else ""
    return RigResult(int(status_file.read_text().strip() or 255), output, text, console.ready_at, total,
                     console.l1_uptime)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (prctl(2))."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str]) -> subprocess.Popen:
    """Start QEMU so that it never outlives the runner, however the runner ends (a SIGKILLed
    or SIGTERMed runner would otherwise leave an L1 burning a core, holding its memory)."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (all its threads), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _StallWatch:
    """Notices QEMU using no CPU for ``STALL_S`` seconds (an L1 that polls when idle never does)."""

    def __init__(self, pid: int, now: float):
        self.pid, self.cpu, self.since = pid, cpu_seconds(pid), now

    def stalled(self, now: float) -> bool:
        cpu = cpu_seconds(self.pid)
        if cpu is None or self.cpu is None or cpu - self.cpu > 0.05:
            self.cpu, self.since = cpu, now
            return False
        return now - self.since > STALL_S


def _wait(proc: subprocess.Popen, console: _Console, t0: float, boot_timeout: float, timeout: float) -> str:
    """Wait for QEMU to exit; kill it on a timeout, a stall or an L1 error.  The reason it was killed, or ''."""
    why = ""
    stall = _StallWatch(proc.pid, time.monotonic())
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        if stall.stalled(time.monotonic()):
            why = (f"L1 stalled: QEMU used no CPU for {STALL_S}s (a halted TCG vCPU that missed its "
                   f"wake-up; L1 runs idle=poll to avoid it)")
            break
        if console.error is not None:
            time.sleep(1)  # let the init script's dmesg tail arrive; it powers off by itself
            if proc.poll() is None:
                why = "L1 reported an error"
                break
        if console.ready_at is None and elapsed > boot_timeout:
            why = f"L1 not ready after {boot_timeout:.0f}s (kvm_amd, 9p or overlay setup)"
            break
        if elapsed > timeout:
            why = f"the rig run exceeded its {timeout:.0f}s limit"
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return why
