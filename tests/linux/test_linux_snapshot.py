"""Debian's kernel as a managed Xen PVH guest: booted once, snapshotted, restored per test
(issue 13 items 3-4, docs/snapshots.md).

Status (2026-12-02): passes on the PVM host (5/5, twice); in the rig 4/5: the cooperative
resume's kernel log had a clockevents WARNING (docs/snapshots.md, "Debian's kernel").  Markers
``linux`` and ``linux_more`` only, so neither ``make test`` nor its rig half runs it.  Run it with
``flock /tmp/xenkvm-rig.lock .venv/bin/python -m xenkvm.rig run -- env XENKVM_LINUX_BOOT_TIMEOUT=480
.venv/bin/python -m pytest -x -s tests/linux/test_linux_snapshot.py``.

The module boots Debian once (``xenkvm create`` of guests/linux-pvh.yaml, 2 vCPUs, with
``xenkvm.shell``: its /init ends in a shell on hvc0 after the marker; the host writes the
round trip's reply).  At the shell the guest starts ``xenstore-watch data/watched`` in the
background (a watch of the kernel's xenbus, which Linux re-registers on resume); then
``xenkvm snapshot`` saves it and the booted domain is destroyed.  Each test restores that
snapshot under a name of its own and drives it over the console:

* restored: the shell answers, CLOCK_MONOTONIC (``now at N nsecs`` of /proc/timer_list) never
  goes back, and a host write of ``data/watched`` reaches the guest's watch;
* cooperative save: ``xenkvm save`` (Linux writes control/feature-suspend, so it suspends itself
  through SHUTDOWN_suspend), ``restore``: Linux's resume path sets its Xen state up again (other
  vCPUs down and up, vcpu_info, event channels, grant frames, xenbus), then the same checks;
* the guest's endings (the lifecycle variants of test_linux_xen.py, from the snapshot instead
  of a boot each): a host ``xenkvm shutdown``, the guest's ``reboot -f``, a kernel crash
  (sysrq-c); the domain's ``on_*`` actions are ``preserve``, so ``xenkvm list`` shows how it ended.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.linux.xenboot import DMESG_FORBIDDEN, ROOT
from tests.toolstack.test_managed_domains import Console, listing, xenkvm
from xenkvm.images import DMESG_END, HOST_KEY, XEN_MARKER
from xenkvm.toolstack.client import ControlClient
from xenkvm.xenstore.client import XsClient

PVH = ROOT / "guests" / "linux-pvh.yaml"
TIMEOUT = float(os.environ.get("XENKVM_LINUX_BOOT_TIMEOUT", "2400"))
NAME = "debian-snap"
NOW = re.compile(rb"^now at (\d+) nsecs", re.M)
KLOG = re.compile(r"^\s*\[\s*\d+\.\d+\] ")
#: Linux's own race in its Xen suspend path (drivers/xen/manage.c do_suspend, 6.1): xen_arch_suspend
#: shuts every CPU's clockevent down (tick_suspend_local, state 1 = SHUTDOWN) *before* stop_machine;
#: a CPU idling with its tick stopped (not the one running do_suspend) then leaves idle for its
#: stopper thread, and
#: tick_nohz_idle_exit cancels its sched_timer: with no other hrtimer queued, tick_program_event asks
#: for ONESHOT_STOPPED and clockevents_switch_state's WARN_ONCE fires ("Current state: 1").  All of
#: it runs in the original domain before SCHEDOP_shutdown(suspend), whatever the hypervisor does; the
#: slow nested rig lets a CPU stop its tick there.  Only this WARNING is tolerated, and only between
#: "suspending xenstore" and the thaw ("Restarting tasks").
SUSPEND_TICK_WARNING = re.compile(r"WARNING: CPU: \d+ PID: 0 at kernel/time/clockevents\.c:\d+ "
                                  r"clockevents_switch_state\b")

#: linux_more: out of make test's PVM run (one more Debian boot there, ~10 min); hw: in make test's rig
#: part (5 passed there on 2026-12-02 in ~320 s with the boot)
pytestmark = [pytest.mark.linux, pytest.mark.linux_more, pytest.mark.hw, pytest.mark.timeout(TIMEOUT + 600)]


def _need() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    if not PVH.is_file() or not (ROOT / ".cache" / "linux" / "initramfs-xen.cpio.gz").is_file():
        pytest.skip("no Xen Linux image: run `make linux-xen-image` first")


def _shell_yaml(d: Path, vcpus: int) -> Path:
    """guests/linux-pvh.yaml as a managed domain ``NAME`` whose /init ends in a shell, kept
    listed when it ends (so a test sees how)."""
    import yaml
    cfg = yaml.safe_load(PVH.read_text())
    for key in ("kernel", "initrd"):
        cfg[key] = str((PVH.parent / cfg[key]).resolve())
    cfg.update(name=NAME, vcpus=vcpus, cmdline=f"{cfg['cmdline']} xenkvm.shell",
               on_poweroff="preserve", on_reboot="preserve", on_crash="preserve")
    path = d / "debian-snap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Shell:
    """The guest's shell over a domain's console (the control API's attach)."""

    def __init__(self, run_dir: Path, name: str):
        self.con = Console(run_dir, name)
        self.seq = 0

    @property
    def text(self) -> str:
        return self.con.out.decode(errors="replace")

    def type(self, line: str) -> None:
        self.con.client.sock.sendall(f"{line}\n".encode())

    def run(self, command: str, timeout: float = TIMEOUT) -> str:
        """Type ``command``; its output, up to a line the shell prints after it."""
        self.seq += 1
        start = len(self.con.out)
        self.type(f"{command}; echo XK-''DONE-{self.seq}")     # the echoed line does not match
        m = self.con.read_until(rf"^XK-DONE-{self.seq}\r?$".encode(), timeout=timeout, start=start)
        return self.con.out[start:m.start()].decode(errors="replace")

    def answers(self, timeout: float = TIMEOUT) -> bool:
        """Whether the shell computes 6*7; asked again every 15 s (a line typed before the shell
        reads its terminal may be lost), for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                out = self.run("echo $((6*7))", min(15.0, max(1.0, deadline - time.monotonic())))
                return re.search(r"^42\r?$", out, re.M) is not None
            except (AssertionError, TimeoutError):     # read_until: no match yet, or a quiet console
                print(f"(no answer to line {self.seq} yet; console since: "
                      f"{bytes(self.con.out[-300:]).decode(errors='replace')!r})", flush=True)
                if time.monotonic() >= deadline:
                    raise

    def monotonic_ns(self) -> int:
        """The guest's CLOCK_MONOTONIC (ktime_get(): /proc/timer_list's ``now at``)."""
        out = self.run("head -3 /proc/timer_list").encode()
        m = NOW.search(out)
        assert m, f"no 'now at' in {out!r}"
        return int(m.group(1))

    def close(self) -> None:
        self.con.close()


@contextmanager
def _vmm_log_on_failure(run_dir: Path, name: str):
    """On a failure, print the tail of the domain's VMM log (the run directory is removed at the
    end, and in the rig it lives in L1's /tmp, which the host never sees)."""
    try:
        yield
    except BaseException:
        log = run_dir / name / "vmm.log"
        tail = log.read_text(errors="replace").splitlines()[-80:] if log.is_file() else ["(no log)"]
        print(f"\n--- {name}: the last lines of {log}:\n" + "\n".join(tail), flush=True)
        raise


