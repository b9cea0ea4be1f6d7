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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from xenkvm.rig import qmp
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
#: ``nohz=off highres=off``: a periodic tick.  On 2026-12-03 (18:16) a polling L1 still stopped
#: for good after its third nested guest (heartbeat lost; RIP in cpu_idle_poll, RFLAGS.IF set,
#: HLT=0): L1's clockevent is the LAPIC timer in one-shot mode (no TSC-deadline under TCG), which
#: the kernel re-arms from each tick's interrupt, so one interrupt lost in TCG's nested SVM leaves
#: no timer armed at all, as in the halted case.  In periodic mode QEMU re-arms the LAPIC timer
#: itself at every expiry, so a lost tick is one tick.
L1_CMDLINE = ("console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 mitigations=off nowatchdog "
              "random.trust_cpu=on cryptomgr.notests idle=poll nokaslr nohz=off highres=off")
#: QEMU using no CPU at all for this long means L1 is stuck as above: give up then, not at the limit.
STALL_S = 300
#: No new byte of output (console or ``output.log``) for this long: L1 is silent.  pytest's own
#: timeout is 600 s a test, and ``-v`` prints each test's name as it starts, so a live run is
#: never this quiet.  CI's run 20 (2026-12-03) spent its rig guest tests' whole hour (pytest -q:
#: nothing says where): :class:`_Silence` looks at L1 then (QMP) and pokes it with an NMI.
SILENT_S = 900
#: NMIs sent to one silent stretch (one each ``SILENT_S``): more only repeat what is known.
MAX_POKES = 3
#: L1's heartbeat: ``command.sh`` writes L1's uptime to this file of the results share every
#: few seconds while the command runs.  It needs L1's timers, scheduler and 9p: when it stops for
#: ``HEARTBEAT_LOST_S``, L1 is dead whatever the command is doing (the stall above, with a
#: polling idle loop, looks like that: QEMU busy, nothing happening).  It is poked with an NMI
#: and given ``HEARTBEAT_GRACE_S`` before the run is given up as :class:`L1Died`.
HEARTBEAT = "heartbeat"
#: L1's text symbols (``/proc/kallsyms``; ``nokaslr`` keeps them the same every boot): written
#: by ``command.sh`` when the results share holds ``WANT_KALLSYMS``, once per rig cache.
KALLSYMS = "kallsyms"
WANT_KALLSYMS = "want-kallsyms"
HEARTBEAT_EVERY_S = 5
#: The beats after the first, in one process: a shell loop of ``cat``, ``mv`` and ``sleep`` forks
#: and execs three programs a beat, ~130 ms of L1's one TCG CPU (a seq-read trace of
#: ``bench_diskguest.py --trace-phase``, 2026-12-05: mv 53 ms, cat 42, sleep 34, sh 12), so a
#: beat that fell inside a 0.3-s benchmark phase took 40% of its CPU.  Each beat is written to a
#: new file and renamed, so the host never reads half of one.
BEAT_LOOP = ("import os, sys, time\n"
             "beat, every = sys.argv[1], float(sys.argv[2])\n"
             "while True:\n"
             "    time.sleep(every)\n"
             "    with open(\"/proc/uptime\") as f, open(beat + \".new\", \"w\") as out:\n"
             "        out.write(f.read())\n"
             "    os.replace(beat + \".new\", beat)\n")
HEARTBEAT_LOST_S = 180
HEARTBEAT_GRACE_S = 60
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RigError(RuntimeError):
    """The rig itself failed (no QEMU, L1 could not provide /dev/kvm, a timeout): one line."""


class L1Died(RigError):
    """L1 stopped under a running command (no CPU used, or no heartbeat): QEMU TCG's fault,
    not the command's, so running the command again in a fresh L1 is fair (``--retry-dead``)."""


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


