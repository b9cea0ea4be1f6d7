"""The fast path's port table and eventfd pool (xen/fastpath.py), and how event-channel binding
keeps them in step with the port table: a port is registered exactly while a service bound it
with a kick eventfd, and Python's sends on it do what the C loop does.

The C loop itself runs real guests under /dev/kvm in tests/backends/test_blkfront_guest.py
(the same guest with the fast path on and off) and tests/xen/test_xen_guests.py (the timer
guests with their single-shot timers in C).  Here the timers' Python half is driven by hand,
writing the C table as ``xkf_run`` would.
"""
from __future__ import annotations

import errno
import os
import time
from types import SimpleNamespace

import pytest

from evtchnfakes import FakeDomain
from fakeclock import FakeClock
from xenkvm.kvm.errors import KvmError
from xenkvm.machine.layout import HYPERCALL_PORT, SEND_PORT
from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.evtchn.ports import PortState
from xenkvm.xen.evtchn.vmm import EvtchnError
from xenkvm.xen.fastpath import NPORTS, FastSend, drain
from xenkvm.xen.fastpath import lib as fastlib


def registered(fast: FastSend, port: int) -> int:
    """What the C loop would find for ``port``: its eventfd, or -1."""
    return fast.c.send_fd[port]


@pytest.fixture
def dom():
    d = FakeDomain(nvcpus=1)
    yield d
    d.io.stop()
    d.fast.close()


def unbound_port(d) -> int:
    """A guest port allocated unbound to domain 0, as a frontend does for its ring."""
    with d.lock:
        p = d.evtchn.alloc(PortState.UNBOUND, 0)
        p.remote_dom = 0
        return p.port


def test_a_port_bound_with_a_kick_fd_is_registered_and_signalled_once_at_bind(dom):
    fd = dom.fast.lease_fd()
    port = unbound_port(dom)
    dom.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    assert registered(dom.fast, port) == fd
    # Xen's bind_interdomain notifies the binder once (sends to the unbound port were dropped)
    assert drain(fd) == 1 and dom.fast.last_send_ns(port) > 0


def test_a_python_send_on_a_registered_port_does_what_c_does(dom):
    fd = dom.fast.lease_fd()
    port = unbound_port(dom)
    dom.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    drain(fd)
    before = time.perf_counter_ns()
    with dom.lock:
        dom.evtchn.vmm.queue_notify(dom.evtchn.table.get(port).vmm)   # a guest EVTCHNOP_send in Python
    assert drain(fd) == 1
    # stamped on the clock EventLatency uses (CLOCK_MONOTONIC), as xkf_monotonic_ns stamps in C
    assert before <= dom.fast.last_send_ns(port) <= time.perf_counter_ns()


def end_binding(dom, port: int, how: str) -> None:
    """End a backend's binding of ``port`` the way ``how`` says."""
    if how == "backend closes":
        dom.evtchn.close_vmm_port(port)
    elif how == "guest closes":
        with dom.lock:
            dom.evtchn.close_port(dom.evtchn.table.get(port), from_guest=True)
    else:
        dom.evtchn.guest_reset()


@pytest.mark.parametrize("how", ["backend closes", "guest closes", "guest resets"])
def test_the_port_is_withdrawn_whoever_ends_the_binding(dom, how):
    fd = dom.fast.lease_fd()
    port = unbound_port(dom)
    dom.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    end_binding(dom, port, how)
    assert registered(dom.fast, port) == -1 and port not in dom.fast.ports
    drain(fd)
    dom.fast.signal(port)                          # a late send in Python: not this service's any more
    assert drain(fd) == 0


def test_a_callback_binding_is_not_registered(dom):
    port = unbound_port(dom)
    dom.evtchn.bind_vmm_to_guest_port(port, lambda: None, direct=True)
    assert registered(dom.fast, port) == -1


def test_bind_takes_a_callback_or_a_kick_fd_not_both(dom):
    port = unbound_port(dom)
    with pytest.raises(EvtchnError):
        dom.evtchn.bind_vmm_to_guest_port(port, lambda: None, kick_fd=dom.fast.lease_fd())
    with pytest.raises(EvtchnError):
        dom.evtchn.bind_vmm_to_guest_port(port)