def _xs(run_dir: Path) -> XsClient:
    return XsClient(str(run_dir / ".xenstored" / "socket"), timeout=10)


def _domid(run_dir: Path, name: str) -> int:
    return int(listing(run_dir)[name]["domid"])


@dataclass
class Saved:
    run_dir: Path
    snap: Path
    before_ns: int      #: the guest's CLOCK_MONOTONIC just before the snapshot
    dmesg_lines: int    #: lines in the guest's kernel log just before the snapshot


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """Debian booted once to its shell, its watch running, snapshotted and destroyed."""
    _need()
    run_dir = Path(tempfile.mkdtemp(prefix="xk-ds-", dir="/tmp"))
    work = tmp_path_factory.mktemp("debian-snap")
    try:
        with _vmm_log_on_failure(run_dir, NAME):
            t0 = time.monotonic()
            r = xenkvm(run_dir, "create", str(_shell_yaml(work, vcpus=2)))
            assert r.returncode == 0, r.stderr
            with _xs(run_dir) as xs:         # the reply the guest polls for before its marker
                xs.write(f"/local/domain/{_domid(run_dir, NAME)}/{HOST_KEY}", "host-saw:snapshot-test")
            sh = Shell(run_dir, NAME)
            sh.con.read_until(rf"^{XEN_MARKER} host-saw:snapshot-test".encode(), timeout=TIMEOUT)
            sh.con.read_until(rf"^{DMESG_END}".encode(), timeout=TIMEOUT)
            assert sh.answers(timeout=300), sh.text[-3000:]
            print(f"\nDebian PVH (2 vCPUs) booted to its shell: {time.monotonic() - t0:.1f}s", flush=True)
            start = len(sh.con.out)
            sh.type("xenstore-watch data/watched &")
            sh.con.read_until(rb"data/watched\r?$", start=start)     # a watch fires once when registered
            # the echo of a typed line may come interleaved with output: match output lines only
            m = re.search(r"^LINES=(\d+)\r?$", sh.run('echo "LINES=$(dmesg | wc -l)"'), re.M)
            assert m, sh.text[-2000:]
            lines = int(m.group(1))
            assert lines > 0, sh.text[-2000:]
            before = sh.monotonic_ns()
            snap = work / "debian.snap"
            t0 = time.monotonic()
            r = xenkvm(run_dir, "snapshot", NAME, str(snap))
            assert r.returncode == 0, r.stderr
            print(f"xenkvm snapshot: {time.monotonic() - t0:.2f}s", flush=True)
            assert re.search(r"^still-running\r?$", sh.run("echo still-running"), re.M)      # it runs on
            sh.close()
            assert xenkvm(run_dir, "destroy", NAME).returncode == 0
        yield Saved(run_dir, snap, before, lines)
    finally:
        for name in (NAME, *COPIES):
            xenkvm(run_dir, "destroy", name)
        xenkvm(run_dir, "xenstored", "--shared", "--stop")
        shutil.rmtree(run_dir, ignore_errors=True)


