"""The Machine: owns the VM, its memory, vCPUs and devices, and runs them to a stop.

Everything mutable about one guest lives here (no module-level state).  One
thread per vCPU sits in KVM_RUN (its ``VcpuRunner``); the calling thread waits
for a stop request (guest power-off or reset, a fatal vCPU state, Ctrl-C) and
then kicks every vCPU out of KVM_RUN with ``immediate_exit`` plus a signal.

The machine knows no hypervisor ABI: personalities (the Xen one) are
``MachineExtension``s attached with :meth:`Machine.attach`, and register the
exits and ports they handle through :meth:`Machine.register_exit`,
:meth:`Machine.register_port_hook` and :meth:`Machine.register_ports`.
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

from xenkvm.config import GuestConfig
from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.errors import KvmError
from xenkvm.kvm.system import Kvm
from xenkvm.kvm.vcpu import Vcpu
from xenkvm.kvm.vm import Vm
from xenkvm.machine import layout
from xenkvm.machine.clock import GuestClock
from xenkvm.machine.cpu import build_cpuid
from xenkvm.machine.devices.bus import PortBus
from xenkvm.machine.devices.console import ConsoleSink, open_sink
from xenkvm.machine.devices.debugcon import DebugCon
from xenkvm.machine.devices.pci import PciBus
from xenkvm.machine.devices.power import AcpiPm, I8042Reset, ResetControl
from xenkvm.machine.devices.rtc import CmosRtc
from xenkvm.machine.devices.serial import Serial16550
from xenkvm.machine.devices.stdin import StdinReader
from xenkvm.machine.extension import MachineExtension
from xenkvm.machine.gaps import Gaps
from xenkvm.machine.host import Host
from xenkvm.machine.ioloop import IoLoop
from xenkvm.machine.loader import load_guest
from xenkvm.machine.memory import GuestMemory
from xenkvm.machine.snapshot import snapshot as snap
from xenkvm.machine.snapshot import state as snapstate
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.machine.status import ExitStatus, RunResult
from xenkvm.machine.vcpu_loop import KICK_SIGNAL, ExitHandler, HaltWatch, VcpuRunner, describe_exit, traced

log = logging.getLogger(__name__)

__all__ = ["KICK_SIGNAL", "ExitStatus", "Machine", "RunResult"]

COM1_IRQ = 4
TSS_ADDR = 0xFFFB_D000         #: three pages KVM needs on VMX, just below the BIOS area
IDENTITY_MAP_ADDR = 0xFFFB_C000


class Machine:
    """One guest.  ``Machine(cfg).run()`` boots it and returns a RunResult.

    ``cfg.xen`` is not read here: ``xenkvm.build.build_machine`` attaches the Xen
    personality.
    """

    def __init__(self, cfg: GuestConfig, *, sink: ConsoleSink | None = None, trace: bool = False,
                 kvm: Kvm | None = None, snapshot: "snap.Loaded | None" = None):
        """``snapshot``: build the machine a snapshot holds (its RAM mapped from the snapshot's
        file); :meth:`apply_snapshot` then loads its state, and ``run`` resumes instead of booting."""
        self.cfg = cfg
        self.trace = trace
        #: what vCPU threads call instead of ``vcpu.run()`` (set_vcpu_run), None: KVM_RUN
        self.vcpu_run: Callable[[Vcpu], int] | None = None
        self.kvm = kvm or Kvm()
        self.host = Host.probe(self.kvm)
        self.console = sink or open_sink(cfg.console)
        self.vm = Vm(self.kvm)
        self.mem = GuestMemory(cfg.memory, snapshot.ram_backing if snapshot is not None else None)
        self.mem.on_region_added(self.vm.map_region, self.vm.unmap_region)
        self._setup_platform()
        self.io = IoLoop()
        self.bus = PortBus()  # devices go on it through register_ports
        #: ports whose exits need the vCPU (e.g. the hypercall-page port), checked before the bus
        self.port_hooks: dict[int, ExitHandler] = {}
        self._setup_devices()
        # a Xen guest gets maxvcpus vCPUs, those past ``vcpus`` offline in its xenstore (as xl)
        created = cfg.maxvcpus if cfg.xen is not None and cfg.maxvcpus else cfg.vcpus
        self.vcpus = [Vcpu(self.vm, i) for i in range(created)]
        self.runners = [VcpuRunner(v) for v in self.vcpus]
        self.tsc_khz = self.vcpus[0].get_tsc_khz()
        self.clock = GuestClock.for_tsc(self.tsc_khz, self.host.dilated_tsc_khz)
        self.pm.clock = self.clock
        #: the vCPU run loop's table: exit reason -> handler (written by register_exit only)
        self.exit_handlers: dict[int, ExitHandler] = {}
        for reason, handler in self._default_handlers().items():
            self.register_exit(reason, handler)
        self.extensions: list[MachineExtension] = []
        self._setup_cpuid()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.result: RunResult | None = None
        self._mmio_seen: set[int] = set()
        #: test seam: called on each vCPU thread after its work queue is drained, before KVM_RUN
        self.before_run: Callable[[Vcpu], None] | None = None
        self.gaps = Gaps(self) if self.host.emulates_ring0 else None
        self.restored = False   #: state loaded from a snapshot: run resumes it instead of booting
        #: snapshots the guest asked for (snapshot_on_port), and the last one's outcome
        self.snapshot_results: list[snap.SnapshotInfo | SnapshotError] = []

    # -- construction ---------------------------------------------------------
    def _setup_platform(self) -> None:
        for call, arg in ((self.vm.set_tss_addr, TSS_ADDR), (self.vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                call(arg)
            except KvmError as e:  # only VMX needs these; PVM and SVM may refuse
                log.debug("%s", e)
        self.vm.create_irqchip()
        self.vm.create_pit2()

    def _setup_devices(self) -> None:
        self.serial = Serial16550(self.console, lambda level: self.vm.irq_line(COM1_IRQ, level))
        self.bus.register(layout.COM1, 8, self.serial)
        self.bus.register(layout.DEBUG_PORT, 1, DebugCon(self.console))
        self.pm = AcpiPm(self.power_off)
        self.bus.register(layout.PM_BASE, 12, self.pm)
        self.bus.register(layout.RESET_PORT, 1, ResetControl(self.reset))
        i8042 = I8042Reset(self.reset)
        self.bus.register(0x60, 1, i8042)
        self.bus.register(layout.I8042_CMD, 1, i8042)
        self.rtc = CmosRtc()
        self.bus.register(0x70, 2, self.rtc)
        self.pci = PciBus(self.bus)  # mechanism #1 at 0xcf8/0xcfc, host bridge at 00:00.0 (DSDT: \\_SB.PCI0)

    def _setup_cpuid(self) -> None:
        """Each vCPU's CPUID, with the hypervisor leaves of at most one extension."""
        supported = self.kvm.supported_cpuid()
        for v in self.vcpus:
            offered = [leaves for ext in self.extensions if (leaves := ext.cpuid_leaves(v.id)) is not None]
            if len(offered) > 1:
                raise ValueError("two machine extensions offer hypervisor CPUID leaves")
            v.set_cpuid(build_cpuid(supported, v.id, len(self.vcpus), self.host.cpu_profile,
                                    offered[0] if offered else None))

    # -- extensions and registration ----------------------------------------------
    def attach(self, ext: MachineExtension) -> None:
        """Give the machine a personality (before ``run``); its CPUID leaves apply at once."""
        self.extensions.append(ext)
        self._setup_cpuid()

    def register_exit(self, reason: int, handler: ExitHandler) -> None:
        """Handle KVM exit ``reason`` with ``handler(vcpu)`` on the vCPU's thread (replaces any)."""
        self.exit_handlers[reason] = handler

    def set_vcpu_run(self, run: Callable[[Vcpu], int] | None) -> None:
        """Have vCPU threads call ``run(vcpu)`` instead of ``vcpu.run()`` (a C loop completing
        some exits itself, xen/fastpath.py); None restores KVM_RUN.  Ignored under ``--trace``,
        which must see every exit."""
        self.vcpu_run = run

    def register_port_hook(self, port: int, handler: ExitHandler) -> None:
        """Handle every I/O exit on ``port`` with ``handler(vcpu)`` (it needs the vCPU's
        registers), before the port bus; replaces any earlier hook on that port."""
        self.port_hooks[port] = handler

    def register_ports(self, base: int, count: int, device) -> None:
        """A port device (``pio_read``/``pio_write``) on ``base .. base+count-1`` of the bus."""
        self.bus.register(base, count, device)

    def _default_handlers(self) -> dict[int, ExitHandler]:
        return {
            lib.KVM_EXIT_IO: self._on_io,
            lib.KVM_EXIT_MMIO: self._on_mmio,
            lib.KVM_EXIT_HLT: self._on_hlt,
            lib.KVM_EXIT_SHUTDOWN: self._on_shutdown,
            lib.KVM_EXIT_SYSTEM_EVENT: self._on_system_event,
            lib.KVM_EXIT_INTERNAL_ERROR: self._on_internal_error,
            lib.KVM_EXIT_FAIL_ENTRY: self._on_fail_entry,
        }

    # -- exits -------------------------------------------------------------------
    def _on_io(self, vcpu: Vcpu) -> None:
        io = vcpu.exit_io
        port, size, count = io.port, io.size, io.count
        hook = self.port_hooks.get(port)
        if hook is not None:
            hook(vcpu)
            return
        data = vcpu.io_data()
        if io.direction == lib.KVM_EXIT_IO_OUT:
            if size == 1:
                for b in data:
                    self.bus.write(port, 1, b)
            else:
                for i in range(0, size * count, size):
                    self.bus.write(port, size, int.from_bytes(data[i:i + size], "little"))
        else:
            for i in range(0, size * count, size):
                data[i:i + size] = self.bus.read(port, size).to_bytes(size, "little")

    def _on_mmio(self, vcpu: Vcpu) -> None:
        """Unbacked guest-physical addresses: reads float high, writes are dropped."""
        m = vcpu.exit_mmio
        page = m.phys_addr >> 12
        if page not in self._mmio_seen:
            self._mmio_seen.add(page)
            log.debug("vcpu%d: unclaimed MMIO %s at %#x", vcpu.id, "write" if m.is_write else "read", m.phys_addr)
        if not m.is_write:
            for i in range(min(m.len, 8)):
                m.data[i] = 0xFF

    def _on_hlt(self, vcpu: Vcpu) -> None:  # only without an in-kernel LAPIC
        self.stop(ExitStatus.POWEROFF, f"vcpu{vcpu.id} halted")

    def _on_shutdown(self, vcpu: Vcpu) -> None:
        self.stop(ExitStatus.TRIPLE_FAULT, f"vcpu{vcpu.id}: triple fault\n{self.dump_registers(vcpu)}")

    def _on_system_event(self, vcpu: Vcpu) -> None:
        kind = vcpu.exit_system_event.type
        if kind == lib.KVM_SYSTEM_EVENT_RESET:
            self.reset(f"vcpu{vcpu.id}: reset event")
        elif kind == lib.KVM_SYSTEM_EVENT_CRASH:
            self.stop(ExitStatus.GUEST_CRASH, f"vcpu{vcpu.id}: guest crash event")
        else:
            self.power_off()

    def _on_internal_error(self, vcpu: Vcpu) -> None:
        suberror = vcpu.exit_internal.suberror
        if suberror == lib.KVM_INTERNAL_ERROR_EMULATION and self.gaps is not None and self.gaps.complete(vcpu):
            return
        self.stop(ExitStatus.EMULATION_FAILURE,
                  f"vcpu{vcpu.id}: KVM internal error (suberror {suberror})\n{self.dump_registers(vcpu)}")

    def _on_fail_entry(self, vcpu: Vcpu) -> None:
        reason = vcpu.exit_fail_entry.hardware_entry_failure_reason
        self.stop(ExitStatus.VMM_ERROR, f"vcpu{vcpu.id}: VM entry failed (reason {reason:#x})\n"
                  f"{self.dump_registers(vcpu)}")

    def _on_unhandled(self, vcpu: Vcpu, reason: int) -> None:
        self.stop(ExitStatus.VMM_ERROR, f"unexpected exit: {describe_exit(vcpu, reason)}\n"
                  f"{self.dump_registers(vcpu)}")

    # -- stopping ----------------------------------------------------------------
    def stop_vmm_error(self, vcpu: Vcpu, message: str) -> None:
        self.stop(ExitStatus.VMM_ERROR, f"vcpu{vcpu.id}: {message}\n{self.dump_registers(vcpu)}")

    def run_on_vcpu(self, vcpu_id: int, fn: Callable[[Vcpu], None]) -> None:
        """Run ``fn(vcpu)`` on that vCPU's own thread at its next exit (vCPU ioctls must;
        VcpuRunner.queue)."""
        self.runners[vcpu_id].queue(fn)

    def set_vcpu_held(self, vcpu_id: int, held: bool) -> None:
        """Hold a vCPU out of KVM_RUN from its next exit on, or let it run again (any thread).

        A held vCPU still runs the work queued for it (pause and snapshot parking, HaltWatch)
        and leaves when the machine stops (vcpu_loop.Hold)."""
        self.runners[vcpu_id].set_held(held)

    def long_mode(self, vcpu: Vcpu) -> bool:
        """Whether the vCPU was in long mode at its last exit (EFER.LMA)."""
        return bool(vcpu.efer() & (1 << 10))

    def power_off(self) -> None:
        self.stop(ExitStatus.POWEROFF, "guest powered off")

    def reset(self, why: str = "guest reset") -> None:
        self.stop(ExitStatus.RESET, why)

    def stop(self, status: ExitStatus, message: str) -> None:
        """Ask every vCPU to leave KVM_RUN; the first reason given wins."""
        with self._stop_lock:
            if self.result is not None:
                return
            self.result = RunResult(status, message)
        for ext in self.extensions:
            ext.stop()
        for r in self.runners:
            r.kick()
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self.result is not None

    def dump_registers(self, vcpu: Vcpu) -> str:
        try:
            r, s = vcpu.get_regs(), vcpu.get_sregs()
        except KvmError as e:
            return f"(registers unavailable: {e})"
        names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
        cells = [f"{n}={getattr(r, n):#018x}" for n in names]
        cells += [f"cr0={s.cr0:#x}", f"cr2={s.cr2:#x}", f"cr3={s.cr3:#x}", f"cr4={s.cr4:#x}",
                  f"efer={s.efer:#x}", f"cs={s.cs.selector:#x}"]
        return "\n".join("  " + " ".join(cells[i:i + 4]) for i in range(0, len(cells), 4))

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self, path: str, on_saved: Callable[[], None] | None = None) -> "snap.SnapshotInfo":
        """Save the running machine to ``path`` (+ ``path.ram``) and keep it running (unless
        ``on_saved``, run once the files are written and before any vCPU runs again, stops it).

        Every vCPU is parked out of KVM_RUN at a consistent point and reads its own state;
        then the VM, devices and extensions are saved and the vCPUs go on.  Call it from
        any thread but a vCPU's (an exit handler uses :meth:`request_snapshot`).
        """
        if any(r.thread_id == threading.get_ident() for r in self.runners):
            raise RuntimeError("Machine.snapshot from a vCPU thread: use request_snapshot")
        return snap.finish(self, path, snap.start(self, path), on_saved)

    def request_snapshot(self, path: str, done: Callable[[object], None] | None = None,
                         on_saved: Callable[[], None] | None = None) -> None:
        """Start a snapshot from any thread (a vCPU's exit handler too): every vCPU parks at its
        next exit, the caller's included, so a guest's request is saved at the requesting
        instruction; a helper thread finishes it and calls ``done(info or SnapshotError)``;
        ``on_saved()`` runs when the files are written, before the vCPUs go on."""
        parking = snap.start(self, path)

        def finish() -> None:
            try:
                outcome: object = snap.finish(self, path, parking, on_saved)
            except (SnapshotError, OSError) as e:
                log.error("snapshot %s failed: %s", path, e)
                outcome = e if isinstance(e, SnapshotError) else SnapshotError(f"{path}: {e}")
            self.snapshot_results.append(outcome)  # type: ignore[arg-type]
            if done is not None:
                done(outcome)
        threading.Thread(target=finish, name="snapshot", daemon=True).start()

    def snapshot_on_port(self, port: int, path: str, stop: bool = False) -> None:
        """Tests: a guest write to ``port`` takes a snapshot to ``path`` at that instruction;
        ``stop``: the machine stops once the files are written, before any vCPU runs again (as
        ``save`` does: a guest with disks must not write them after their identity is saved)."""
        def saved() -> None:
            self.stop(ExitStatus.INTERRUPTED, f"saved to {path}")
        self.register_port_hook(port, lambda vcpu: self.request_snapshot(path, on_saved=saved if stop else None))

    def apply_snapshot(self, loaded: "snap.Loaded") -> None:
        """Load a snapshot's state into this machine (built with ``snapshot=loaded``, not run).

        vCPU state is set from this thread before any vCPU thread exists, as booting does.
        """
        sec = loaded.sections
        if len(sec["vcpus"]) != len(self.vcpus):
            raise SnapshotError(f"{loaded.path}: {len(sec['vcpus'])} vCPUs saved, {len(self.vcpus)} configured")
        try:
            snapstate.apply_vm(self, sec["vm"])
            snapstate.apply_vcpus(self.vcpus, sec["vcpus"])
            snapstate.apply_devices(self, sec["devices"])
        except (KeyError, TypeError, ValueError, KvmError) as e:
            raise SnapshotError(f"{loaded.path}: state not accepted: {e}") from None
        self.clock = self.clock.resumed_at(int(sec["vm"]["guest_ns"]))
        self.pm.clock = self.clock
        saved_ext = sec["extensions"]
        for ext in self.extensions:
            ext.restore_state(saved_ext.get(type(ext).__name__))
        if all(ext.keeps_saved_regions() for ext in self.extensions):
            loaded.copy_extra_regions(self.mem)   # after the extensions re-created theirs (grant frames)
        self.restored = True

    # -- running -------------------------------------------------------------------
    def boot(self) -> None:
        """Load the guest, put the BSP at its entry point, then let each extension install."""
        entry = load_guest(self)
        for ext in self.extensions:
            ext.install(entry)

    def run(self, on_started: Callable[["Machine"], None] | None = None) -> RunResult:
        """Boot (or resume a restored snapshot), run every vCPU in its own thread, wait for a stop."""
        if not self.restored:
            self.boot()
        handlers = self.exit_handlers
        if self.trace:
            handlers = {reason: traced(h, reason) for reason, h in handlers.items()}
        check = lib.xk_install_kick_signal(KICK_SIGNAL)
        if check < 0:
            raise KvmError("sigaction", -check)
        self.io.start()
        for ext in self.extensions:
            ext.start()   # e.g. Xen's embedded xenstored (ConfigError if its socket is taken)
        stdin = StdinReader.attach(self)  # host keystrokes (console: stdio only)
        threads = [threading.Thread(target=self._vcpu_thread, args=(r, handlers), name=f"vcpu{r.id}", daemon=True)
                   for r in self.runners]
        try:   # from the first vCPU on: a Ctrl-C as soon as the guest prints must still stop it
            for t in threads:
                t.start()
            if on_started is not None:
                on_started(self)
            watch = HaltWatch(self.runners, self.run_on_vcpu)
            while not self._stopped.wait(watch.PERIOD):
                verdict = watch.tick()
                if verdict is not None:
                    self.stop(ExitStatus.GUEST_HALTED, verdict)
        except KeyboardInterrupt:
            self.stop(ExitStatus.INTERRUPTED, "interrupted (Ctrl-C)")
        finally:
            if stdin is not None:
                stdin.close()  # the terminal back to cooked mode before anything is printed
        self._join(threads)
        self.console.flush()
        assert self.result is not None
        self.result.console_tail = self.console.last_lines(20)
        return self.result

    def _join(self, threads: list[threading.Thread]) -> None:
        """Wait (5 s each) for the vCPU threads; another Ctrl-C meanwhile does not cut it short."""
        for t in threads:
            while t.ident is not None:
                try:
                    t.join(timeout=5)
                    break
                except KeyboardInterrupt:
                    self.stop(ExitStatus.INTERRUPTED, "interrupted (Ctrl-C)")

    def _vcpu_thread(self, runner: VcpuRunner, handlers: dict[int, ExitHandler]) -> None:
        try:
            run = None if self.trace or self.vcpu_run is None else functools.partial(self.vcpu_run, runner.vcpu)
            runner.run(handlers, lambda: self.result is not None, self._on_unhandled, self.before_run, run)
        except Exception as e:  # a VMM bug must still end the run cleanly
            log.exception("vcpu%d thread failed", runner.id)
            self.stop(ExitStatus.VMM_ERROR, f"vcpu{runner.id}: {e}")

    def close(self) -> None:
        for ext in reversed(self.extensions):
            ext.close()   # e.g. stop the embedded xenstored, remove its socket
        self.io.stop()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.kvm.close()