def test_ports_beyond_the_table_work_through_python_only():
    fast = FastSend(GuestMemory(4 << 20), HYPERCALL_PORT)
    fd = fast.lease_fd()
    fast.register(NPORTS + 5, fd)                  # a FIFO guest's high port: no C entry, still signalled
    fast.signal(NPORTS + 5)
    assert drain(fd) == 1 and fast.last_send_ns(NPORTS + 5) == 0
    fast.withdraw(NPORTS + 5)
    fast.close()


def test_released_eventfds_stay_open_and_are_reused_drained():
    """A vCPU may still write a withdrawn port's fd: it must never be a closed (reusable) number."""
    fast = FastSend(GuestMemory(4 << 20), HYPERCALL_PORT)
    fd = fast.lease_fd()
    os.eventfd_write(fd, 3)
    fast.release_fd(fd)
    os.eventfd_write(fd, 1)                        # the late write: lands in the pooled fd, harmless
    again = fast.lease_fd()
    assert again == fd and drain(again) == 0       # handed out empty: no phantom kick for its new owner
    fast.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_c_table_covers_guest_ram_only():
    mem = GuestMemory(8 << 20)
    fast = FastSend(mem, HYPERCALL_PORT)
    assert fast.c.nregions == len(mem.ram_regions())
    r = fast.c.regions[0]
    assert (r.gpa, r.size, r.hva) == (0, 8 << 20, mem.ram_regions()[0].host_addr)
    assert fastlib.xkf_sends(fast.c) == 0
    fast.close()


# -- single-shot timers kept in C (VcpuTimers.use_fast) ------------------------------------------
@pytest.fixture
def timed():
    """A FakeDomain on a FakeClock whose timers use the C table (armed here by hand, as C would)."""
    clock = FakeClock()
    d = FakeDomain(nvcpus=2, clock=clock)
    d.timers.use_fast(d.fast)
    d.fast.publish_clock((d.clock.boot_ns, 0, 1, 1))
    fired: list[int] = []
    d.timers._fire = lambda v: fired.append(v)          # type: ignore[method-assign]
    yield SimpleNamespace(d=d, clock=clock, fired=fired)
    d.timers.detach_fast()
    d.io.stop()
    d.fast.close()


def c_arms(d, vcpu: int, deadline: int) -> None:
    """What xkf_run does for the vCPU's VCPUOP_set_singleshot_timer (deadline, generation)."""
    d.fast._deadlines[vcpu] = deadline
    d.fast._gens[vcpu] += 1


def test_c_timers_fire_once_when_due_and_not_when_rearmed(timed):
    d, clock, fired = timed.d, timed.clock, timed.fired
    now = d.now_ns()
    c_arms(d, 1, now + 5_000_000)
    assert d.timers.singleshot_deadline(1) == now + 5_000_000
    d.timers._check_fast(1)                     # the timerfd woke early (clock re-published): look again
    assert fired == []
    clock.advance(5_000_000)
    assert d.io.wait_idle()
    assert fired == [1] and d.timers.singleshot_deadline(1) is None
    d.timers._check_fast(1)                     # a second wake-up for the same expiry: nothing
    assert fired == [1]
    c_arms(d, 1, d.now_ns() - 1)                # expired, but the vCPU re-arms before the I/O thread claims it
    stale = d.fast.timer_deadline(1)
    c_arms(d, 1, d.now_ns() + 10**9)
    assert not d.fast.take_timer(1, stale)
    d.timers._check_fast(1)
    assert fired == [1]


