"""The guest's sense of time, which may run slower than the host's (time dilation).

On PVM hosts guest ring 0 is emulated, and a 4 ms timer tick costs more than
4 ms, so guests are told a TSC rate ~15x the real one (``Host.dilated_tsc_khz``)
and every clock the VMM shows them runs slower by the same factor: the ACPI PM
timer, Xen system time and pvclock, Xen timer deadlines.  On hardware KVM the
factor is 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GuestClock:
    """Guest ns = host ns since boot x num / den."""

    num: int = 1
    den: int = 1
    boot_ns: int = field(default_factory=time.monotonic_ns)

    @classmethod
    def for_tsc(cls, real_khz: int, told_khz: int | None) -> "GuestClock":
        if not told_khz or told_khz == real_khz or real_khz <= 0:
            return cls()
        return cls(real_khz, told_khz)

    @property
    def dilation(self) -> float:
        return self.den / self.num

    def ns(self) -> int:
        """Guest nanoseconds since the machine was created."""
        return (time.monotonic_ns() - self.boot_ns) * self.num // self.den

    def monotonic_at(self, guest_ns: int) -> int:
        """The host monotonic time at which the guest clock reads ``guest_ns``."""
        return self.boot_ns + guest_ns * self.den // self.num
