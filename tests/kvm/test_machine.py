"""Whole machines under /dev/kvm: test guests, stop paths and their exit statuses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import guestgen
from xenkvm.config import GuestConfig
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.extension import MachineExtension
from xenkvm.cli import STACKS_SIGNAL
from xenkvm.machine.machine import ExitStatus, Machine
from guestbuild import build_guests

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built_guests() -> Path:
    build_guests()
    return ROOT / "guests"


def xenkvm(*args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def raw_guest(tmp_path: Path, code: bytes, name: str = "raw") -> Path:
    p = tmp_path / f"{name}.elf"
    p.write_bytes(guestgen.pvh_elf(code))
    return p


def run_machine(kernel: Path, vcpus: int = 1) -> tuple[Machine, object, bytes]:
    sink = ConsoleSink(None)
    m = Machine(GuestConfig(name="t", kernel=kernel, memory=32 << 20, vcpus=vcpus, console="none"), sink=sink)
    try:
        result = m.run()
    finally:
        m.close()
    return m, result, sink.tail()


def test_hello_guest_passes(built_guests):
    r = xenkvm("run", "guests/hello.yaml")
    assert r.returncode == 0, r.stderr
    assert "Hello from xenkvm guest" in r.stdout
    assert "FAIL" not in r.stdout
    assert "SUMMARY:" in r.stdout and ", 0 failed" in r.stdout


def test_smp_guest_two_vcpus(built_guests):
    r = xenkvm("run", "guests/smp.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and ", 0 failed" in r.stdout


def test_power_off_and_console(tmp_path):
    k = raw_guest(tmp_path, guestgen.print_debugcon(b"bye\n") + guestgen.POWER_OFF + guestgen.SPIN)
    _, result, out = run_machine(k)
    assert result.status is ExitStatus.POWEROFF and out == b"bye\n"


def test_unknown_ports_read_all_ones(tmp_path):
    # in al,0x99; out 0xe9,al; in ax,0x99 ... then power off
    code = b"\xe4\x99\xe6\xe9" + guestgen.POWER_OFF
    _, result, out = run_machine(raw_guest(tmp_path, code))
    assert result.status is ExitStatus.POWEROFF and out == b"\xff"


def test_triple_fault_reports_registers(tmp_path):
    r = xenkvm("run", "--kernel", str(raw_guest(tmp_path, guestgen.TRIPLE_FAULT)), "--memory", "32M")
    assert r.returncode == ExitStatus.TRIPLE_FAULT
    assert "triple fault" in r.stderr and "rip=" in r.stderr and "Traceback" not in r.stderr


def test_reset_exit_status(tmp_path):
    _, result, _ = run_machine(raw_guest(tmp_path, guestgen.RESET_CF9 + guestgen.SPIN))
    assert result.status is ExitStatus.RESET


def test_ctrl_c_stops_cleanly(tmp_path):
    k = raw_guest(tmp_path, guestgen.print_debugcon(b"up\n") + guestgen.SPIN)
    # A test run started in the background (`make test &`, nohup) has SIGINT ignored, and an ignored
    # signal stays ignored across exec: Python then keeps ignoring Ctrl-C, as a background job should.
    # The VMM under test is a foreground program, so it gets the default disposition back.
    p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "xenkvm", "run", "--kernel", str(k),
                          "--memory", "32M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline() == b"up\n"
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)             # faulthandler prints every thread's stack
        _, err = p.communicate(timeout=30)
        pytest.fail("still running 30 s after SIGINT:\n" + err.decode(errors="replace")[-6000:])
    assert p.returncode == ExitStatus.INTERRUPTED, err
    assert b"Traceback" not in err


def test_stacks_signal_prints_every_thread_and_the_vmm_runs_on(tmp_path):
    """``kill -USR2`` a running VMM (a hung guest): every thread's stack on stderr, the guest
    runs on, and a later Ctrl-C still stops it as usual."""
    k = raw_guest(tmp_path, guestgen.print_debugcon(b"up\n") + guestgen.SPIN)
    p = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", "--kernel", str(k), "--memory", "32M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline() == b"up\n"
        p.send_signal(STACKS_SIGNAL)
        seen = b""
        while b"vcpu_loop.py" not in seen:          # the vCPU thread's frames, then the main thread's
            line = p.stderr.readline()
            assert line, f"stderr closed before a stack came: {seen[-3000:]!r}"
            seen += line
        assert b"Thread 0x" in seen and p.poll() is None      # still running
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == ExitStatus.INTERRUPTED, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_trace_prints_each_exit(tmp_path):
    k = raw_guest(tmp_path, guestgen.print_debugcon(b"ab") + guestgen.POWER_OFF)
    r = xenkvm("run", "--trace", "--kernel", str(k), "--memory", "32M")
    assert r.returncode == 0
    lines = [x for x in r.stderr.splitlines() if "IO out port=0xe9" in x]
    assert len(lines) == 2


def test_info_describes_host():
    r = xenkvm("info")
    assert r.returncode == 0
    assert "KVM flavour:" in r.stdout and "hypercall traps possible:" in r.stdout
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert "PVM" in r.stdout and "noxsave" in r.stdout


def test_missing_kvm_device_is_one_line(tmp_path, monkeypatch):
    from xenkvm.kvm.errors import KvmError
    from xenkvm.kvm.system import Kvm
    with pytest.raises(KvmError, match="open"):
        Kvm(str(tmp_path / "nokvm"))


def test_faults_of_refused_instructions_reach_the_guest(built_guests):
    """#NM, #UD, #GP(0) and #PF (error code, CR2) from instructions PVM refuses reach the
    guest's own handlers, which resume after them (on hardware KVM the CPU raises them)."""
    r = xenkvm("run", "guests/faults.yaml", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("nm-fnop-ts", "ud-sse-no-osfxsr", "gp-noncanonical", "pf-read-not-present", "pf-read-cr2",
                 "pf-write-not-present", "pf-write-cr2", "pf-write-read-only", "pf-read-only-cr2", "continues"):
        assert f"PASS {name}\n" in r.stdout, r.stdout
    assert "SUMMARY: 10 passed, 0 failed" in r.stdout


def test_guest_halted_for_good_ends_the_run(built_guests):
    """cli; hlt on every vCPU is noticed (within a second or two: the timeout is only a bound)."""
    r = xenkvm("run", "guests/faults.yaml", "--cmdline", "faults xk.halt=cli", timeout=30)
    assert r.returncode == ExitStatus.GUEST_HALTED, r.stdout + r.stderr
    assert "halted with interrupts disabled" in r.stderr and "halting with interrupts off" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("xenkvm: faults:")]) == 1


