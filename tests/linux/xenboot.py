"""Boot Debian's kernel as a Xen guest and play the host's part of the xenstore round trip.

Used by tests/linux/test_linux_xen.py and benchmarks/bench_boot.py.  The guest's
/init (``xenkvm.images.XEN_INIT_SCRIPT``) writes ``data/guest-hello``; a host
thread here, connected to the embedded xenstored's socket like any xenstore
client, watches that key, reads it and answers in ``data/host-reply``, which the
guest reads and prints after the marker.  With ``shutdown_after_marker`` the host
also asks the guest to power off through ``control/shutdown`` (``xenkvm
shutdown``) instead of letting it power itself off; a ``host`` step can drive the
running guest further (tests/linux/test_linux_balloon.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xenkvm.cli import STACKS_SIGNAL  # noqa: E402
from xenkvm.images import DMESG_BEGIN, DMESG_END, GUEST_KEY, HOST_KEY, XEN_MARKER  # noqa: E402

DOMID = 1


def stacks_then_kill(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """A VMM past its time: have it print every thread's stack on its stderr (xenkvm's
    STACKS_SIGNAL), give it ``grace_s`` to write them, then kill it."""
    try:
        proc.send_signal(STACKS_SIGNAL)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    proc.kill()
HOME = f"/local/domain/{DOMID}"
#: What a healthy guest's dmesg must contain (and must not).
DMESG_REQUIRED = {
    "xen clocksource": re.compile(r"clocksource: Switched to clocksource xen"),
    "xen timer": re.compile(r"installing Xen timer for CPU 0"),
    "grant table": re.compile(r"Grant table initialized"),
    "xen hypervisor": re.compile(r"Hypervisor detected: Xen"),
}
DMESG_FORBIDDEN = re.compile(r"\bBUG\b|Oops|WARNING|[Kk]ernel panic|\bpanic\b")
#: In the nested rig (QEMU TCG as L0), a guest's XSETBV never reaches L1's KVM: QEMU 7.2's
#: ``helper_xsetbv`` checks no SVM intercept, so KVM never refreshes CPUID 0xD.0 EBX (the
#: XSAVE size for the XCR0 the guest enabled) and Linux warns "XSAVE consistency problem:
#: size N != kernel_size 576" from fpu__init_system_xstate.  On SVM/VT-x hardware XSETBV
#: always exits to KVM.  Only this warning is tolerated, and only in the rig.
RIG_XSAVE_WARNING = re.compile(r"WARNING: CPU: \d+ PID: \d+ at arch/x86/kernel/fpu/xstate\.c:\d+ "
                               r"fpu__init_system_xstate")


@dataclass
class XenBoot:
    returncode: int | None
    elapsed: float
    marker_s: float | None
    console: str
    stderr: str
    guest_hello: str | None = None
    host_reply: str | None = None
    host_errors: list[str] = field(default_factory=list)
    stats: dict | None = None

    @property
    def marker_line(self) -> str | None:
        m = re.search(rf"^{XEN_MARKER}.*$", self.console, re.M)
        return m.group(0).strip() if m else None

    @property
    def dmesg(self) -> str:
        i, j = self.console.find(DMESG_BEGIN + "\n"), self.console.find("\n" + DMESG_END)
        if i < 0 or j < 0:
            i, j = self.console.find(DMESG_BEGIN), self.console.find(DMESG_END)
        return self.console[i + len(DMESG_BEGIN):j] if 0 <= i < j else ""

    def dmesg_problems(self, in_rig: bool | None = None) -> list[str]:
        """What is wrong with the guest's dmesg: missing lines, BUG/Oops/WARNING/panic lines
        (in the rig, :data:`RIG_XSAVE_WARNING` after its "XSAVE consistency problem" line is not)."""
        text = self.dmesg
        if not text:
            return ["no dmesg between the markers"]
        if in_rig is None:
            in_rig = bool(os.environ.get("XENKVM_RIG"))
        out = [f"missing {what} ({rx.pattern!r})" for what, rx in DMESG_REQUIRED.items() if not rx.search(text)]
        previous = ""
        for line in text.splitlines():
            rig_known = (in_rig and RIG_XSAVE_WARNING.search(line) is not None
                         and "XSAVE consistency problem" in previous)
            if DMESG_FORBIDDEN.search(line) and "panic=-1" not in line and not rig_known:
                out.append(f"bad line: {line.strip()}")
            previous = line
        return out


def _responder(sock: Path, stop: threading.Event, result: XenBoot, shutdown: str | None,
               marker_seen: threading.Event) -> None:
    """Wait for the guest's key, answer it; optionally request a shutdown once the guest has
    printed the marker and its dmesg (``marker_seen``)."""
    from xenkvm.xenstore import XenstoreError
    from xenkvm.xenstore.client import XsClient

    while not sock.exists():
        if stop.wait(0.2):
            return
    try:
        with XsClient(str(sock), timeout=1.0) as xs:
            xs.watch(f"{HOME}/{GUEST_KEY}", "guest-hello")
            while not stop.is_set():
                try:
                    xs.wait_event()
                except TimeoutError:
                    continue
                try:
                    value = xs.read(f"{HOME}/{GUEST_KEY}").decode(errors="replace")
                except XenstoreError:
                    continue  # the watch fires once at registration, before the key exists
                result.guest_hello = value
                result.host_reply = f"host-saw:{value.replace(' ', '_')}"
                xs.write(f"{HOME}/{HOST_KEY}", result.host_reply)
                break
            if shutdown is None:
                return
            while not marker_seen.wait(0.5):
                if stop.is_set():
                    return
            xs.write(f"{HOME}/control/shutdown", shutdown)
    except (OSError, ConnectionError) as e:
        if not stop.is_set():
            result.host_errors.append(f"xenstore client: {e}")
    except Exception as e:  # noqa: BLE001 - reported by the test
        result.host_errors.append(f"xenstore client: {e!r}")


def _run_host(host: "HostStep", proc: subprocess.Popen, console: Path, sock: Path, result: XenBoot) -> None:
    try:
        host(proc, console, sock)
    except Exception as e:  # noqa: BLE001 - reported by the test
        result.host_errors.append(f"host step: {e!r}")


#: A host-side step run (in a thread) once the guest has dumped its dmesg: (VMM process,
#: console log, xenstore socket).  It ends the guest itself (e.g. ``xenkvm shutdown``).
HostStep = Callable[[subprocess.Popen, Path, Path], None]


def boot(guest: Path, workdir: Path, *, vcpus: int | None = None, timeout: float = 2400,
         cmdline_extra: str = "", shutdown: str | None = None, stats: bool = False,
         trap: str | None = None, verbose: bool = False, memory: str | None = None,
         host: HostStep | None = None) -> XenBoot:
    """Run ``guest`` to its end (or ``timeout``) with the host side of the round trip.

    ``trap`` overrides the yaml's hypercall_trap; ``verbose`` logs at INFO (the traps
    chosen, the boot protocol) into ``stderr``; ``memory`` overrides the yaml's memory;
    ``host`` is run in a thread once the guest has dumped its dmesg (it ends the guest).
    """
    console = workdir / "console.log"
    sock = workdir / "xenstored.sock"
    for p in (console, sock):
        if p.exists():
            p.unlink()
    if stats:  # the same run, but in a child that dumps the dispatcher's per-hypercall stats
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run_guest.py"), "--stats", str(workdir / "stats.json")]
    else:
        cmd = [sys.executable, "-m", "xenkvm", *(["-v"] if verbose else []), "run"]
    cmd += [str(guest), "--console", f"file:{console}", "--xenstore-socket", str(sock)]
    if trap is not None:
        cmd += ["--hypercall-trap", trap]
    if vcpus is not None:
        cmd += ["--vcpus", str(vcpus)]
    if memory is not None:
        cmd += ["--memory", memory]
    if cmdline_extra:
        from xenkvm.config import load_config
        cmd += ["--cmdline", f"{load_config(guest).cmdline} {cmdline_extra}"]
    result = XenBoot(None, 0.0, None, "", "")
    stop, marker_seen = threading.Event(), threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    helper = threading.Thread(target=_responder, args=(sock, stop, result, shutdown, marker_seen), daemon=True)
    helper.start()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if not marker_seen.is_set() and console.exists():
                text = console.read_bytes()
                if result.marker_s is None and XEN_MARKER.encode() in text:
                    result.marker_s = time.monotonic() - t0
                if DMESG_END.encode() in text:  # the guest has dumped its dmesg: it may be stopped
                    marker_seen.set()
                    if host is not None:
                        threading.Thread(target=_run_host, args=(host, proc, console, sock, result),
                                         daemon=True).start()
            if time.monotonic() - t0 > timeout:
                stacks_then_kill(proc)
                break
            time.sleep(0.25)
        proc.wait()
    finally:
        stop.set()
        helper.join(timeout=5)
        reader.join(timeout=5)
    result.elapsed = time.monotonic() - t0
    result.returncode = proc.returncode
    result.stderr = "".join(err)
    result.console = console.read_text(errors="replace") if console.exists() else ""
    if result.marker_s is None and XEN_MARKER in result.console:
        result.marker_s = result.elapsed
    if stats and (workdir / "stats.json").exists():
        import json
        result.stats = json.loads((workdir / "stats.json").read_text())
    return result