def qemu_command(qemu: str, image: L1Image, out_dir: Path, *, memory_mb: int, cpus: int,
                 qmp: Path | None = None) -> list[str]:
    """The QEMU command line: TCG, -cpu max (SVM + NPT), two 9p shares, console on stdio,
    a QMP socket at ``qmp`` if given."""
    share = "local,security_model=none,multidevs=remap"
    monitor = ["-qmp", f"unix:{qmp},server=on,wait=off"] if qmp is not None else []
    return [qemu, *monitor, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", L1_CMDLINE,
            "-virtfs", f"{share},path=/,mount_tag={HOST_TAG},readonly=on",
            "-virtfs", f"{share},path={out_dir},mount_tag={OUT_TAG}"]


def command_script(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """``command.sh``: run ``argv`` in ``cwd`` inside the chroot; output to the console and
    ``output.log``, exit status to ``status``."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    beat, syms = f"{CHROOT_OUT}/{HEARTBEAT}", f"{CHROOT_OUT}/{KALLSYMS}"
    return (f"#!/bin/sh\nexport {exports}\ncd {shlex.quote(str(cwd))} || exit 1\n"
            f"[ -e {CHROOT_OUT}/{WANT_KALLSYMS} ] && grep ' [tT] ' /proc/kallsyms > {syms}.new "
            f"&& mv {syms}.new {syms}\n"
            f"cat /proc/uptime > {beat}.new && mv {beat}.new {beat}\n"
            f"python3 -c {shlex.quote(BEAT_LOOP)} {beat} {HEARTBEAT_EVERY_S} </dev/null >/dev/null 2>&1 &\nbeat=$!\n"
            f"{{ {shlex.join(argv)}; echo $? > {CHROOT_OUT}/status; }} 2>&1 | tee {CHROOT_OUT}/output.log\n"
            f"kill $beat\n")


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
        echo: IO[str] | None = None, silent_after: float = SILENT_S) -> RigResult:
    """Boot L1, run ``argv`` in ``cwd`` inside it, power off; raise :class:`RigError` when the rig fails.

    ``boot_timeout`` bounds QEMU's start to L1 ready, ``timeout`` the whole run; a command silent
    for ``silent_after`` seconds is looked at and poked (:class:`_Silence`).
    """
    check_cwd(cwd)
    qemu = qemu_binary()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("status", "output.log", HEARTBEAT, KALLSYMS, WANT_KALLSYMS):
        (out_dir / stale).unlink(missing_ok=True)
    if not kallsyms_cache(image).exists():
        (out_dir / WANT_KALLSYMS).touch()
    full_env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", RIG_ENV: RIG_NAME,
                **(env or {})}
    (out_dir / "command.sh").write_text(command_script(argv, cwd, full_env))
    qmp_dir = Path(tempfile.mkdtemp(prefix="xenkvm-qmp-"))   # short: a socket path has 108 bytes
    cmd = qemu_command(qemu, image, out_dir, memory_mb=memory_mb, cpus=cpus, qmp=qmp_dir / "qmp")
    log.info("$ %s", shlex.join(cmd))
    t0 = time.monotonic()
    proc = spawn(cmd)
    try:
        console = _Console(proc.stdout, out_dir / "console.log", echo, t0)
        symbols = kallsyms_cache(image) if kallsyms_cache(image).exists() else out_dir / KALLSYMS
        watch = _Liveness(out_dir, _Poker(qmp_dir / "qmp", symbols), t0, silent_after)
        why, dead = _wait(proc, console, watch, t0, boot_timeout, timeout)
    finally:
        if proc.poll() is None:     # an exception or a signal (KeyboardInterrupt) on our side
            proc.kill()
            proc.wait()
        shutil.rmtree(qmp_dir, ignore_errors=True)
    console.thread.join(timeout=5)
    keep_kallsyms(image, out_dir)
    total = time.monotonic() - t0
    text = "\n".join(console.lines)
    if console.error:
        raise RigError(f"L1 failed: {console.error}")
    if why:
        raise (L1Died if dead else RigError)(f"{why}; console tail: {' | '.join(console.lines[-5:])}")
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


def kallsyms_cache(image: L1Image) -> Path:
    """L1's kernel's text symbols, kept beside its vmlinuz once a run has read them (Debian's
    ``System.map`` is a placeholder: "The real System.map is in the linux-image-...-dbg package")."""
    return image.kernel.parent / f"kallsyms-{image.abi}"


def keep_kallsyms(image: L1Image, out_dir: Path) -> None:
    """Move the symbols L1 wrote (:data:`KALLSYMS`, asked by :data:`WANT_KALLSYMS`) into the cache."""
    got = out_dir / KALLSYMS
    if got.is_file() and got.stat().st_size > 0 and not kallsyms_cache(image).exists():
        shutil.move(str(got), kallsyms_cache(image))


def last_line(path: Path, chunk: int = 4096) -> str:
    """The last non-empty line of a file (what pytest -v was running), '' if none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - chunk))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class _Poker:
    """Looks at L1 through QMP (where its CPU is: ``info registers``, symbolised with L1's
    text symbols, :func:`kallsyms_cache`) and injects an NMI: a CPU that missed an interrupt takes the NMI, and Linux
    says "NMI received for unknown reason" on the console."""

    def __init__(self, qmp_path: Path, symbols: Path):
        self._qmp, self._symbols = qmp_path, symbols

    def poke(self) -> str:
        """Where L1's CPU was (or why QMP could not say); the NMI is sent if QMP answers."""
        try:
            with qmp.Qmp(self._qmp) as mon:
                registers = mon.hmp("info registers")
                lapic = mon.hmp("info lapic")
                report = where(registers, qmp.SymbolMap.load(self._symbols))
                mon.execute("inject-nmi")
        except qmp.QmpError as e:
            return str(e)
        # All of it: under TCG's SVM the registers are L2's while a nested guest runs (CR3, EFER
        # and the segments tell which), so the symbol alone may name the wrong kernel.
        log.warning("L1's CPU when poked (QMP info registers):\n%s", general_registers(registers))
        # The local APIC says which way a dead L1 died: its timer not armed (LVTT, current_count
        # 0 in one-shot mode) or an interrupt in service that L1 never ended (ISR), runner.L1_CMDLINE.
        log.warning("L1's local APIC when poked (QMP info lapic):\n%s", lapic.strip())
        return report