def test_halt_with_a_timer_pending_is_not_dead(built_guests):
    """sti; hlt with a LAPIC timer due in ~2 s: the guest is waited for, then powers off itself."""
    r = xenkvm("run", "guests/faults.yaml", "--cmdline", "faults xk.halt=sti", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "timer fired" in r.stdout


@pytest.mark.parametrize("poster", ["other thread", "own thread"])
def test_work_posted_at_the_worst_moment_still_runs(tmp_path, poster):
    """run_on_vcpu between the work-queue drain and KVM_RUN must not be lost.

    The guest halts with interrupts on and nothing armed, so KVM_RUN returns
    only when kicked.  The work is posted from the ``before_run`` seam, after
    the drain: from another thread, its signal lands (and is consumed) while
    the vCPU thread is still outside KVM_RUN; from the vCPU's own thread no
    signal is sent at all.  Only ``immediate_exit`` gets either out.
    """
    k = raw_guest(tmp_path, guestgen.IDLE_LOOP)
    m = Machine(GuestConfig(name="t", kernel=k, memory=32 << 20, vcpus=1, console="none"), sink=ConsoleSink(None))
    ran = threading.Event()
    posted: list[str] = []

    def post() -> None:
        m.run_on_vcpu(0, lambda vcpu: ran.set())

    def before_run(vcpu) -> None:
        if posted:
            return
        posted.append(threading.current_thread().name)
        if poster == "own thread":
            post()
        else:  # the signal is delivered before join() returns, i.e. before this KVM_RUN
            t = threading.Thread(target=post)
            t.start()
            t.join()

    def on_started(machine: Machine) -> None:
        ok = ran.wait(20)  # a generous bound: without the fix this would wait forever
        machine.stop(ExitStatus.POWEROFF if ok else ExitStatus.VMM_ERROR, "work ran" if ok else "work lost")

    m.before_run = before_run
    try:
        result = m.run(on_started)
    finally:
        m.close()
    assert posted == ["vcpu0"]
    assert result.status is ExitStatus.POWEROFF, result.message


class RecordingExtension(MachineExtension):
    """A personality that is not Xen: its own CPUID leaf and a port hook, every hook recorded."""

    PORT = 0xE0
    SIGNATURE = 0x1234_5678

    def __init__(self, machine: Machine):
        self.machine = machine
        self.calls: list[str] = []
        self.seen: list[int] = []

    def cpuid_leaves(self, vcpu_id: int):
        return [(0x4000_0000, 0, 0, 0x4000_0000, self.SIGNATURE, 0, 0)]

    def install(self, entry) -> None:
        self.calls.append(f"install {entry.mode.value}")
        self.machine.register_port_hook(self.PORT, self.on_port)

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")

    def on_port(self, vcpu) -> None:
        self.seen.append(int.from_bytes(vcpu.io_data()[:4], "little"))
        self.machine.power_off()


def test_an_extension_gets_its_cpuid_leaf_port_and_lifecycle(tmp_path):
    """The seam on a real guest: it reads the extension's CPUID leaf and reports it on the hooked port."""
    code = (b"\xb8\x00\x00\x00\x40"     # mov eax, 0x40000000
            b"\x0f\xa2"                 # cpuid
            b"\x89\xd8"                 # mov eax, ebx
            + bytes([0xE7, RecordingExtension.PORT])  # out PORT, eax
            + guestgen.SPIN)
    k = raw_guest(tmp_path, code)
    m = Machine(GuestConfig(name="t", kernel=k, memory=32 << 20, vcpus=1, console="none"), sink=ConsoleSink(None))
    ext = RecordingExtension(m)
    m.attach(ext)
    try:
        result = m.run()
    finally:
        m.close()
    assert result.status is ExitStatus.POWEROFF, result.message
    assert ext.seen == [RecordingExtension.SIGNATURE]
    assert ext.calls == ["install pvh", "start", "stop", "close"]
