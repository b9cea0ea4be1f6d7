"""HaltWatch: when a guest counts as stopped for good (no KVM: fake vCPUs on real threads)."""
from __future__ import annotations

import collections
import queue
import threading
from types import SimpleNamespace

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.machine import vcpu_loop
from xenkvm.machine.vcpu_loop import HaltWatch, VcpuState

HALTED, RUNNABLE = lib.KVM_MP_STATE_HALTED, lib.KVM_MP_STATE_RUNNABLE


def test_stopped_for_good() -> None:
    assert VcpuState(HALTED, False, False).stopped_for_good
    assert not VcpuState(HALTED, True, False).stopped_for_good          # an interrupt can wake it
    assert not VcpuState(HALTED, False, True).stopped_for_good          # an NMI/exception is queued
    assert not VcpuState(RUNNABLE, False, False).stopped_for_good
    assert VcpuState(lib.KVM_MP_STATE_UNINITIALIZED, True, False).stopped_for_good  # AP never started


class FakeVcpus:
    """vCPU threads that run queued work, each reporting a state the test sets."""

    def __init__(self, states: list[VcpuState]):
        self.states = states
        self.vcpus = [SimpleNamespace(id=i, work=collections.deque(), run_struct=SimpleNamespace(
            exit_reason=lib.KVM_EXIT_INTR)) for i in range(len(states))]
        self.queues = [queue.Queue() for _ in states]
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(states))]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        while (fn := self.queues[i].get()) is not None:
            fn(self.vcpus[i])
            self.queues[i].task_done()
        self.queues[i].task_done()

    def run_on_vcpu(self, i: int, fn) -> None:
        self.queues[i].put(fn)

    def settle(self) -> None:
        for q in self.queues:
            q.join()

    def close(self) -> None:
        for q in self.queues:
            q.put(None)


def _ticks(states: list[VcpuState], n: int, monkeypatch) -> list[str | None]:
    fakes = FakeVcpus(states)
    monkeypatch.setattr(vcpu_loop, "read_state", lambda v: fakes.states[v.id])
    watch = HaltWatch(fakes.vcpus, fakes.run_on_vcpu)
    out = []
    for _ in range(n):
        out.append(watch.tick())
        fakes.settle()
    fakes.close()
    return out


def test_all_halted_with_if_clear_is_dead_after_a_synchronized_round(monkeypatch) -> None:
    dead = VcpuState(HALTED, False, False)
    verdicts = _ticks([dead, dead], 3, monkeypatch)
    assert verdicts[:2] == [None, None] and verdicts[2] is not None and "stopped for good" in verdicts[2]


def test_one_vcpu_that_can_wake_keeps_the_guest_alive(monkeypatch) -> None:
    assert _ticks([VcpuState(HALTED, False, False), VcpuState(HALTED, True, False)], 5, monkeypatch) == [None] * 5


def test_vcpu_with_queued_work_keeps_the_guest_alive(monkeypatch) -> None:
    dead = VcpuState(HALTED, False, False)
    fakes = FakeVcpus([dead])
    monkeypatch.setattr(vcpu_loop, "read_state", lambda v: dead)
    fakes.vcpus[0].work.append(lambda v: None)     # e.g. an event injection another thread queued
    watch = HaltWatch(fakes.vcpus, fakes.run_on_vcpu)
    for _ in range(4):
        assert watch.tick() is None
        fakes.settle()
    fakes.close()


def test_a_vcpu_that_does_not_answer_keeps_the_guest_alive(monkeypatch) -> None:
    dead = VcpuState(HALTED, False, False)
    fakes = FakeVcpus([dead, dead])
    monkeypatch.setattr(vcpu_loop, "read_state", lambda v: dead)
    monkeypatch.setattr(HaltWatch, "SYNC_TIMEOUT", 0.05)
    answered = []
    watch = HaltWatch(fakes.vcpus, lambda i, fn: fakes.run_on_vcpu(i, fn) if i == 0 else answered.append(i))
    for _ in range(4):
        assert watch.tick() is None
        fakes.settle()
    fakes.close()


def test_a_vcpu_that_made_a_real_exit_is_running(monkeypatch) -> None:
    dead = VcpuState(HALTED, False, False)
    fakes = FakeVcpus([dead])
    monkeypatch.setattr(vcpu_loop, "read_state", lambda v: dead)
    fakes.vcpus[0].run_struct.exit_reason = lib.KVM_EXIT_IO
    watch = HaltWatch(fakes.vcpus, fakes.run_on_vcpu)
    for _ in range(4):
        assert watch.tick() is None
        fakes.settle()
    fakes.close()
