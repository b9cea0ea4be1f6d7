"""``domain.devices``: hot-plug and hot-unplug of PV devices, the API the control plane calls.

``attach(spec)`` creates the device's backend and xenstore nodes while the
guest runs (a Linux frontend sees the new ``device/<type>/<id>`` through its
watch and probes it); ``detach(vdev)`` starts the unplug handshake and returns
an event set once the device is gone.  The disks of the guest definition are
attached when the domain is built, before any vCPU runs.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from xenkvm.config import ConfigError
from xenkvm.consolespec import ConsoleSpec
from xenkvm.machine.extension import MachineExtension
from xenkvm.diskspec import DiskSpec, vdev_to_devid
from xenkvm.vifspec import VifSpec

from . import snapshot as devsnap
from .xenbus import XenbusBackend, XenbusDevice
from .xsclient import VmmXsClient

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)

#: how long closing a domain waits for its devices to go: as long as an image's daemon may take to
#: stop (it flushes and closes the image; imagedisk.START_TIMEOUT)
CLOSE_TIMEOUT_S = 60.0


class DeviceError(ConfigError):
    """A device cannot be attached or detached (one line for the user)."""


class DeviceManager(MachineExtension):
    """The PV devices of one domain; a machine extension so they are torn down with the run."""

    def __init__(self, domain: "XenDomain"):
        self.domain = domain
        self._xs: VmmXsClient | None = None
        self.backends: dict[tuple[str, int], XenbusBackend] = {}
        self._lock = threading.Lock()
        self.parked: list[XenbusBackend] = []      #: snapshots: the backends held still
        #: held by a snapshot from begin to end, and by ``attach``: a hot-plug waits for a
        #: snapshot (and a snapshot for a hot-plug), so a device is either in it whole or not at all
        self._snapshotting = threading.Lock()
        #: restores: a directory each writable disk is copied into first (``restore --disk-copy``)
        self.disk_copy: str | None = None
        #: restores: {vdev: the file the restored disk runs on}
        self.restored_disks: dict[str, object] = {}

    @property
    def xs(self) -> VmmXsClient:
        if self._xs is None:
            store = self.domain.store       # a shared xenstored: a socket connection to it
            self._xs = store.dom0_client() if store.core is None else VmmXsClient(store.core)
        return self._xs

    def attach_configured(self) -> None:
        """Attach the disks, vifs and extra consoles of the guest definition."""
        cfg = self.domain.machine.cfg
        for spec in (*getattr(cfg, "disks", ()), *getattr(cfg, "vifs", ()), *getattr(cfg, "consoles", ())):
            self.attach(spec)

    def attach(self, spec: DiskSpec | VifSpec | ConsoleSpec | XenbusDevice) -> XenbusBackend:
        """Plug a device in (a DiskSpec, or a ready XenbusDevice); DeviceError if it cannot be."""
        with self._snapshotting:
            return self._attach(spec)

    def _attach(self, spec: DiskSpec | VifSpec | ConsoleSpec | XenbusDevice) -> XenbusBackend:
        device = self._device(spec)
        key = (device.type, device.devid)
        with self._lock:
            if key in self.backends and not self.backends[key].removed.is_set():
                device.close()
                raise DeviceError(f"{device.type} {device.name} ({device.devid}) is already attached")
            backend = XenbusBackend(self.domain, self.xs, device)
            self.backends[key] = backend
        backend.create()
        return backend

    def _device(self, spec: DiskSpec | VifSpec | ConsoleSpec | XenbusDevice) -> XenbusDevice:
        if isinstance(spec, XenbusDevice):
            return spec
        if isinstance(spec, ConsoleSpec):
            from .console import ConsoleDevice
            try:
                return ConsoleDevice(spec, self.domain.machine.cfg.name)
            except OSError as e:
                raise DeviceError(f"console {spec.devid}: {spec.path or 'pty'}: {e.strerror}") from None
        if isinstance(spec, VifSpec):
            from .net import VifDevice
            from .tap import TapError
            try:
                return VifDevice(spec, self.domain.domid)
            except TapError as e:
                raise DeviceError(str(e)) from None
        from .block import BlockDevice
        try:
            return BlockDevice(spec)
        except OSError as e:
            raise DeviceError(f"disk {spec.vdev}: {spec.target}: {e.strerror}") from None

    def find(self, vdev: str | int, type_: str = "vbd") -> XenbusBackend:
        """The live backend of ``vdev`` (``xvdb``, or its device id)."""
        try:
            devid = vdev if isinstance(vdev, int) else int(vdev) if type_ in ("vif", "console") else vdev_to_devid(vdev)
        except ValueError:
            raise DeviceError(f"{vdev!r} is not a device name") from None
        backend = self.backends.get((type_, devid))
        if backend is None or backend.removed.is_set():
            raise DeviceError(f"no {type_} {vdev} attached")
        return backend

    def detach(self, vdev: str | int, type_: str = "vbd", *, force: bool = False) -> threading.Event:
        """Unplug: the frontend is asked to close; ``force`` removes it at once (a dead guest)."""
        return self.find(vdev, type_).unplug(force)

    # -- snapshots (backends/snapshot.py) ---------------------------------------------------
    def snapshot_begin(self) -> None:
        """Every vCPU parked: stop each backend between two requests (before the Xen domain
        takes its lock, which their workers need to notify)."""
        self._snapshotting.acquire()
        try:
            devsnap.park(self)
        except BaseException:
            self._snapshotting.release()
            raise

    def snapshot_end(self) -> None:
        try:
            devsnap.unpark(self)
        finally:
            self._snapshotting.release()

    def save_state(self) -> dict:
        return devsnap.save(self)

    def restore_state(self, state: dict | None) -> None:
        """The saved devices, re-attached to their rings in the restored RAM (after XenDomain's)."""
        self.restored_disks = devsnap.restore(self, state, self.disk_copy)

    def event_ports(self) -> set[int]:
        """The guest ports the backends hold (xen/snapshot.py lets the domain's save through)."""
        return devsnap.event_ports(self)

    def stop(self) -> None:
        """The run is ending: start removing every device (workers end, grants unmapped, images
        closed); nothing is waited for: the machine may be stopping from a hypercall that holds
        the domain lock the workers need."""
        self.close(timeout=None)

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        """The domain is going away: remove every device without asking the guest, and wait
        (``Machine.close``: no hypercall is running) until they are gone, ``timeout`` seconds at
        most in all.  Waiting matters: a restart (``on_reboot = "restart"``) builds the next
        machine at once, and its disks and taps are the same ones: an image's daemon must have
        stopped (QEMU's write lock on the image released) and a tap been deleted first.

        With ``timeout`` None nothing is waited for (``stop``).
        """
        with self._lock:
            backends = list(self.backends.values())
        for b in backends:
            b.unplug(force=True)
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        for b in backends:
            if not b.removed.wait(max(0.0, deadline - time.monotonic())):
                log.warning("%s: not removed within %.0f s", b.label, timeout)
