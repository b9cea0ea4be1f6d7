"""pvclock pairs read at one instant, though the publishing thread is preempted (xen/shinfo.py).

A pvclock is (TSC, system time) and a TSC offset is (guest TSC, host TSC): each pair is
two reads that must describe one instant.  A thread preempted between them (a loaded
host; the rig's TCG L1, where it was seen: xen_evtchn's VCPU_SSHOTTMR_future deadline 1 ms
in the past by the guest's clock was taken as future) publishes a pvclock ahead of system
time by what it lost.  Here the host TSC and system time are an injected clock that a
"preemption" advances in the middle of the first pair; the published pvclock must still
agree with system time.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from xenkvm.xen import shinfo as shinfo_mod
from xenkvm.xen.abi import ffi
from xenkvm.xen.shinfo import MSR_IA32_TSC

#: host TSC ticks each read of the injected clock takes
STEP = 100
GUEST_OFFSET = 123_456_789


def _ticks(xen_machine, us: int) -> int:
    """Host TSC ticks in ``us`` microseconds (the host TSC runs at the real rate)."""
    return xen_machine.tsc_khz * us // 1000


@dataclass
class InjectedTsc:
    """The host TSC; ``lose`` ticks pass (a preemption) in the middle of the first pair read."""

    ticks: int = 10**12
    lose: list[int] = field(default_factory=list)

    def read(self) -> int:
        self.ticks += STEP
        return self.ticks

    def preempt(self) -> None:
        if self.lose:
            self.ticks += self.lose.pop()


@dataclass
class SlowIoctlVcpu:
    """A vCPU whose first MSR read returns only after a preemption (a slow ioctl)."""

    tsc: InjectedTsc
    id: int = 0

    def get_msrs(self, msrs):
        value = self.tsc.read() + GUEST_OFFSET
        self.tsc.preempt()
        return {MSR_IA32_TSC: value}


def _published(info: bytes) -> tuple[int, int]:
    """(tsc_timestamp, system_time) of a vcpu_time_info."""
    return struct.unpack_from("<QQ", info, ffi.offsetof("struct vcpu_time_info", "tsc_timestamp"))


def test_pvclock_pair_holds_when_the_publisher_is_preempted(xen_machine, monkeypatch):
    st = xen_machine.xen.shinfo
    tsc = InjectedTsc(lose=[_ticks(xen_machine, 50_000)])

    def system_time() -> int:          # Xen system time, on the injected clock
        tsc.preempt()
        return st.scale.ns(tsc.read())

    monkeypatch.setattr(shinfo_mod, "host_tsc", tsc.read)
    monkeypatch.setattr(xen_machine.xen, "now_ns", system_time)
    st.tsc_offsets[0] = GUEST_OFFSET
    tsc_ts, sys_time = _published(st.time_info(0))
    host = tsc.read()
    guest_now = sys_time + st.scale.ns(host + GUEST_OFFSET - tsc_ts)
    assert abs(guest_now - st.scale.ns(host)) <= st.scale.ns(_ticks(xen_machine, 100))


def test_tsc_offset_holds_when_the_msr_read_is_slow(xen_machine, monkeypatch):
    st = xen_machine.xen.shinfo
    tsc = InjectedTsc(lose=[_ticks(xen_machine, 50_000)])
    monkeypatch.setattr(shinfo_mod, "host_tsc", tsc.read)
    st.tsc_stable = False                  # the host where offsets are re-measured
    st.resync(SlowIoctlVcpu(tsc))
    assert abs(st.tsc_offsets[0] - GUEST_OFFSET) <= _ticks(xen_machine, 100)
