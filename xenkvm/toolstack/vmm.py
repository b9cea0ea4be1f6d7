"""One managed domain's VMM process: machines built and run in turn, a control socket throughout.

``xenkvm create`` starts this in the background (``xenkvm _vmm DIR CONFIG``),
or runs it in the foreground with ``-F``.  The process owns the domain's run
folder (xenkvm/toolstack/rundir.py) and its control socket
(docs/control-api.md), which outlive each machine: when the guest powers off,
reboots or crashes, the config's ``on_poweroff``/``on_reboot``/``on_crash``
decides: ``destroy`` ends the process (and removes the folder), ``restart``
builds a fresh machine from the same config (same name, domid, devices) in
this process, ``preserve`` keeps the stopped domain listed until ``destroy``.
Devices hot-plugged with ``block-attach``/``network-attach`` join that config and
detached ones leave it (as xl keeps them in the domain's config), so a restarted
domain comes back with the devices it had.

The guest's console goes to a bounded in-memory ring (``ConsoleSink``'s tail)
that ``console`` attaches to; Xen's own console (console_io) goes to
``hypervisor.log`` (``dmesg``).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from xenkvm.build import build_machine, restore_machine, xen_domain
from xenkvm.config import GuestConfig, LifecycleAction
from xenkvm.diskspec import DiskSpec
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.machine import Machine
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.machine.snapshot.snapshot import SnapshotInfo
from xenkvm.machine.status import ExitStatus, RunResult
from xenkvm.toolstack.devices import DeviceOps
from xenkvm.toolstack.pause import Pauser
from xenkvm.toolstack.protocol import ApiError, ErrorCode
from xenkvm.toolstack.rundir import DomainDir, DomainRecord, process_start_time
from xenkvm.toolstack.server import ControlServer
from xenkvm.toolstack.xenstored import SharedXenstored
from xenkvm.vifspec import VifSpec
from xenkvm.xen.suspend import SaveRequest
from xenkvm.xenstore.layout import vm_uuid

log = logging.getLogger(__name__)

CONSOLE_RING = 256 * 1024      #: bytes of console output kept for ``console`` to replay
DMESG_MAX = 256 * 1024
RESTART_BURST = 10             #: restarts within RESTART_WINDOW s before giving up (a boot loop)
RESTART_WINDOW = 60.0
SHUTDOWN_ACTIONS = ("poweroff", "reboot", "halt")
SUSPEND_TIMEOUT = 60.0         #: seconds a guest has to suspend after control/shutdown = suspend (default)


class State(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"      #: preserved after a power-off or reboot
    CRASHED = "crashed"        #: preserved after a crash
    DYING = "dying"


def managed_config(cfg: GuestConfig, d: DomainDir, rec: DomainRecord, foreground: bool,
                   domid: int | None = None) -> GuestConfig:
    """``cfg`` with what the toolstack decides: domid (``rec``'s unless given), the xenstore, the logs,
    the console."""
    xen, shared = cfg.xen, rec.xenstored
    if xen is not None:
        xen = dataclasses.replace(xen, domid=rec.domid if domid is None else domid, xenstore_socket=str(d.xenstore),
                                  hypervisor_log=f"file:{d.hypervisor_log}")
        if shared:      # the host's xenstored (toolstack/xenstored.py) instead of an embedded one
            xsd = SharedXenstored(Path(shared))
            xen = dataclasses.replace(xen, xenstore_socket=str(xsd.socket), xenstored=str(xsd.introduce))
    return dataclasses.replace(cfg, xen=xen, console="stdio" if foreground else "none")


class DomainProcess:
    """The VMM side of one managed domain (see the module docstring)."""

    def __init__(self, cfg: GuestConfig, d: DomainDir, rec: DomainRecord, *, foreground: bool = False,
                 restore: str | None = None, disk_copy: str | None = None):
        """``restore``: the first machine resumes that snapshot (``cfg`` is the one saved in it);
        a restart after that boots the same config afresh.  ``disk_copy``: that restore runs on
        copies of the writable disks made in this directory, and so does every restart."""
        self.dir, self.rec = d, rec
        self._restore = restore
        self._disk_copy = disk_copy
        # on its own embedded xenstored a restored guest keeps the domid it was saved with; on the
        # shared one it gets the toolstack's (the saved one if free), as Xen's restore gives a new
        # domain a new domid, and the daemon moves its saved subtree there (docs/snapshots.md)
        domid = cfg.xen.domid if restore and cfg.xen is not None and not rec.xenstored else rec.domid
        self.cfg = managed_config(cfg, d, rec, foreground, domid)
        self.sink = ConsoleSink(os.fdopen(os.dup(1), "wb", buffering=0) if foreground else None, CONSOLE_RING)
        self.state = State.STARTING
        self.machine: Machine | None = None
        self.pauser: Pauser | None = None
        self.generation = 0            #: how many machines this domain has booted (restarts + 1)
        self.started = time.time()
        self.last_result: RunResult | None = None
        self.online_vcpus = self.cfg.vcpus     #: what cpu/N/availability says (``vcpu-set``)
        self._destroy = threading.Event()
        self._lock = threading.Lock()
        self.server = ControlServer(str(d.control), self._handlers(), console_input=self._console_input,
                                    console_tail=self.sink.tail)
        self.sink.add_listener(self.server.console_output)

    # -- the run loop (main thread) ------------------------------------------------------------
    def run(self) -> int:
        """Boot, apply the on_* actions, until destroyed; the exit status of the last run."""
        self.rec.pid, self.rec.start_time = os.getpid(), process_start_time(os.getpid()) or 0
        self.dir.write(self.rec)
        self.server.start()
        restarts: list[float] = []
        status = ExitStatus.POWEROFF
        try:
            while not self._destroy.is_set():
                result = self._boot_once()
                status = result.status
                action = self._action(result)
                if action is LifecycleAction.RESTART and not self._destroy.is_set():
                    restarts = [t for t in restarts if time.monotonic() - t < RESTART_WINDOW] + [time.monotonic()]
                    if len(restarts) <= RESTART_BURST:
                        log.info("%s: %s; restarting", self.cfg.name, result.message)
                        continue
                    log.error("%s: restarted %d times in %g s; preserving it", self.cfg.name,
                              RESTART_BURST, RESTART_WINDOW)
                    action = LifecycleAction.PRESERVE
                if action is LifecycleAction.PRESERVE and not self._destroy.is_set():
                    self.state = State.CRASHED if status not in (ExitStatus.POWEROFF, ExitStatus.RESET) \
                        else State.SHUTDOWN
                    log.info("%s: %s; preserved until destroyed", self.cfg.name, result.message)
                    self._destroy.wait()
                break
        finally:
            self.state = State.DYING
            self.server.close()
            self.dir.remove()
        return int(status)

    def _boot_once(self) -> RunResult:
        machine = self._next_machine()
        with self._lock:
            self.machine, self.pauser = machine, Pauser(machine, xen_domain(machine))
            self.generation += 1
            self.online_vcpus = self.cfg.vcpus          # a new machine starts as configured
        if self.generation == 1 and (self.cfg.disks or self.cfg.vifs) \
                and not hasattr(xen_domain(machine), "devices"):
            log.warning("%s: disk/vif entries are kept in the config, but this build has no PV backends "
                        "to serve them", self.cfg.name)
        try:
            if self._destroy.is_set():
                return RunResult(ExitStatus.INTERRUPTED, "destroyed")
            self.state = State.RUNNING
            result = machine.run()
        finally:
            with self._lock:
                self.machine = self.pauser = None
            machine.close()
        self.last_result = result
        log.info("%s: run %d ended: %s", self.cfg.name, self.generation, result.message)
        return result

    def _next_machine(self) -> Machine:
        """The snapshot being restored (the first time only), else a fresh boot of the config."""
        path, self._restore = self._restore, None
        if path is None:
            return build_machine(self.cfg, sink=self.sink)
        # the toolstack's name, sockets and logs replace the saved domain's
        machine = restore_machine(path, sink=self.sink, configure=lambda saved: self.cfg,
                                  disk_copy=self._disk_copy)
        self._use_restored_disks(machine)
        return machine

    def _use_restored_disks(self, machine: Machine) -> None:
        """The config a restart boots names the disks the restore runs on (a ``--disk-copy``
        copy, not the saved disk the snapshot must still fit)."""
        devices = getattr(xen_domain(machine), "devices", None)
        targets = getattr(devices, "restored_disks", None) or {}
        with self._lock:
            self.cfg = dataclasses.replace(self.cfg, disks=tuple(
                dataclasses.replace(d, target=Path(targets[d.vdev])) if d.vdev in targets else d
                for d in self.cfg.disks))

    def _action(self, result: RunResult) -> LifecycleAction:
        if result.status is ExitStatus.INTERRUPTED:
            return LifecycleAction.DESTROY      # destroy, Ctrl-] in the foreground, SIGTERM
        if result.status is ExitStatus.POWEROFF:
            return self.cfg.on_poweroff
        if result.status is ExitStatus.RESET:
            return self.cfg.on_reboot
        return self.cfg.on_crash

    def destroy(self, why: str = "destroyed") -> None:
        """End the domain now, whatever its state (any thread, signal handlers too)."""
        self._destroy.set()
        machine = self.machine
        if machine is not None:
            machine.stop(ExitStatus.INTERRUPTED, why)

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, f: self.destroy(f"destroyed ({signal.Signals(s).name})"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    # -- control ops (control thread) --------------------------------------------------------------
    def _handlers(self) -> dict[str, Any]:
        h = {"info": self.op_info, "shutdown": self.op_shutdown, "destroy": self.op_destroy,
             "pause": self.op_pause, "unpause": self.op_unpause, "mem-set": self.op_mem_set,
             "dmesg": self.op_dmesg, "vcpu-set": self.op_vcpu_set, "snapshot": self.op_snapshot,
             "save": self.op_save}
        h.update(DeviceOps(self._devices, self.cfg.name, self).handlers())
        return h

    # -- the devices of the next boot (DeviceConfig, called by DeviceOps on the control thread) -----
    def device_added(self, spec: DiskSpec | VifSpec) -> None:
        """A hot-plugged disk or vif joins the config the next restart boots."""
        field = "vifs" if isinstance(spec, VifSpec) else "disks"
        with self._lock:
            kept = tuple(x for x in getattr(self.cfg, field) if x.devid != spec.devid)
            self.cfg = dataclasses.replace(self.cfg, **{field: kept + (spec,)})

    def device_removed(self, type_: str, devid: int) -> None:
        """A disk (``vbd``) or vif being detached leaves the config the next restart boots."""
        field = "vifs" if type_ == "vif" else "disks"
        with self._lock:
            kept = tuple(x for x in getattr(self.cfg, field) if x.devid != devid)
            self.cfg = dataclasses.replace(self.cfg, **{field: kept})

    def _running(self) -> tuple[Machine, Pauser]:
        with self._lock:
            m, p = self.machine, self.pauser
        if m is None or p is None or m.stopping or self.state not in (State.RUNNING, State.PAUSED):
            raise ApiError(ErrorCode.NOT_RUNNING, f"{self.cfg.name} is {self.state.value}")
        return m, p

    def _store(self):
        machine, _ = self._running()
        xen = xen_domain(machine)
        if xen is None:
            raise ApiError(ErrorCode.NOT_SUPPORTED, f"{self.cfg.name} has no Xen personality (no xenstore)")
        return xen.store, f"/local/domain/{xen.domid}"

    def _devices(self):
        """The running guest's hot-plug API (xenkvm/backends/devices.py), for the device ops."""
        machine, _ = self._running()
        xen = xen_domain(machine)
        if xen is None or getattr(xen, "devices", None) is None:
            raise ApiError(ErrorCode.NOT_SUPPORTED, f"{self.cfg.name} has no PV device backends (no Xen personality)")
        return xen.devices

    def op_info(self, args: dict) -> dict:
        with self._lock:
            paused = self.pauser is not None and self.pauser.paused
        state = State.PAUSED if paused and self.state is State.RUNNING else self.state
        uuid = self.rec.uuid or vm_uuid(self.cfg.name, self.rec.domid)    # what the guest's store says
        return {"name": self.cfg.name, "domid": self.rec.domid, "uuid": uuid, "pid": os.getpid(),
                "state": state.value, "memory": self.cfg.memory, "vcpus": self.online_vcpus,
                "maxvcpus": self.cfg.maxvcpus or self.cfg.vcpus,
                "created": self.started, "uptime": round(time.time() - self.started, 3),
                "generation": self.generation,
                "last_exit": self.last_result.message if self.last_result else None}

    def op_shutdown(self, args: dict) -> dict:
        """Write ``control/shutdown`` (xl's PV-aware shutdown; the guest acts on it)."""
        action = args.get("action", "poweroff")
        if action not in SHUTDOWN_ACTIONS:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"action: expected one of {', '.join(SHUTDOWN_ACTIONS)}")
        store, home = self._store()
        store.write_path(f"{home}/control/shutdown", action)
        return {"requested": action, "generation": self.generation}

    def op_destroy(self, args: dict) -> dict:
        self.destroy()
        return {"state": State.DYING.value}

    def op_pause(self, args: dict) -> dict:
        _, pauser = self._running()
        return {"state": State.PAUSED.value, "all_parked": pauser.pause()}

    def op_unpause(self, args: dict) -> dict:
        _, pauser = self._running()
        pauser.unpause()
        return {"state": State.RUNNING.value}

    def op_mem_set(self, args: dict) -> dict:
        """``memory/target`` in KiB, at most ``memory/static-max`` (as libxl), whole 4 KiB pages."""
        size = args.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 4096:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "bytes: expected a positive multiple of 4096")
        store, home = self._store()
        raw = store.read_path(f"{home}/memory/static-max") or b""
        if not raw.isdigit():
            raise ApiError(ErrorCode.INTERNAL, f"memory/static-max is {raw[:32]!r}")
        if size >> 10 > int(raw):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{size >> 20} MiB is above the static maximum "
                           f"of {int(raw) >> 10} MiB")
        store.write_path(f"{home}/memory/target", str(size >> 10))
        return {"target_kib": size >> 10}

    def op_vcpu_set(self, args: dict) -> dict:
        """``cpu/N/availability`` "online" for N < ``count``, "offline" above, for every vCPU the
        machine has (``maxvcpus``), as ``xl vcpu-set``: the guest's PV hotplug acts on it."""
        count = args.get("count")
        machine, _ = self._running()
        created = len(machine.vcpus)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= created:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"count: expected 1 to {created} (maxvcpus)")
        store, home = self._store()
        for i in range(created):
            store.write_path(f"{home}/cpu/{i}/availability", "online" if i < count else "offline")
        self.online_vcpus = count
        return {"vcpus": count, "maxvcpus": created}

    def op_dmesg(self, args: dict) -> dict:
        """The tail of Xen's console (console_io output), at most DMESG_MAX bytes."""
        try:
            with open(self.dir.hypervisor_log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - DMESG_MAX))
                data = f.read(DMESG_MAX)
        except FileNotFoundError:
            data = b""
        return {"text": data.decode("utf-8", "replace")}

    def _save_target(self, args: dict) -> tuple[Machine, str]:
        path = args.get("file")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "file: expected an absolute path")
        machine, pauser = self._running()
        if pauser.paused:
            raise ApiError(ErrorCode.NOT_RUNNING, f"{self.cfg.name} is paused: unpause it to save it")
        return machine, path

    def op_snapshot(self, args: dict, *, then_destroy: bool = False) -> dict:
        """Save the running domain to ``file`` (and ``file``.ram) and let it run on
        (docs/snapshots.md).  Runs on the control thread: other clients wait until it is written.
        ``then_destroy`` (a transparent ``save``): the domain ends once the files are written,
        before any vCPU runs again, so its disks stay as their saved identity says."""
        machine, path = self._save_target(args)
        try:
            info = machine.snapshot(path, on_saved=(lambda: self.destroy("saved")) if then_destroy else None)
        except SnapshotError as e:
            raise ApiError(ErrorCode.NOT_SUPPORTED, str(e)) from None
        except OSError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"file: {path}: {e.strerror or e}") from None
        return {"file": path, "pages": info.pages_written, "paused_s": round(info.paused_s, 3)}

    def op_save(self, args: dict) -> dict:
        """As ``xl save``: the domain saved to ``file``, then ended once the files are written.
        A guest that announces ``control/feature-suspend`` (Linux does) suspends itself first
        (xen/suspend.py); any other is saved as it runs."""
        machine, path = self._save_target(args)
        xen = xen_domain(machine)
        feature = f"/local/domain/{xen.domid}/control/feature-suspend" if xen is not None else None
        timeout = args.get("suspend_timeout", SUSPEND_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "suspend_timeout: expected seconds, more than 0, "
                           "at most 3600")
        if xen is not None and xen.store.read_path(feature) == b"1":
            result = {**self._suspend_and_save(xen, path, float(timeout)), "suspended": True}
        else:
            result = {**self.op_snapshot(args, then_destroy=True), "suspended": False}
        self.destroy("saved")
        return {**result, "state": State.DYING.value}

    def _suspend_and_save(self, xen, path: str, timeout: float) -> dict:
        """``control/shutdown = suspend``; the guest's SHUTDOWN_suspend takes the snapshot."""
        req = SaveRequest(path)
        try:
            xen.request_suspend(req)
        except SnapshotError as e:
            raise ApiError(ErrorCode.NOT_RUNNING, str(e)) from None
        xen.store.write_path(f"/local/domain/{xen.domid}/control/shutdown", "suspend")
        if not req.wait(timeout) and xen.cancel_suspend(req):
            raise ApiError(ErrorCode.NOT_SUPPORTED, f"{self.cfg.name} did not suspend within "
                           f"{timeout:g} s of control/shutdown = suspend; not saved")
        req.wait(SUSPEND_TIMEOUT)     # it suspended just in time: its snapshot completes
        if not isinstance(req.outcome, SnapshotInfo):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"the save failed, {self.cfg.name} resumed "
                           f"(suspend cancelled): {req.outcome}")
        info = req.outcome
        return {"file": path, "pages": info.pages_written, "paused_s": round(info.paused_s, 3)}

    def _console_input(self, data: bytes) -> None:
        """Bytes typed on an attached console: to the guest's active console, on the I/O thread."""
        with self._lock:
            machine = self.machine
        if machine is None:
            return
        target = next((s for ext in machine.extensions if (s := ext.input_sink()) is not None), machine.serial)
        machine.io.call_soon(lambda: target.push_input(data))