COPIES = ("restored", "coop", "end-poweroff", "end-reboot", "end-crash")


def _restore(s: Saved, name: str, snap: Path | None = None) -> Shell:
    """``xenkvm restore`` of the snapshot as ``name``; its shell answers (timed)."""
    t0 = time.monotonic()
    with _vmm_log_on_failure(s.run_dir, name):
        r = xenkvm(s.run_dir, "restore", str(snap or s.snap), "--name", name)
        assert r.returncode == 0, r.stderr
        sh = Shell(s.run_dir, name)
        assert sh.answers(timeout=120), sh.text[-3000:]
    print(f"{name}: restore to an answering shell: {time.monotonic() - t0:.2f}s", flush=True)
    assert XEN_MARKER not in sh.text        # resumed, not booted
    return sh


def _check_resumed(s: Saved, name: str, sh: Shell) -> None:
    """Monotonic clock across the restore; the host's write reaches the guest's watch."""
    after = sh.monotonic_ns()
    assert after > s.before_ns, f"CLOCK_MONOTONIC went back: {s.before_ns} -> {after}"
    later = sh.monotonic_ns()
    assert later > after, (after, later)
    start = len(sh.con.out)
    with _xs(s.run_dir) as xs:
        xs.write(f"/local/domain/{_domid(s.run_dir, name)}/data/watched", "ping")
    sh.con.read_until(rb"data/watched\r?$", timeout=120, start=start)
    assert sh.answers(timeout=120)
    new = [line for line in sh.run(f"dmesg | tail -n +{s.dmesg_lines + 1}").splitlines()
           if KLOG.match(line)]       # kernel log lines only, not the typed line's echo
    print(f"{name}: kernel log since the snapshot:" + "".join(f"\n  {line.rstrip()}" for line in new), flush=True)
    bad = [line for i, line in enumerate(new) if DMESG_FORBIDDEN.search(line) and "panic=-1" not in line
           and not _suspend_tick_race(new, i)]
    assert not bad, f"{name}: the resumed kernel complained: {bad}"


