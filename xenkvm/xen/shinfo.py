"""shared_info, vcpu_info, pvclock, wallclock and runstate areas in guest memory.

The guest chooses where each lives (XENMEM_add_to_physmap for shared_info,
VCPUOP_register_vcpu_info, VCPUOP_register_*_memory_area); this module keeps
the locations and writes the time data with Xen's version protocol (odd
while updating).  pvclock describes the *guest* TSC: guest TSC = host TSC +
KVM's offset, measured once on vCPU 0 before it first runs, and mul/shift come
from the real TSC rate (a zero mul crashes Linux: linux.md 2.3 step 5).

``XEN_PVCLOCK_TSC_STABLE_BIT`` promises the guest that the TSC it reads is one clock
across its vCPUs, so it may skip its own guard against time going backwards
between vCPUs.  KVM keeps the guest TSC a fixed offset from the host's only while
the host's TSC is stable (KVM's master clock needs the host clocksource to be the
TSC); on a host that marked its TSC unstable, KVM rewrites a vCPU's offset when the
vCPU is loaded (its catch-up mode), and our one measured offset goes stale.  Xen
likewise sets the bit only when its own TSC is reliable.  So the bit is set only
when the host's clocksource is ``tsc`` (:func:`host_tsc_stable`); without it Linux's
pvclock keeps the largest value read so far, and its clock never goes backwards.

On such a host each vCPU keeps its own offset, re-measured on its own thread (its
``MSR_IA32_TSC`` against ``rdtsc``) whenever it arms a timer (:meth:`SharedInfo.resync`),
and its pvclock is republished when the offset moved: Xen likewise refreshes a
vCPU's time info when it is scheduled, and a guest reads its clock right before it
computes a timer deadline.  With a stable TSC the one offset measured at start holds.

Each pvclock is a pair (TSC, system time) that must be read at one instant, and an
offset is a guest TSC read against the host's: each is read between two host TSC reads
(:meth:`SharedInfo._bracketed`), and again while those are far apart, for a thread
preempted between its reads (a loaded host, the rig's TCG L1) would otherwise publish a
pvclock that runs ahead of system time by the time it lost: the guest then sees its
timers fire early and deadlines it computed as past taken as future.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xenkvm.machine.clock import host_tsc
from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import XenStruct, ffi, lib
from xenkvm.xen.errors import einval

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

SHARED_INFO = XenStruct("struct shared_info")
VCPU_INFO = XenStruct("struct vcpu_info")
TIME_INFO = XenStruct("struct vcpu_time_info")
RUNSTATE = XenStruct("struct vcpu_runstate_info")
PVCLOCK_TSC_STABLE = 1 << 0
MSR_IA32_TSC = 0x10
#: A re-measured offset within this many TSC ticks of the published one is the same
#: (two reads an ioctl apart differ by a few microseconds of ticks): no republish.
RESYNC_SLACK_US = 50
VCPU_INFO_TIME = VCPU_INFO.offset("time")
SH_MASK = SHARED_INFO.offset("evtchn_mask")
SH_MASK_BYTES = ffi.sizeof(dict(ffi.typeof(SHARED_INFO.ctype).fields)["evtchn_mask"].type)
LEGACY_VCPUS = lib.XEN_LEGACY_MAX_VCPUS
#: A reading bracketed by host TSC reads further apart than this is taken again (up to
#: BRACKET_TRIES times, keeping the narrowest): its thread was preempted meanwhile.
BRACKET_SLACK_US = 20
BRACKET_TRIES = 4
#: The host kernel's clocksource in use (``tsc`` when its TSC is stable).
HOST_CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")


def host_tsc_stable(path: Path = HOST_CLOCKSOURCE) -> bool:
    """Whether the host keeps time with its TSC, the condition for KVM's fixed guest TSC offset."""
    try:
        return path.read_text().strip() == "tsc"
    except OSError:
        return False