class _Silence:
    """Notices a command that prints nothing for ``after`` seconds (its L1 alive or not).

    Each time (up to :data:`MAX_POKES`) L1 is poked (:class:`_Poker`) and both are logged.  It
    never ends a run itself (a slow test is not a dead one): the run's limit does, and
    :meth:`summary` then says what was seen.
    """

    def __init__(self, output: Path, poker: _Poker, now: float, after: float = SILENT_S):
        self._output, self._poker, self._after = output, poker, after
        self._seen, self._since = self._mark(), now
        self._silent_for = self._poked_at = 0.0
        self.reports: list[str] = []
        self.nmis = 0

    def _mark(self) -> int:
        """How much the command has said: the console does not count (the NMI makes L1 speak)."""
        try:
            return self._output.stat().st_size
        except OSError:
            return -1

    def check(self, now: float) -> None:
        mark = self._mark()
        if mark != self._seen:
            if self.nmis:
                log.warning("the command spoke again %.0fs after the last NMI", now - self._poked_at)
            self._seen, self._since, self.nmis, self.reports = mark, now, 0, []
            return
        self._silent_for = now - self._since
        if self.nmis < MAX_POKES and self._silent_for > self._after * (self.nmis + 1):
            self.nmis += 1
            self._poked_at = now
            self.reports.append(self._poker.poke())
            log.warning("the command silent for %.0fs (last output line: %s); L1's CPU: %s; NMI %d injected",
                        self._silent_for, last_line(self._output) or "(none)", self.reports[-1], self.nmis)

    def summary(self) -> str:
        """What was seen of a silence still going on, '' if none was."""
        if not self.nmis:
            return ""
        return (f"the command silent for {self._silent_for:.0f}s, {self.nmis} NMI(s) did not wake it, "
                f"L1's CPU: {'; '.join(self.reports)}; "
                f"last output line: {last_line(self._output) or '(none)'}")


def _uptime(beat: str | None) -> str:
    """L1's uptime in a heartbeat (``/proc/uptime``'s first field), '?' if none."""
    return beat.split()[0] if beat else "?"


