"""The PV backends' part of a machine snapshot (``DeviceManager`` save/restore; docs/snapshots.md).

Taking (every vCPU parked): :func:`park` stops each device's worker between two events, so a
block or net request the worker took is answered and its response is in the ring, i.e. in
the guest RAM the snapshot writes; requests the frontend queued and the worker had not taken
yet stay in the ring too and are served after a restore (its first kick).  A vif's rx threads
finish their pass and wait.  This runs *before* the Xen domain takes its lock (the workers
need it to notify), which is why ``Machine`` begins a snapshot with the last extension
attached.  :func:`save` then records, per device: its spec (the guest definition's, or the
hot-plugged one), the XenbusState handshake (state, online, the frontend keys the connection
was made with: ring refs and order, queues, event channels, feature-persistent, protocol) and
the device's own bookkeeping (block: per queue ``req_cons``, ``rsp_prod``, the persistent
grants kept mapped; net: per queue the tx/rx consumer and response indexes, the tap's name;
console: input not yet in the ring).  A vbd also records its disk's identity
(:func:`disk_identity`).

Restoring (:func:`restore`, after the Xen domain: event channels, grant table and store are
back): each device is built again from its spec, its disk checked against the saved identity
(or first copied: ``disk_copy``), then ``XenbusBackend.restore`` re-attaches it to the rings
in the restored RAM with the saved indexes, without a handshake.  A domain restored as a new
one (a cooperative save, xen/suspend.py) gets fresh backends in InitWait instead: its
frontends reconnect, as after ``xl restore``.

Anything the section holds is checked; a fault is one SnapshotError line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenkvm.config import ConfigError
from xenkvm.consolespec import ConsoleSpec
from xenkvm.diskspec import DiskSpec
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.vifspec import VifSpec
from xenkvm.xen.gnttab import GrantError

from .xenbus import ConnectError, XenbusBackend

if TYPE_CHECKING:
    from .devices import DeviceManager

log = logging.getLogger(__name__)

VERSION = 1
PARK_TIMEOUT_S = 10.0
HASH_SPAN = 1 << 20             #: the first and the last MiB of a disk are hashed
IFNAMSIZ = 15                   #: usable characters of an interface name
SPECS = {"vbd": DiskSpec, "vif": VifSpec, "console": ConsoleSpec}


# -- disk identity ------------------------------------------------------------------------
def disk_identity(path: str | Path) -> dict[str, Any]:
    """What a restore checks a disk against: its path, size, device and inode, mtime_ns, and the
    SHA-256 of its first and last MiB.  Cheap (two 1 MiB reads, whatever the size).  Limits:
    a write that keeps size and mtime (``touch -d`` back) outside those two MiB, or an image
    copied over with its mtime preserved (``cp -p``, which gets a new inode, so it is caught
    unless renamed back over the same inode) goes unnoticed; the content is not hashed whole
    because that would make a restore cost grow with the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = os.lseek(fd, 0, os.SEEK_END)
        h = hashlib.sha256()
        h.update(os.pread(fd, HASH_SPAN, 0))
        h.update(os.pread(fd, HASH_SPAN, max(0, size - HASH_SPAN)))
    finally:
        os.close(fd)
    return {"path": str(path), "size": size, "dev": st.st_dev, "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def check_disk(saved: dict[str, Any], vdev: str) -> None:
    """SnapshotError (one line) unless the disk at ``saved['path']`` is the one saved."""
    path = saved["path"]
    try:
        now = disk_identity(path)
    except OSError as e:
        raise SnapshotError(f"disk {vdev}: {path}: {e.strerror}") from None
    changed = [k for k in ("size", "dev", "ino", "mtime_ns", "sha256_ends") if now[k] != saved.get(k)]
    if changed:
        raise SnapshotError(f"disk {vdev}: {path} changed since the snapshot ({', '.join(changed)} differ); "
                            "a restore that writes needs --disk-copy DIR")


def copy_disk(src: str, directory: str, vdev: str) -> str:
    """A reflink copy where the filesystem has them, else a sparse one, of ``src`` into
    ``directory`` (``<vdev>-<name>``); the copy is the restored domain's own."""
    dst = os.path.join(directory, f"{vdev}-{os.path.basename(src)}")
    if os.path.exists(dst):
        raise SnapshotError(f"disk {vdev}: --disk-copy: {dst} exists (give each restore its own directory)")
    if not os.path.isdir(directory):
        raise SnapshotError(f"disk {vdev}: --disk-copy: {directory} is not a directory")
    cp = shutil.which("cp") or "/bin/cp"
    r = subprocess.run([cp, "--reflink=auto", "--sparse=always", "--", src, dst], capture_output=True, text=True)
    if r.returncode != 0:
        raise SnapshotError(f"disk {vdev}: copying {src} to {dst}: {r.stderr.strip().splitlines()[-1:]}")
    log.info("disk %s: restored onto the copy %s", vdev, dst)
    return dst


# -- taking -------------------------------------------------------------------------------------
def _live(mgr: "DeviceManager") -> list[XenbusBackend]:
    with mgr._lock:
        return [b for b in mgr.backends.values() if not b.removed.is_set()]


def park(mgr: "DeviceManager") -> None:
    """Every device's worker between two events and its other threads waiting; SnapshotError
    (everything let go again) if one does not get there in PARK_TIMEOUT_S."""
    parked: list[XenbusBackend] = []
    for b in _live(mgr):
        if not b.park(PARK_TIMEOUT_S):
            for p in parked:
                p.unpark()
            raise SnapshotError(f"{b.label}: the backend did not stop within {PARK_TIMEOUT_S:.0f} s")
        parked.append(b)
    mgr.parked = parked


def unpark(mgr: "DeviceManager") -> None:
    parked, mgr.parked = mgr.parked, []
    for b in parked:
        b.unpark()


def event_ports(mgr: "DeviceManager") -> set[int]:
    """The guest ports the devices' backends hold (the Xen side saves those ends too)."""
    return {p for b in _live(mgr) if b.connected for p in b.device.event_ports()}


def _spec_doc(spec) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()}