def native_clock_params(tsc_khz: int, tsc_stable: bool) -> tuple[str, ...]:
    """Linux parameters that stand in for the pvclock when ``xen.pv_time`` is false.

    Without XENFEAT_hvm_safe_pvclock Linux takes its TSC rate from a calibration against the
    PIT, then HPET or ACPI PM timer, with bounds on how long each read may take (an AMD CPU has
    no CPUID leaf for it).  Every one of those reads is a VM exit, ours in Python: where exits
    are slow (the nested rig, docs/hw-rig.md) every calibration fails, Linux marks the TSC
    unstable, drops the TSC-deadline timer and the boot stops early (docs/linux-xen.md, "PV
    time").  The VMM knows the rate, as the pvclock would have said it: ``tsc_early_khz``.
    ``tsc=reliable`` is the promise of XEN_PVCLOCK_TSC_STABLE_BIT, made on the same condition
    (``tsc_stable``: the host keeps time with its TSC); without it Linux discards the TSC of a
    multi-vCPU guest on a CPU without invariant TSC and reads the PM timer, an exit per read.
    """
    if tsc_khz <= 0:
        raise ValueError(f"guest TSC rate {tsc_khz} kHz")
    return (f"tsc_early_khz={tsc_khz}", *(("tsc=reliable",) if tsc_stable else ()))


