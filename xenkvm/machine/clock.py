"""The guest's sense of time, which may run slower than the host's (time dilation).

On PVM hosts guest ring 0 is emulated, and a 4 ms timer tick costs more than
4 ms, so guests are told a TSC rate ~15x the real one (``Host.dilated_tsc_khz``)
and every clock the VMM shows them runs slower by the same factor: the ACPI PM
timer, Xen system time and pvclock, Xen timer deadlines.  On hardware KVM the
factor is 1.

Every VMM clock reads the host's time through a ``HostClock`` (the real one
is ``MONOTONIC``), so timer code can be run on a clock a test advances.
"""
from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from xenkvm.kvm._kvm_cffi import lib as _c


def host_tsc() -> int:
    """The host CPU's TSC (guest TSC = host TSC + KVM's per-VM offset; no TSC scaling here)."""
    return _c.xk_rdtsc()


class HostClock(Protocol):
    """The host's monotonic time as the VMM's timers and I/O loop see it."""

    def now_ns(self) -> int:
        """Monotonic nanoseconds."""

    def wait_s(self, delta_ns: int) -> float | None:
        """How many real seconds a wait for ``delta_ns`` of this clock may block (None: until woken)."""

    def on_jump(self, wake: Callable[[], None]) -> None:
        """Have ``wake`` called whenever this clock moves other than by real time passing."""


class MonotonicClock:
    """The real clock: ``time.monotonic_ns``; it never jumps."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def wait_s(self, delta_ns: int) -> float | None:
        return max(0.0, delta_ns / 1e9)

    def on_jump(self, wake: Callable[[], None]) -> None:
        """Real time only ever passes: nothing to register."""


#: The host clock every machine uses unless another is injected (stateless).
MONOTONIC: HostClock = MonotonicClock()


@dataclass(frozen=True)
class GuestClock:
    """Guest ns = host ns since boot x num / den (host ns from ``host``; boot_ns: its now by default)."""

    num: int = 1
    den: int = 1
    boot_ns: int = None  # type: ignore[assignment]
    host: HostClock = MONOTONIC

    def __post_init__(self) -> None:
        if self.boot_ns is None:
            object.__setattr__(self, "boot_ns", self.host.now_ns())

    @classmethod
    def for_tsc(cls, real_khz: int, told_khz: int | None, host: HostClock = MONOTONIC) -> "GuestClock":
        if not told_khz or told_khz == real_khz or real_khz <= 0:
            return cls(host=host)
        return cls(real_khz, told_khz, host=host)

    @property
    def dilation(self) -> float:
        return self.den / self.num

    def ns(self) -> int:
        """Guest nanoseconds since the machine was created."""
        return (self.host.now_ns() - self.boot_ns) * self.num // self.den

    def resumed_at(self, guest_ns: int) -> "GuestClock":
        """The same clock, continued: it reads ``guest_ns`` now (a restored snapshot)."""
        return dataclasses.replace(self, boot_ns=self.host.now_ns() - guest_ns * self.den // self.num)

    def monotonic_at(self, guest_ns: int) -> int:
        """The host monotonic time at which the guest clock reads ``guest_ns``."""
        return self.boot_ns + guest_ns * self.den // self.num
