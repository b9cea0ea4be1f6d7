"""``python -m xenkvm.rig``: build the L1 system and run tests or a command in it (docs/hw-rig.md)."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from xenkvm.images import REPO_ROOT
from xenkvm.rig import image, runner

#: The tests the rig runs by default: those that pass under hardware KVM (marker ``hw``), from the
#: folders that hold them (collecting the whole suite costs minutes under TCG).
HW_SELECTION = "hw"
HW_PATHS = ["tests/kvm", "tests/xen", "tests/linux"]
#: Exit status when the rig itself fails (as opposed to the command run inside it).
RIG_FAILED = 125


def pytest_argv(extra: list[str]) -> list[str]:
    """The pytest command run inside L1: the ``hw`` selection unless ``-m`` is given, in
    :data:`HW_PATHS` unless paths are given."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    if "-m" not in extra:
        argv += ["-m", HW_SELECTION]
    paths = [x for x in extra if not x.startswith("-") and (REPO_ROOT / x.split("::")[0]).exists()]
    return argv + extra + ([] if paths else HW_PATHS)


def build_guests() -> None:
    """``make -C guests`` on the host, before L1 starts: the tests inside do not build them
    (tests/guestbuild.py), since make's no-op over 9p under TCG costs ~20 s a call."""
    r = subprocess.run(["make", "-s", "-C", str(REPO_ROOT / "guests")], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise runner.RigError(f"make -C guests failed on the host: {tail}")


#: Lines of the command's output shown when the rig fails under ``-q`` (which shows none otherwise).
FAILED_TAIL = 60


def print_tail(path: Path, lines: int = FAILED_TAIL, what: str = "the command's output") -> None:
    """The end of a file: where a run that the rig gave up on had got to."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    print(f"rig: the last {min(lines, len(text))} lines of {what}:")
    print("\n".join(text[-lines:]))


#: Lines of a dead L1's console shown (its kernel's last words, if it had any).
DEAD_CONSOLE_TAIL = 30


def keep_console(out: Path, attempt: int) -> Path:
    """Keep a dead L1's console beside the next one's (``console-dead-N.log``) and show its end."""
    kept = out / f"console-dead-{attempt}.log"
    try:
        (out / "console.log").replace(kept)
    except OSError:
        return kept
    print_tail(kept, DEAD_CONSOLE_TAIL, what="the dead L1's console")
    return kept


def run_retrying(l1: image.L1Image, cmd: list[str], out: Path, a: argparse.Namespace) -> runner.RigResult:
    """``runner.run``, again in a fresh L1 (up to ``--retry-dead`` times) when L1 died under the
    command: QEMU TCG's fault, said loudly, never a failing command's."""
    for attempt in range(a.retry_dead + 1):
        try:
            return runner.run(l1, cmd, cwd=REPO_ROOT, out_dir=out, memory_mb=a.memory, cpus=a.cpus,
                              boot_timeout=a.boot_timeout, timeout=a.timeout,
                              echo=None if a.quiet else sys.stdout, silent_after=a.silent_after)
        except runner.RigError as e:
            if a.quiet:
                print_tail(out / "output.log")
            if not isinstance(e, runner.L1Died):
                raise
            kept = keep_console(out, attempt + 1)
            if attempt == a.retry_dead:
                raise
            print(f"rig: {e}\nrig: L1 died under the command: running it again in a fresh L1 "
                  f"({attempt + 1} of {a.retry_dead}); the dead one's console is {kept}", file=sys.stderr)
    raise AssertionError("the loop returns or raises")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenkvm.rig", description=__doc__)
    p.add_argument("--cache", default=str(REPO_ROOT / ".cache" / "rig"), help="download/build directory")
    p.add_argument("--memory", type=int, default=4096, help="L1 memory in MiB")
    p.add_argument("--cpus", type=int, default=1,
                   help="L1 vCPUs (with more, TCG's unsynchronised TSCs make nested guests' time drift)")
    p.add_argument("--boot-timeout", type=float, default=600, help="seconds until L1 must be ready")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    p.add_argument("--silent-after", type=float, default=runner.SILENT_S,
                   help="seconds without the command's output before L1 is looked at and sent an NMI")
    p.add_argument("--retry-dead", type=int, default=0, metavar="N",
                   help="run the command again in a fresh L1, up to N times, when L1 dies under it")
    p.add_argument("--out", help="results directory (default: a fresh temporary one)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not copy L1's console to stdout")
    p.add_argument("what", choices=("image", "test", "run"),
                   help="image: only fetch and build L1's kernel and initramfs; test: pytest inside L1 "
                        "(default -m hw tests; further arguments go to pytest); run: the command that follows")
    p.add_argument("args", nargs=argparse.REMAINDER, help="pytest arguments (test) or the command (run)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rig: %(message)s")
    try:
        l1 = image.build(Path(a.cache))
        if a.what == "image":
            print(f"kernel    {l1.kernel}\ninitramfs {l1.initramfs}\nmodules   {' '.join(l1.modules)}")
            return 0
        args = [x for x in a.args if x != "--"] if a.what == "run" else a.args
        if a.what == "run" and not args:
            p.error("run needs a command")
        cmd = pytest_argv(args) if a.what == "test" else args
        build_guests()
        with tempfile.TemporaryDirectory(prefix="xenkvm-rig-") as tmp:
            out = Path(a.out) if a.out else Path(tmp)
            res = run_retrying(l1, cmd, out, a)
    except (image.RigImageError, runner.RigError) as e:
        print(f"rig: {e}", file=sys.stderr)
        return RIG_FAILED
    if a.quiet:
        sys.stdout.write(res.output)
    uptime = f"{res.l1_uptime_s:.1f}s L1 time, " if res.l1_uptime_s is not None else ""
    print(f"rig: L1 ready after {res.ready_s:.1f}s ({uptime}QEMU TCG), command exit {res.status}, "
          f"{res.total_s:.1f}s in all", file=sys.stderr)
    return res.status


if __name__ == "__main__":
    sys.exit(main())