class _Heartbeat:
    """L1's heartbeat file (:data:`HEARTBEAT`): lost for ``HEARTBEAT_LOST_S``, L1 is poked; still
    lost ``HEARTBEAT_GRACE_S`` later, L1 is dead."""

    def __init__(self, path: Path, poker: _Poker, now: float):
        self._path, self._poker = path, poker
        self._seen: str | None = None
        self._since = now
        self._poked_at: float | None = None
        self._report = ""

    def check(self, now: float) -> str:
        """'' while L1 lives (or before its first beat); why it is dead otherwise."""
        try:
            beat = self._path.read_text().strip()
        except OSError:
            beat = None
        if beat != self._seen:
            if self._poked_at is not None and beat is not None:
                log.warning("L1's heartbeat came back %.0fs after the NMI (L1 uptime %s)",
                            now - self._poked_at, _uptime(beat))
            self._seen, self._since, self._poked_at = beat, now, None
            return ""
        if beat is None:
            return ""                   # the command has not started yet: the boot timeout's business
        if self._poked_at is None:
            if now - self._since > HEARTBEAT_LOST_S:
                self._poked_at, self._report = now, self._poker.poke()
                log.warning("L1's heartbeat lost for %.0fs (L1 uptime %s then); L1's CPU: %s; NMI injected",
                            now - self._since, _uptime(beat), self._report)
            return ""
        if now - self._poked_at < HEARTBEAT_GRACE_S:
            return ""
        return (f"L1 died: no heartbeat for {now - self._since:.0f}s (L1 uptime {_uptime(beat)} "
                f"at the last), an NMI did not wake it; L1's CPU: {self._report}")


class _Liveness:
    """Both watches over a running command: L1's heartbeat and the command's output."""

    def __init__(self, out_dir: Path, poker: _Poker, now: float, silent_after: float = SILENT_S):
        self._output = out_dir / "output.log"
        self.heartbeat = _Heartbeat(out_dir / HEARTBEAT, poker, now)
        self.silence = _Silence(self._output, poker, now, silent_after)

    def check(self, now: float) -> str:
        """'' while L1 lives; why it is dead (its last output line named) otherwise."""
        self.silence.check(now)
        why = self.heartbeat.check(now)
        return f"{why}; last output line: {last_line(self._output) or '(none)'}" if why else ""

    def summary(self) -> str:
        return self.silence.summary()


def general_registers(registers: str) -> str:
    """``info registers`` up to its FPU and vector state (FCW=, FPR, XMM, YMM lines): the
    general, segment, control and descriptor-table registers."""
    keep = []
    for line in registers.splitlines():
        if line.startswith(("FCW=", "FPR", "XMM", "YMM", "ZMM")):
            break
        keep.append(line)
    return "\n".join(keep)


def where(registers: str, symbols: qmp.SymbolMap) -> str:
    """Where L1's CPU was, from ``info registers``: ``RIP ... (symbol) CPL n``."""
    found = qmp.registers_rip(registers)
    if found is None:
        return "no RIP in info registers"
    rip, cpl = found
    name = symbols.name(rip)
    return f"RIP {rip:#018x}" + (f" ({name} if L1's)" if name else " (not L1 kernel text: L1 user or L2)") \
        + (f" CPL {cpl}" if cpl is not None else "")


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


def _wait(proc: subprocess.Popen, console: _Console, watch: "_Liveness", t0: float,
          boot_timeout: float, timeout: float) -> tuple[str, bool]:
    """Wait for QEMU to exit; kill it on a timeout, a stall, a dead L1 or an L1 error.  The reason
    it was killed ('' if it was not) and whether L1 died under the command."""
    why, dead = "", False
    stall = _StallWatch(proc.pid, time.monotonic())
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        if stall.stalled(time.monotonic()):
            why, dead = (f"L1 stalled: QEMU used no CPU for {STALL_S}s (a halted TCG vCPU that missed "
                         f"its wake-up; L1 runs idle=poll to avoid it)"), True
            break
        why = watch.check(time.monotonic())
        if why:
            dead = True
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
            why = "; ".join(filter(None, [f"the rig run exceeded its {timeout:.0f}s limit", watch.summary()]))
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return why, dead