def _suspend_tick_race(lines: list[str], i: int) -> bool:
    """``lines[i]`` is :data:`SUSPEND_TICK_WARNING`, printed inside the suspend window."""
    if i == 0 or not SUSPEND_TICK_WARNING.search(lines[i]) or "Current state: 1" not in lines[i - 1]:
        return False
    before = "".join(lines[:i])
    start = before.rfind("suspending xenstore")
    return start >= 0 and "Restarting tasks" not in before[start:]


def test_snapshot_restores_and_runs_on(saved):
    """The snapshot taken at the shell, restored after the original was destroyed."""
    sh = _restore(saved, "restored")
    try:
        with _vmm_log_on_failure(saved.run_dir, "restored"):
            _check_resumed(saved, "restored", sh)
    finally:
        sh.close()
        xenkvm(saved.run_dir, "destroy", "restored")


def test_cooperative_save_and_restore(saved, tmp_path):
    """``xenkvm save``: Linux suspends itself (feature-suspend), is restored as a new domain,
    re-registers its Xen state, and its shell, clock and watch work."""
    run_dir = saved.run_dir
    sh = _restore(saved, "coop")
    with _xs(run_dir) as xs:
        assert xs.read(f"/local/domain/{_domid(run_dir, 'coop')}/control/feature-suspend") == b"1"
    sh.close()
    try:
        t0 = time.monotonic()
        with _vmm_log_on_failure(run_dir, "coop"):
            r = xenkvm(run_dir, "save", "coop", str(tmp_path / "coop.snap"))
            assert r.returncode == 0, r.stderr
        print(f"cooperative save: {time.monotonic() - t0:.2f}s", flush=True)
        assert "coop" not in listing(run_dir)
        sh = _restore(saved, "coop", tmp_path / "coop.snap")
        with _vmm_log_on_failure(run_dir, "coop"):
            _check_resumed(saved, "coop", sh)
        sh.close()
    finally:
        xenkvm(run_dir, "destroy", "coop")


def _ended(run_dir: Path, name: str, timeout: float = TIMEOUT) -> dict:
    """The domain's row once it has stopped (its on_* action is preserve)."""
    deadline = time.monotonic() + timeout
    while (row := listing(run_dir)[name])["state"] in ("running", "starting"):
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
    return row


@pytest.mark.parametrize("end,state,message", [
    # SCHEDOP_shutdown, or the ACPI PM1 sleep (the power-off path Linux picks on PVH)
    ("poweroff", "shutdown", r"guest shut down \(poweroff\) via SCHEDOP_shutdown|guest powered off"),
    ("reboot", "shutdown", r"guest shut down \(reboot\) via SCHEDOP_shutdown"),
    ("crash", "crashed", r"guest shut down \(crash\) via SCHEDOP_shutdown"),
], ids=["poweroff", "reboot", "crash"])
def test_restored_guest_ends(saved, end, state, message):
    """The host's control/shutdown request, the guest's reboot, a kernel crash: each from the
    snapshot, each ends the domain the way it says."""
    name = f"end-{end}"
    sh = _restore(saved, name)
    try:
        if end == "poweroff":           # Linux's control/shutdown watch (drivers/xen/manage.c)
            r = xenkvm(saved.run_dir, "shutdown", name)
            assert r.returncode == 0, r.stderr
        elif end == "reboot":
            sh.type("reboot -f")
        else:
            sh.type("echo c > /proc/sysrq-trigger")
        with _vmm_log_on_failure(saved.run_dir, name):
            row = _ended(saved.run_dir, name)
            with ControlClient(str(saved.run_dir / name / "control.sock"), timeout=30) as c:
                info = c.call("info")
            assert row["state"] == state and re.match(message, info["last_exit"] or ""), (row, info, sh.text[-2000:])
    finally:
        sh.close()
        xenkvm(saved.run_dir, "destroy", name)