def save(mgr: "DeviceManager") -> dict[str, Any]:
    """The section (backends parked by :func:`park`)."""
    devices = []
    for b in _live(mgr):
        dev = b.device
        spec = getattr(dev, "spec", None)
        if type(spec) is not SPECS.get(dev.type):
            raise SnapshotError(f"{b.label}: a {type(dev).__name__} device is not saved")
        doc = {"type": dev.type, "devid": dev.devid, "spec": _spec_doc(spec), "backend": b.save_state()}
        if dev.type == "vbd":
            try:
                doc["disk"] = disk_identity(spec.target)
            except OSError as e:
                raise SnapshotError(f"{b.label}: {spec.target}: {e.strerror}") from None
        devices.append(doc)
    return {"version": VERSION, "devices": devices}


# -- restoring -------------------------------------------------------------------------------------
def _spec(doc: dict[str, Any]):
    kind = SPECS.get(doc["type"])
    if kind is None:
        raise ValueError(f"device type {doc['type']!r}")
    fields = dict(doc["spec"])
    for name in ("target", "path"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    spec = kind(**fields)
    if spec.devid != doc["devid"]:
        raise ValueError(f"device id {doc['devid']!r} does not match its spec")
    return spec


def ifnames(wanted: str, devid: int, domid: int):
    """The names a restored vif's tap tries in turn: the saved one, then ``vif<domid>.<devid>-rN``."""
    yield wanted
    for n in range(1, 100):
        yield f"vif{domid}.{devid}-r{n}"[:IFNAMSIZ]


def _vif_device(mgr: "DeviceManager", spec: VifSpec, wanted: str):
    """The vif with a new tap: under ``wanted`` if free, else the first free fallback (logged).
    The tap is created exclusively, so parallel restores of one snapshot never share one."""
    from .net import VifDevice
    from .tap import TapExists
    for name in ifnames(wanted, spec.devid, mgr.domain.domid):
        try:
            dev = VifDevice(dataclasses.replace(spec, vifname=name), mgr.domain.domid)
        except TapExists:
            continue
        if name != wanted:
            log.warning("vif %d: tap %s is taken; the restored vif uses %s", spec.devid, wanted, name)
        return dev
    raise SnapshotError(f"vif {spec.devid}: no free interface name for the restored tap")


def _host_spec(mgr: "DeviceManager", doc: dict[str, Any], spec, disk_copy: str | None):
    """The spec as the restored device runs it: the disk checked (and copied), the tap named."""
    if isinstance(spec, DiskSpec):
        saved = doc["disk"]
        if not isinstance(saved, dict) or saved.get("path") != str(spec.target):
            raise ValueError(f"disk {spec.vdev}: identity does not name its target")
        check_disk(saved, spec.vdev)
        if disk_copy and not spec.readonly:
            spec = dataclasses.replace(spec, target=Path(copy_disk(str(spec.target), disk_copy, spec.vdev)))
    return spec


def _device(mgr: "DeviceManager", doc: dict[str, Any], spec):
    """The device for a re-attach (a vif's tap named as saved if free)."""
    if not isinstance(spec, VifSpec):
        return mgr._device(spec)
    wanted = doc["backend"]["device"].get("tap") or spec.vifname or f"vif{mgr.domain.domid}.{spec.devid}"
    if not isinstance(wanted, str) or len(wanted) > IFNAMSIZ or "/" in wanted:
        raise ValueError(f"vif {spec.devid}: tap name {wanted!r}")
    return _vif_device(mgr, spec, wanted)


def restore(mgr: "DeviceManager", st: dict[str, Any] | None, disk_copy: str | None = None) -> dict[str, Any]:
    """Rebuild the saved devices (see the module doc); returns {vdev: target} of each disk as
    restored (a copy's path where one was made).  SnapshotError (one line) for any fault."""
    if st is None:
        return {}
    if not isinstance(st, dict) or st.get("version") != VERSION:
        raise SnapshotError(f"PV backends' state version {st.get('version') if isinstance(st, dict) else st!r} "
                            f"(this xenkvm reads {VERSION})")
    fresh = mgr.domain.resumed_new
    targets: dict[str, Any] = {}
    try:
        docs = list(st["devices"])
        for doc in docs:
            spec = _host_spec(mgr, doc, _spec(doc), disk_copy)
            if isinstance(spec, DiskSpec):
                targets[spec.vdev] = spec.target
            if fresh:        # a new domain: a new device (a vif's tap named as below), the frontend reconnects
                mgr.attach(_device(mgr, doc, spec))
            else:
                _reattach(mgr, _device(mgr, doc, spec), doc["backend"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotError(f"dom{mgr.domain.domid}: PV backends' state not accepted: {e!r}"[:300]) from None
    except ConfigError as e:       # DeviceError, TapError: the host cannot give the device back
        raise SnapshotError(f"dom{mgr.domain.domid}: {e}") from None
    return targets


def _reattach(mgr: "DeviceManager", device, saved: dict[str, Any]) -> None:
    key = (device.type, device.devid)
    if key in mgr.backends:
        device.close()
        raise ValueError(f"{device.type} {device.devid} saved twice")
    backend = XenbusBackend(mgr.domain, mgr.xs, device)
    mgr.backends[key] = backend
    try:
        backend.restore(saved)
    except BaseException as e:
        del mgr.backends[key]
        device.close()
        if isinstance(e, (ConnectError, GrantError)):
            raise SnapshotError(f"{backend.label}: cannot re-attach to the saved rings: {e}") from None
        raise