def test_python_arming_clears_c_and_c_arming_makes_python_stale(timed):
    d, clock, fired = timed.d, timed.clock, timed.fired
    c_arms(d, 0, d.now_ns() + 1_000_000)
    d.timers.set_singleshot(0, d.now_ns() + 2_000_000)     # e.g. set_timer_op, handled in Python
    assert d.fast.timer_deadline(0) is None and d.timers.singleshot_deadline(0) == d.now_ns() + 2_000_000
    c_arms(d, 0, d.now_ns() + 3_000_000)                    # the guest re-arms through C
    assert d.timers.singleshot_deadline(0) == d.now_ns() + 3_000_000
    clock.advance(2_000_000)
    assert d.io.wait_idle()
    assert fired == []                                      # Python's arm was replaced
    assert d.timers.to_state()["singleshot"][0] == d.now_ns() + 1_000_000
    d.timers.stop_singleshot(0)
    assert d.timers.singleshot_deadline(0) is None and d.fast.timer_deadline(0) is None


def test_a_frozen_clock_leaves_arming_to_python(timed):
    d = timed.d
    assert d.fast.c.timer_on == 1
    d.fast.publish_clock(None)
    assert d.fast.c.timer_on == 0 and d.fast.c.clock_seq % 2 == 0


class RecordingVm:
    """KVM_IOEVENTFD as the fast path asks for it (Vm.port_eventfd); ``refuse``: values KVM refuses."""

    def __init__(self, refuse=()):
        self.bound: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.refuse = set(refuse)

    def port_eventfd(self, io_port, size, value, fd, assign=True):
        self.calls.append((assign, io_port, size, value, fd))
        if assign:
            if value in self.refuse or value in self.bound:
                raise KvmError("KVM_IOEVENTFD", errno.ENOSPC if value in self.refuse else errno.EEXIST)
            self.bound[value] = fd
        elif self.bound.get(value) == fd:
            del self.bound[value]
        else:
            raise KvmError("KVM_IOEVENTFD", errno.ENOENT)


def test_kicks_in_kvm_bind_every_registered_port_now_and_later(dom):
    first, fd1 = unbound_port(dom), dom.fast.lease_fd()
    dom.evtchn.bind_vmm_to_guest_port(first, kick_fd=fd1)
    vm = RecordingVm()
    with dom.lock:
        dom.fast.use_kernel_kicks(vm, SEND_PORT)
    second, fd2 = unbound_port(dom), dom.fast.lease_fd()
    dom.evtchn.bind_vmm_to_guest_port(second, kick_fd=fd2)
    assert vm.bound == {first: fd1, second: fd2} and dom.fast.in_kernel == vm.bound
    assert {c[1:3] for c in vm.calls} == {(SEND_PORT, 4)} and dom.fast.kernel_binds == 2
    assert registered(dom.fast, first) == fd1        # an unmatched send still finds it (Python's signal)


@pytest.mark.parametrize("how", ["backend closes", "guest closes", "guest resets"])
def test_the_ioeventfd_goes_with_the_binding_whoever_ends_it(dom, how):
    vm = RecordingVm()
    with dom.lock:
        dom.fast.use_kernel_kicks(vm, SEND_PORT)
    fd = dom.fast.lease_fd()
    port = unbound_port(dom)
    dom.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    assert vm.bound == {port: fd}
    end_binding(dom, port, how)
    assert vm.bound == {} and dom.fast.in_kernel == {}
    assert vm.calls[-1] == (False, SEND_PORT, 4, port, fd)


def test_a_port_rebound_to_another_eventfd_moves_its_ioeventfd(dom):
    vm = RecordingVm()
    with dom.lock:
        dom.fast.use_kernel_kicks(vm, SEND_PORT)
        dom.fast.register(9, 100)
        dom.fast.register(9, 101)
    assert vm.bound == {9: 101} and vm.calls[-2] == (False, SEND_PORT, 4, 9, 100)


def test_a_binding_kvm_refuses_leaves_the_port_to_the_vmm(dom, caplog):
    fd = dom.fast.lease_fd()
    port = unbound_port(dom)
    vm = RecordingVm(refuse={port})
    with dom.lock:
        dom.fast.use_kernel_kicks(vm, SEND_PORT)
    dom.evtchn.bind_vmm_to_guest_port(port, kick_fd=fd)
    assert vm.bound == {} and dom.fast.in_kernel == {} and registered(dom.fast, port) == fd
    assert "no in-kernel kick" in caplog.text
    dom.evtchn.close_vmm_port(port)                   # nothing to remove: no error
    assert vm.calls[-1][0] is True
