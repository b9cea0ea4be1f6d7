"""The Xen personality of one Machine: the domain's state and the services that own it.

``XenDomain`` is the single owner of Xen state for a guest (no globals): HVM
params, per-vCPU registrations, the shared-info page, event channels, grant
tables, timers, the console and xenstore rings.  Every change happens under
``lock`` (the big lock, as QEMU's), held by the dispatcher around each
hypercall and taken by I/O-thread callbacks.

Special pages (xenstore ring, console ring) live outside e820 RAM, in a
region added in the MMIO hole, so the guest never hands them out as memory.

``XenDomain`` is a ``MachineExtension`` (machine/extension.py): the builder
(``xenkvm.build``) makes one for a Machine and attaches it; the machine calls
back for CPUID leaves, trap installation after loading, start/stop/close of
the embedded xenstored and the console that takes host keystrokes.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xenkvm.config import BootMode, XenConfig
from xenkvm.machine import layout
from xenkvm.machine.boot.common import boot_memmap
from xenkvm.machine.extension import InputSink, MachineExtension
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.machine.clock import MONOTONIC
from xenkvm.xen import platform_pci
from xenkvm.xen import snapshot as xensnap
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.console import ConsoleIo, HypervisorLog, PrimaryConsole
from xenkvm.xen.cpuid import xen_leaves
from xenkvm.xen.dispatch import Dispatcher
from xenkvm.xen.evtchn import EventChannels
from xenkvm.xen.evtchn.cdeliver import CDelivery
from xenkvm.xen.fastpath import FastSend
from xenkvm.xen.gnttab import GrantTable
from xenkvm.xen.hypercalls import table
from xenkvm.xen.limits import Limits
from xenkvm.xen.reservation import Reservation
from xenkvm.xen.shinfo import SharedInfo, native_clock_params
from xenkvm.xen.shared_store import MemfdBacking, SharedStoreService
from xenkvm.xen.store import StoreService
from xenkvm.xen.suspend import SaveRequest
from xenkvm.xen.testdev import TestDevice
from xenkvm.xen.timers import VcpuTimers
from xenkvm.xen.traps import HypercallPageTrap, PatchTrap, choose
from xenkvm.xen.upcall import Upcalls

if TYPE_CHECKING:
    from xenkvm.kvm.vcpu import Vcpu
    from xenkvm.machine.loader import Entry
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

#: Guest-physical base of the special pages (below the IOAPIC, outside RAM).
SPECIAL_PAGES_GPA = 0xFEB0_0000
SPECIAL_PAGES = 16
STORE_PAGE = 0       #: index of the xenstore ring page in the special region
CONSOLE_PAGE = 1     #: index of the console ring page


class InputQueue:
    """Host keystrokes waiting for the guest (console_io read, the console ring)."""

    def __init__(self, limit: int = 64 * 1024):
        self._data: collections.deque[int] = collections.deque()
        self._limit = limit
        self._lock = threading.Lock()

    def push(self, data: bytes) -> int:
        with self._lock:
            room = self._limit - len(self._data)
            self._data.extend(data[:room])
            return min(room, len(data))

    def take(self, n: int) -> bytes:
        with self._lock:
            n = min(n, len(self._data))
            return bytes(self._data.popleft() for _ in range(n))

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class VcpuState:
    """What one vCPU registered with the hypervisor."""

    id: int
    vcpu_info_gpa: int | None = None   #: VCPUOP_register_vcpu_info (None: shared_info slot)
    upcall_vector: int = 0              #: HVMOP_set_evtchn_upcall_vector (0: none)
    #: VCPUOP_register_runstate_memory_area / _vcpu_time_memory_area: the guest passes
    #: virtual addresses; they are translated once, at registration, by the vCPU itself.
    runstate_gpa: int | None = None
    time_area_gpa: int | None = None
    runstate: int = 0                   #: RUNSTATE_running
    runstate_entry_ns: int = 0
    runstate_times: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    up: bool = False
    #: VCPUOP_down: held out of KVM_RUN until VCPUOP_up (Xen's _VPF_down); saved in snapshots
    down: bool = False


class XenDomain(MachineExtension):
    """Xen state and services for one guest; a Machine extension (``Machine.attach``)."""

    #: a Xen HVM guest's bzImage is booted as its vmlinux, so its hypercall sites can be patched
    needs_kernel_elf = True

    def __init__(self, machine: "Machine", cfg: XenConfig, *, trace: bool = False):
        self.machine = machine
        self.cfg = cfg
        self.mem = machine.mem
        self.vm = machine.vm
        self.domid = cfg.domid
        self.lock = threading.RLock()
        self.vcpus = [VcpuState(i) for i in range(len(machine.vcpus))]
        self.vcpus[0].up = True
        #: orders VCPUOP_down/up: a vCPU's ``down`` and the machine holding it change together
        self.vcpu_down_lock = threading.Lock()
        self.params: dict[int, int] = {}
        self.vm_assists = 0
        self.shutdown_code: int | None = None
        #: cooperative save (xen/suspend.py): the toolstack's pending request, and the vCPU that
        #: suspended while its snapshot is taken; ``resumed_new``: restored as a new domain
        self.suspend_request: SaveRequest | None = None
        self.suspended_vcpu: int | None = None
        self.resumed_new = False
        self.clock = machine.clock
        self.boot_ns = self.clock.boot_ns
        #: (guest ns spent paused before, clock.ns() when the current pause began or None): one
        #: tuple, replaced whole, so a reader on another thread never sees half an update
        self._pause: tuple[int, int | None] = (0, None)
        self.console_input = InputQueue()
        self.traps: list = []
        self.platform = None    #: xen.platform_pci.XenPlatform once attached (HVM mode)
        self.testdev: TestDevice | None = None   #: the test backend (xen.test_device) once installed
        self.dispatcher = Dispatcher(self, trace=trace)
        #: what this guest may make us allocate (xen/limits.py: Xen's domU defaults)
        self.limits = Limits().for_vm(machine.vm)
        # a shared xenstored maps the ring page itself: the region is a memfd then
        backing = MemfdBacking("xen-special-pages") if self.cfg.xenstored else None
        self.special = self.mem.add_region(SPECIAL_PAGES_GPA, SPECIAL_PAGES * 4096, "xen-special-pages",
                                            reserved=True, backing=backing)
        self.params[HvmParam.STORE_PFN] = self.special_pfn(STORE_PAGE)
        self.params[HvmParam.CONSOLE_PFN] = self.special_pfn(CONSOLE_PAGE)
        self._build_services()

    def special_pfn(self, index: int) -> int:
        return (SPECIAL_PAGES_GPA >> 12) + index

    def _build_services(self) -> None:
        """Each service, then the hypercall table on the dispatcher."""
        self.shinfo = SharedInfo(self)
        self.upcalls = Upcalls(self)
        #: ring kicks completed in C on the vCPU thread (xen/fastpath.py); used once a port trap is in
        self.fast = FastSend(self.mem, layout.HYPERCALL_PORT)
        self.evtchn = EventChannels(self)
        #: backends' notifies delivered in C (2-level channels; xen/evtchn/cdeliver.py)
        self.cdeliver = CDelivery(self, self.machine.vm.fd)
        self.evtchn.pollers.on_count = self.cdeliver.pollers
        self.timers = VcpuTimers(self)
        self.gnttab = GrantTable(self)
        self.reservation = Reservation(self.mem)   # tot/max pages, populated RAM frames
        self.console_io = ConsoleIo(HypervisorLog.open(self.cfg.hypervisor_log), self.console_input)
        table.install(self.dispatcher)              # every hypercall (xen/hypercalls/table.py)
        self.console = PrimaryConsole.attach(self)  # CONSOLE_EVTCHN; ring -> machine console
        # STORE_EVTCHN, initial tree; Machine.run starts its socket (or the shared daemon's link)
        self.store = (SharedStoreService if self.cfg.xenstored else StoreService).attach(self)
        #: the PV devices and their hot-plug API (xenkvm/backends: a layer above this one, so
        #: ``xenkvm.build`` attaches them); None for a domain built without backends
        self.devices = None

    # -- MachineExtension ------------------------------------------------------
    def cpuid_leaves(self, vcpu_id: int):
        return xen_leaves(vcpu_id, self.cfg.version, self.domid)

    def kernel_params(self) -> tuple[str, ...]:
        """With ``xen.pv_time`` false, the TSC rate (and stability) the hidden pvclock would give."""
        if self.cfg.pv_time:
            return ()
        return native_clock_params(self.shinfo.tsc_khz, self.shinfo.tsc_stable)

    def install(self, entry: "Entry") -> None:
        """Choose and install the hypercall traps for the loaded image (before vCPUs run).

        HVM-mode guests (``entry.mode``: the Linux boot protocol) and ``xen.platform_pci``
        get the Xen platform PCI device and the unplug ports (xen/platform_pci.py).
        """
        self.traps = choose(self, self.cfg.hypercall_trap, entry.image)
        for vcpu in self.machine.vcpus:
            vcpu.enable_sync_sregs()  # the CPU mode of each hypercall without an ioctl
        for trap in self.traps:
            trap.install()
        log.info("hypercall traps: %s", ", ".join(t.name for t in self.traps))
        self._use_fast_path()
        if self.cfg.test_device:
            self.testdev = TestDevice(self)
            self.machine.register_ports(layout.XEN_TESTDEV_PORT, 4, self.testdev)
        if self.platform is None and (self.cfg.platform_pci or entry.mode is BootMode.LINUX):
            platform_pci.attach(self)   # sets self.platform

    def _use_fast_path(self) -> None:
        """Run the vCPUs in the C loop (xen/fastpath.py) when hypercalls are port exits it can
        read (the hypercall page's stubs, patched sites) through kvm_run's synced registers."""
        port_trap = any(isinstance(t, (HypercallPageTrap, PatchTrap)) for t in self.traps)
        if port_trap and self.cfg.fast_path and all(v.has_sync_regs for v in self.machine.vcpus):
            self.machine.set_vcpu_run(self._run_vcpu)
            timers = getattr(self.clock, "host", None) is MONOTONIC and self.shinfo.tsc_stable
            if timers:      # C reads CLOCK_MONOTONIC; an unstable TSC needs Python's resync per set
                self.timers.use_fast(self.fast)
                self._publish_clock()
            log.info("hypercall fast path: EVTCHNOP_send to backends' ports%s in C",
                     " and single-shot timers" if timers else "")

    def _publish_clock(self) -> None:
        """Tell C's timers how system time follows CLOCK_MONOTONIC (now_ns), or that they
        must leave arming to Python while the clock is frozen (caller holds the lock or
        no vCPU runs)."""
        if self.timers.fast is None:
            return
        paused, frozen = self._pause
        c = self.clock
        self.fast.publish_clock(None if frozen is not None else (c.boot_ns, paused, c.num, c.den))

    def _run_vcpu(self, vcpu: "Vcpu") -> int:
        """A vCPU's KVM_RUN: the C loop once the vCPU is up (the dispatcher marks it so on
        its first hypercall; a send completed in C would not)."""
        if self.vcpus[vcpu.id].up:
            return self.fast.run(vcpu)
        return vcpu.run()

    def start(self) -> None:
        """The embedded xenstored: its socket and thread (ConfigError if the socket is taken)."""
        self.store.start()

    def stop(self) -> None:
        """The machine is stopping: wake vCPUs blocked in SCHEDOP_poll so they can leave."""
        self.evtchn.kick_pollers()

    def close(self) -> None:
        """Stop the embedded xenstored and remove its socket; close the kick eventfds."""
        self.cdeliver.close()       # before the VM's fd: no MSI from C after this
        if self.cdeliver.loaded:
            log.info("event delivery in C: %d backend notifies, %d upcalls; %d left to Python",
                     self.cdeliver.notifies, self.cdeliver.upcalls, self.cdeliver.declined)
        self.store.close()
        if self.machine.vcpu_run is not None:
            log.info("hypercall fast path: %d EVTCHNOP_send, %d single-shot timer calls completed in C;"
                     " %d ring port bindings kicked inside KVM", self.fast.sends, self.fast.timer_ops,
                     self.fast.kernel_binds)
        if self.timers.fast is not None:
            c = self.timers.fired_in_c()
            log.info("timers: %d VIRQ_TIMER fired by the timer thread in C, %d through Python",
                     c, sum(self.timers.fired) - c)
        self.timers.detach_fast()
        self.fast.close()

    def save_state(self) -> dict | None:
        """Snapshots: the Xen side (xen/snapshot.py; refuses what it cannot save yet)."""
        return xensnap.save(self)

    def snapshot_begin(self) -> None:
        """Hold the domain and the xenstored still (timers, rings) until guest RAM is written:
        C delivery too (the timer thread's VIRQ_TIMERs then wait for Python, and the lock)."""
        self.lock.acquire()
        self.store.lock.acquire()
        self.cdeliver.hold()

    def snapshot_end(self) -> None:
        if not self.store.owns_server:
            self.store.resume()     # the shared xenstored may touch the ring page again
        if self.cdeliver.loaded:
            self.cdeliver.reload()
        self.store.lock.release()
        self.lock.release()

    def restore_state(self, state: dict | None) -> None:
        """A restored machine: the saved Xen state, then what ``install`` registers (traps,
        test device), without touching guest memory the snapshot already holds."""
        if state is None:
            raise SnapshotError(f"dom{self.domid}: the snapshot has no Xen state")
        try:
            testdev_last = xensnap.restore(self, state)
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"dom{self.domid}: Xen state not accepted: {e}") from None
        for vcpu in self.machine.vcpus:
            vcpu.enable_sync_sregs()
        for v in self.vcpus:
            self.machine.set_vcpu_held(v.id, v.down)   # saved after VCPUOP_down: still down
        for trap in self.traps:
            xensnap.reinstall(self, trap)
        self._use_fast_path()
        if self.cfg.test_device:
            self.testdev = TestDevice(self)
            self.testdev.last = testdev_last if testdev_last is not None else self.testdev.last
            self.machine.register_ports(layout.XEN_TESTDEV_PORT, 4, self.testdev)

    def keeps_saved_regions(self) -> bool:
        """A domain restored from a suspend is a new domain: fresh store/console pages, no grant frames."""
        return not self.resumed_new

    def request_suspend(self, req: SaveRequest) -> None:
        """Save the domain when it next suspends (xen/suspend.py); one request at a time."""
        with self.lock:
            if self.suspend_request is not None or self.suspended_vcpu is not None:
                raise SnapshotError(f"dom{self.domid}: a save is already in progress")
            self.suspend_request = req

    def cancel_suspend(self, req: SaveRequest) -> bool:
        """Withdraw ``req`` unless the guest has already suspended for it (then it completes)."""
        with self.lock:
            if self.suspend_request is req:
                self.suspend_request = None
                return True
            return False

    def input_sink(self) -> InputSink | None:
        """Host keystrokes go to the primary console ring once the guest has used it (Linux
        hvc_xen sends on its port as soon as it writes or consumes), else to console_io's
        CONSOLEIO_read queue once the guest has read it, else (None) to the machine's UART."""
        if self.console.connected:
            return self.console
        if self.console_io.reading:
            return self.console_io
        return None

    # -- services ----------------------------------------------------------------

    @property
    def io(self):
        """The machine's I/O thread (timers, sockets, deferred work)."""
        return self.machine.io

    def now_ns(self) -> int:
        """Xen system time: guest ns since the machine started (what pvclock reports).

        It follows the machine's GuestClock, dilated on PVM hosts so the guest's
        timer ticks come rarely enough for its emulated ring 0, less the time the
        domain spent paused (it stands still while paused, as on Xen).
        """
        paused, frozen = self._pause
        return (self.clock.ns() if frozen is None else frozen) - paused

    def monotonic_at(self, system_ns: int) -> int:
        """The host monotonic time at which Xen system time reaches ``system_ns`` (while paused:
        as if the domain were unpaused now, so timers re-check rather than spin)."""
        return self.clock.monotonic_at(system_ns + self._pause_offset())

    def _pause_offset(self) -> int:
        paused, frozen = self._pause
        return paused + (self.clock.ns() - frozen if frozen is not None else 0)

    def freeze_clock(self) -> None:
        """Stop Xen system time (a toolstack pause, vCPUs already stopped): it reads the same
        until ``thaw_clock``; timers due meanwhile fire after it."""
        with self.lock:
            if self._pause[1] is None:
                self._pause = (self._pause[0], self.clock.ns())
                self._publish_clock()

    def thaw_clock(self) -> None:
        """Let system time run on from where it stopped, and republish every vCPU's pvclock
        (tsc_timestamp now, system_time the frozen value), so the guest sees no jump."""
        with self.lock:
            paused, frozen = self._pause
            if frozen is None:
                return
            self._pause = (paused + self.clock.ns() - frozen, None)
            self._publish_clock()
            for state in self.vcpus:
                self.shinfo.update_time(state.id)

    def vcpu_state(self, vcpu_id: int) -> VcpuState:
        """The state of a guest-named vCPU; guest-supplied ids are checked by callers."""
        return self.vcpus[vcpu_id]

    def vcpu_info_gpa(self, vcpu_id: int) -> int | None:
        """Where ``vcpu_id``'s vcpu_info lives: registered, else its shared_info slot, else None."""
        return self.shinfo.vcpu_info_gpa(vcpu_id)

    def memory_map(self):
        """The e820 map this guest was booted with (XENMEM_memory_map answers it)."""
        return boot_memmap(self.mem)

    def valid_vcpu(self, vcpu_id: int) -> bool:
        return 0 <= vcpu_id < len(self.vcpus)
