"""A held vCPU (Xen's VCPUOP_down) stays out of KVM_RUN but still runs the work queued for
it, and leaves when released or when the machine stops (no KVM: a fake vCPU on a real thread)."""
from __future__ import annotations

import signal
import threading
from types import SimpleNamespace

import pytest

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.machine.vcpu_loop import KICK_SIGNAL, VcpuRunner

INTR, IO = lib.KVM_EXIT_INTR, lib.KVM_EXIT_IO
WAIT = 10.0   #: generous: only a broken hold makes a test wait this long


@pytest.fixture(autouse=True)
def _kick_signal_ignored():
    """A kick signals the vCPU thread (Machine.run installs a no-op handler for it)."""
    old = signal.signal(KICK_SIGNAL, lambda *_: None)
    yield
    signal.signal(KICK_SIGNAL, old)


class FakeVcpu:
    """KVM_RUN that records each call: with ``immediate_exit`` it returns EINTR at once (as KVM
    does after completing the last exit); without, it "runs the guest" and exits with IO."""

    def __init__(self) -> None:
        self.id = 1
        self.run_struct = SimpleNamespace(exit_reason=IO, immediate_exit=0)
        self.runs: list[bool] = []            # immediate_exit at each KVM_RUN
        self.guest_ran = threading.Event()

    def set_immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def run(self) -> int:
        self.runs.append(bool(self.run_struct.immediate_exit))
        if self.run_struct.immediate_exit:
            self.run_struct.exit_reason = INTR
        else:
            self.guest_ran.set()
            self.run_struct.exit_reason = IO
        return self.run_struct.exit_reason


class Rig:
    """One runner on its own thread; the test decides when the machine stops."""

    def __init__(self, held: bool):
        self.vcpu = FakeVcpu()
        self.runner = VcpuRunner(self.vcpu)   # type: ignore[arg-type]
        self.runner.set_held(held)
        self.vcpu.set_immediate_exit(False)   # as a vCPU that just made a real exit (IO)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, daemon=True, args=(
            {IO: self._on_io}, self.stop.is_set, self._unhandled, None))
        self.thread.start()

    def _on_io(self, _vcpu) -> None:
        """A handled port exit: nothing to do."""

    def _unhandled(self, _vcpu, reason: int) -> None:
        raise AssertionError(f"unhandled exit {reason}")

    def run_on_vcpu(self) -> threading.Event:
        """Queue work; the event is set when it ran and saw the vCPU after KVM_EXIT_INTR (found
        after a real exit, it is queued again, as snapshot parking does)."""
        done = threading.Event()

        def work(v) -> None:
            if v.run_struct.exit_reason == INTR:
                done.set()
            else:               # from another thread: the exit's handler must run first
                threading.Timer(0.001, self.runner.queue, (work,)).start()
        self.runner.queue(work)
        return done

    def finish(self) -> None:
        self.stop.set()
        self.runner.kick()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the vCPU thread did not leave when the machine stopped"


def test_a_held_vcpu_completes_its_exit_then_stays_out_of_kvm_run() -> None:
    rig = Rig(held=True)
    assert rig.run_on_vcpu().wait(WAIT)          # queued work runs while held ...
    assert rig.run_on_vcpu().wait(WAIT)          # ... each time, after an EINTR return
    assert rig.vcpu.runs == [True]               # one KVM_RUN, with immediate_exit: no guest code
    assert not rig.vcpu.guest_ran.is_set()
    rig.finish()


def test_a_held_vcpu_runs_again_once_released() -> None:
    rig = Rig(held=True)
    assert rig.run_on_vcpu().wait(WAIT)
    rig.runner.set_held(False)
    assert rig.vcpu.guest_ran.wait(WAIT)
    rig.finish()


def test_holding_a_running_vcpu_stops_it_at_its_next_exit() -> None:
    rig = Rig(held=False)
    assert rig.vcpu.guest_ran.wait(WAIT)
    rig.runner.set_held(True)
    assert rig.run_on_vcpu().wait(WAIT)          # the work ran: the vCPU is at its hold
    runs = len(rig.vcpu.runs)
    assert rig.run_on_vcpu().wait(WAIT)
    assert len(rig.vcpu.runs) == runs            # no KVM_RUN while held
    rig.finish()


def test_a_held_vcpu_leaves_when_the_machine_stops() -> None:
    rig = Rig(held=True)
    assert rig.run_on_vcpu().wait(WAIT)
    rig.finish()