@dataclass(frozen=True)
class TscScale:
    """ns = ((tsc << shift) or (tsc >> -shift)) * mul >> 32."""

    mul: int
    shift: int

    @classmethod
    def for_hz(cls, tsc_hz: int) -> "TscScale":
        if tsc_hz <= 0:
            raise ValueError("TSC frequency must be positive")
        shift, tps = 0, tsc_hz
        while tps > 2_000_000_000:
            tps >>= 1
            shift -= 1
        while tps <= 1_000_000_000:
            tps <<= 1
            shift += 1
        return cls((1_000_000_000 << 32) // tps, shift)

    def ns(self, ticks: int) -> int:
        t = ticks << self.shift if self.shift >= 0 else ticks >> -self.shift
        return (t * self.mul) >> 32


class SharedInfo:
    """Locations of the per-domain and per-vCPU shared areas, and their time data."""

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self.gpa: int | None = None
        vcpu0 = domain.machine.vcpus[0]
        clock = domain.machine.clock
        #: the TSC rate pvclock describes: the real one, or the dilated one the guest is told
        self.tsc_khz = domain.machine.tsc_khz * clock.den // clock.num
        self.scale = TscScale.for_hz(self.tsc_khz * 1000)
        #: host TSC ticks a bracketed reading may span (the host TSC runs at the real rate)
        self.bracket_slack = domain.machine.tsc_khz * BRACKET_SLACK_US // 1000
        #: guest TSC - host TSC per vCPU (vCPU 0's, measured before it runs, until a vCPU's own)
        self.tsc_offsets = [self.measure_tsc_offset(vcpu0)] * len(domain.machine.vcpus)
        #: whether pvclock carries XEN_PVCLOCK_TSC_STABLE_BIT (module docstring)
        self.tsc_stable = host_tsc_stable()
        if not self.tsc_stable:
            log.info("host clocksource is not the TSC: pvclock without XEN_PVCLOCK_TSC_STABLE_BIT")

    # -- placement -------------------------------------------------------------
    def map(self, gpfn: int) -> None:
        """XENMEM_add_to_physmap(shared_info): the guest's page at ``gpfn`` becomes shared_info."""
        gpa = gpfn << 12
        if not self.domain.mem.contains(gpa, 4096):
            raise einval(f"shared_info gpfn {gpfn:#x} is not guest RAM")
        if self.gpa is None:
            self.domain.mem.fill(gpa, 4096)
            if self.domain.resumed_new:
                self._mask_all(gpa)
        elif self.gpa != gpa:  # moving it keeps pending/mask bits and vcpu_info slots, as in Xen
            self.domain.mem.view(gpa, 4096)[:] = self.domain.mem.view(self.gpa, 4096)
        self.gpa = gpa
        self._write_wallclock()
        for state in self.domain.vcpus:
            self.update_time(state.id)
        log.info("shared_info mapped at %#x", gpa)

    def _mask_all(self, gpa: int) -> None:
        """A domain restored as a new one (a cooperative save) gets shared_info with every 2-level
        port masked and none pending, as libxc's restore writes the new domain's (memset of
        ``evtchn_mask`` to 0xff): the new event-channel space is not live until the guest says so.
        Linux (6.1) relies on it: its resume re-binds VIRQs and IPIs without masking them, and
        unmasks only the IRQs it enables again, so a port left unmasked here fires an IRQ that
        must never fire (the PV spinlock kicker: ``kernel BUG at arch/x86/xen/spinlock.c``)."""
        self.domain.mem.view(gpa + SH_MASK, SH_MASK_BYTES)[:] = b"\xff" * SH_MASK_BYTES

    def restored(self, gpa: int | None) -> None:
        """A snapshot was loaded: shared_info is at ``gpa`` again (its content came back with
        RAM), the guest TSC continues from its saved value (a new offset to the host's), and
        every pvclock is re-published against both."""
        self.tsc_offsets = [self.measure_tsc_offset(self.domain.machine.vcpus[0])] * len(self.tsc_offsets)
        self.gpa = gpa
        if gpa is not None:
            self._write_wallclock()
        for state in self.domain.vcpus:
            self.update_time(state.id)

    def vcpu_info_gpa(self, vcpu_id: int) -> int | None:
        state = self.domain.vcpu_state(vcpu_id)
        if state.vcpu_info_gpa is not None:
            return state.vcpu_info_gpa
        if self.gpa is not None and vcpu_id < LEGACY_VCPUS:
            return self.gpa + vcpu_id * VCPU_INFO.size
        return None

    def register_vcpu_info(self, vcpu_id: int, gpa: int) -> None:
        """VCPUOP_register_vcpu_info: the 64-byte area must sit inside one guest RAM page."""
        if self.domain.vcpu_state(vcpu_id).vcpu_info_gpa is not None:
            raise einval(f"vcpu{vcpu_id} already registered its vcpu_info (Xen allows it once)")
        if (gpa & 0xFFF) + VCPU_INFO.size > 4096 or gpa % 8 or not self.domain.mem.contains(gpa, VCPU_INFO.size):
            raise einval(f"vcpu_info at {gpa:#x} crosses a page or is not guest RAM")
        old = self.vcpu_info_gpa(vcpu_id)
        area = self.domain.mem.view(gpa, VCPU_INFO.size)
        if old is not None:  # Xen copies the current contents (pending bits) to the new area
            area[:] = self.domain.mem.view(old, VCPU_INFO.size)
        else:
            area[:] = bytes(VCPU_INFO.size)
        self.domain.vcpu_state(vcpu_id).vcpu_info_gpa = gpa
        self.update_time(vcpu_id)

    def upcall_pending(self, vcpu_id: int) -> bool:
        gpa = self.vcpu_info_gpa(vcpu_id)
        return gpa is not None and self.domain.mem.view(gpa, 1)[0] != 0

    # -- time --------------------------------------------------------------------
    def _bracketed(self, read):
        """``(host TSC, read())`` taken together: ``read`` runs between two host TSC reads, the
        TSC given is their midpoint, and the pair is taken again while they are more than
        ``bracket_slack`` apart (the thread was preempted); the narrowest one is kept."""
        best = None
        for _ in range(BRACKET_TRIES):
            t0 = host_tsc()
            value = read()
            span = host_tsc() - t0
            if best is None or span < best[0]:
                best = (span, t0 + span // 2, value)
            if span <= self.bracket_slack:
                break
        return best[1], best[2]

    def measure_tsc_offset(self, vcpu) -> int:
        """Guest TSC - host TSC for ``vcpu``, read on its own thread (or before it runs)."""
        tsc, guest = self._bracketed(lambda: vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC])
        return guest - tsc

    def guest_tsc(self, vcpu_id: int = 0) -> int:
        return host_tsc() + self.tsc_offsets[vcpu_id]

    def resync(self, vcpu) -> None:
        """On ``vcpu``'s own thread: where the host TSC is unstable, re-measure its offset
        and republish its pvclock if the offset moved (module docstring)."""
        if self.tsc_stable:
            return
        offset = self.measure_tsc_offset(vcpu)
        if abs(offset - self.tsc_offsets[vcpu.id]) > self.tsc_khz * RESYNC_SLACK_US // 1000:
            self.tsc_offsets[vcpu.id] = offset
            self.update_time(vcpu.id)

    def time_info(self, vcpu_id: int = 0) -> bytes:
        """A vcpu_time_info snapshot (version left 0: the writer sets it)."""
        info = ffi.new("struct vcpu_time_info *")
        tsc, info.system_time = self._bracketed(self.domain.now_ns)
        info.tsc_timestamp = tsc + self.tsc_offsets[vcpu_id]
        info.tsc_to_system_mul = self.scale.mul
        info.tsc_shift = self.scale.shift
        info.flags = PVCLOCK_TSC_STABLE if self.tsc_stable else 0
        return TIME_INFO.to_bytes(info)

    def _publish(self, gpa: int, data: bytes) -> None:
        """Write a version-protected struct: version odd, body, version even."""
        view = self.domain.mem.view(gpa, len(data))
        version = int.from_bytes(view[0:4], "little")
        view[0:4] = ((version | 1) + 0).to_bytes(4, "little")
        self.domain.mem.barrier()
        view[4:] = data[4:]
        self.domain.mem.barrier()
        view[0:4] = ((version | 1) + 1).to_bytes(4, "little")

    def update_time(self, vcpu_id: int) -> None:
        """Refresh vCPU ``vcpu_id``'s pvclock in its vcpu_info and its registered time area."""
        gpa = self.vcpu_info_gpa(vcpu_id)
        data = self.time_info(vcpu_id)
        if gpa is not None:
            self._publish(gpa + VCPU_INFO_TIME, data)
        state = self.domain.vcpu_state(vcpu_id)
        if state.time_area_gpa is not None:
            try:
                self._publish(state.time_area_gpa, data)
            except GuestMemoryError:
                state.time_area_gpa = None

    def _write_wallclock(self) -> None:
        """wc_* = the wall time at system time 0."""
        boot_wall = time.time_ns() - self.domain.now_ns()
        sec, nsec = divmod(boot_wall, 1_000_000_000)
        base = self.gpa
        view = self.domain.mem.view(base + SHARED_INFO.offset("wc_version"), 16)
        version = int.from_bytes(view[0:4], "little")
        view[0:4] = (version | 1).to_bytes(4, "little")
        self.domain.mem.barrier()
        view[4:8] = (sec & 0xFFFFFFFF).to_bytes(4, "little")
        view[8:12] = nsec.to_bytes(4, "little")
        view[12:16] = (sec >> 32).to_bytes(4, "little")
        self.domain.mem.barrier()
        view[0:4] = ((version | 1) + 1).to_bytes(4, "little")

    def write_runstate(self, vcpu_id: int) -> None:
        """Publish the vCPU's runstate (always running here: no steal time to report)."""
        state = self.domain.vcpu_state(vcpu_id)
        if state.runstate_gpa is None:
            return
        info = ffi.new("struct vcpu_runstate_info *")
        info.state = state.runstate
        now = self.domain.now_ns()
        info.state_entry_time = state.runstate_entry_ns
        for i in range(4):
            info.time[i] = state.runstate_times[i]
        info.time[0] = now  # time spent running since boot
        try:
            self.domain.mem.write(state.runstate_gpa, RUNSTATE.to_bytes(info))
        except GuestMemoryError:
            state.runstate_gpa = None
