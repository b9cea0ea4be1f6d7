"""Taking a snapshot of a running Machine and building a Machine from one.

``take`` parks every vCPU (pause.py), then holds each extension still (``snapshot_begin``:
the Xen domain's lock, which its timers and backends take before they mark an event pending
and send the upcall MSI), and only then reads each vCPU's state on its own thread, the VM's
in-kernel chips and clock, the devices and each extension's ``save_state()``; writes the RAM
file and the state file; lets the vCPUs go.  Reading a vCPU's LAPIC before the domain is held
lost events: a timer could mark an upcall pending in guest RAM (saved later) and send its MSI
to the LAPIC (already saved) in between, and the restored guest, whose vcpu_info said "upcall
pending", never got an interrupt for it or for any event after it.
``load`` reads and checks a snapshot and returns what ``Machine.restore`` applies.

The config is saved whole (paths as text, enums by value), and its SHA-256 is in the
header: a restore runs the guest exactly as it was configured, whatever YAML says now.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

from xenkvm.config import GuestConfig, config_from_json, config_to_json
from xenkvm.machine.snapshot import ramfile, state
from xenkvm.machine.snapshot.format import Index, SnapshotError, canonical, read_state, write_state
from xenkvm.machine.snapshot.pause import Parking

if TYPE_CHECKING:
    from xenkvm.machine.machine import Machine

log = logging.getLogger(__name__)

PARK_TIMEOUT_S = 10.0


def xenkvm_version() -> str:
    try:
        return metadata.version("xenkvm")
    except metadata.PackageNotFoundError:
        return "unknown"


def ram_path(path: str) -> str:
    """The RAM file beside state file ``path``."""
    return path + ".ram"


# -- taking --------------------------------------------------------------------------
@dataclass
class SnapshotInfo:
    """What one snapshot cost and holds (for logs and the benchmark)."""

    path: str
    pages_written: int
    ram_bytes: int
    paused_s: float


def start(machine: "Machine", path: str) -> Parking:
    """Park every vCPU now (any thread, a vCPU's exit handler included); ``finish`` completes."""
    parking = Parking(machine.runners)
    parking.start()
    return parking


def finish(machine: "Machine", path: str, parking: Parking,
           on_saved: Callable[[], None] | None = None) -> SnapshotInfo:
    """Wait until every vCPU is parked, save the rest, write the files, resume (not a vCPU thread).
    ``on_saved`` runs once the files are written, before any vCPU runs again (a save that stops
    the machine there: xen/suspend.py)."""
    parking.wait(PARK_TIMEOUT_S)
    t0 = time.monotonic()
    held = []
    try:
        for ext in reversed(machine.extensions):   # a layer above first: it still needs the one below
            ext.snapshot_begin()
            held.append(ext)
        msrs = machine.kvm.msr_index_list()
        vcpus = parking.run_parked(lambda vcpu: state.capture_vcpu(vcpu, msrs))
        sections = {"config": config_to_json(machine.cfg),
                    "vcpus": [vcpus[i] for i in range(len(machine.vcpus))],
                    "vm": state.capture_vm(machine), "devices": state.capture_devices(machine),
                    "extensions": {type(ext).__name__: ext.save_state() for ext in machine.extensions}}
        sid = secrets.token_bytes(16)
        regions = [(r.name, r.gpa, r.view, r.host_addr if r.backing is None else None)
                   for r in machine.mem.regions]
        layout, written = ramfile.write_ram(ram_path(path), sid, regions)
        index = Index(xenkvm=xenkvm_version(), config_sha256=hashlib.sha256(canonical(sections["config"])).hexdigest(),
                      snapshot_id=sid.hex(), ram={"file": os.path.basename(ram_path(path)),
                                                  "regions": [r.to_json() for r in layout]}, sections=[])
        write_state(path, index, sections)
        if on_saved is not None:
            on_saved()
    finally:
        for ext in reversed(held):
            ext.snapshot_end()
        parking.release()
    paused = time.monotonic() - t0
    log.info("snapshot %s: %d non-zero pages of %d MiB, vCPUs paused %.3f s", path, written,
             machine.cfg.memory >> 20, paused)
    return SnapshotInfo(path, written, sum(r.size for r in layout), paused)


# -- loading -------------------------------------------------------------------------
@dataclass
class Loaded:
    """A checked snapshot: its config, sections and a RAM backing for GuestMemory."""

    path: str
    cfg: GuestConfig
    sections: dict[str, Any]
    regions: dict[str, ramfile.RamRegion]
    ram_fd: int
    prefault: bool

    def ram_backing(self, name: str, gpa: int) -> Callable[[int], Any]:
        """GuestMemory's ``ram_backing``: region ``name`` mapped from the RAM file."""
        r = self.regions.get(name)
        if r is None or r.gpa != gpa:
            raise SnapshotError(f"{self.path}: RAM region {name} at {gpa:#x} is not in the snapshot")

        def backing(size: int):
            if size != r.size:
                raise SnapshotError(f"{self.path}: RAM region {name} has {r.size} bytes, the config {size}")
            return ramfile.map_region(self.ram_fd, r, self.prefault)
        return backing

    def copy_extra_regions(self, mem) -> None:
        """Regions outside RAM (added at run time, e.g. Xen's special pages): the restored machine
        has re-created them at the same place; their bytes are copied in (they are small)."""
        for r in self.regions.values():
            if r.name in ("ram-low", "ram-high"):
                continue
            target = mem.region_at(r.gpa)
            if target is None or target.gpa != r.gpa or target.size != r.size:
                raise SnapshotError(f"{self.path}: region {r.name} at {r.gpa:#x} was not re-created")
            src = ramfile.map_region(self.ram_fd, r, False)
            try:
                target.view[:] = src
            finally:
                src.close()

    def close(self) -> None:
        """The mappings stay valid without the fd."""
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1


def load(path: str, *, prefault: bool = False) -> Loaded:
    """Read and check ``path`` and its RAM file; SnapshotError (one line) for any fault."""
    index, sections = read_state(path)
    for name in ("config", "vcpus", "vm", "devices", "extensions"):
        if name not in sections:
            raise SnapshotError(f"{path}: snapshot lacks its {name!r} section")
    if hashlib.sha256(canonical(sections["config"])).hexdigest() != index.config_sha256:
        raise SnapshotError(f"{path}: the config section does not match the header's digest")
    try:
        cfg = config_from_json(sections["config"])
        regions = [ramfile.RamRegion.from_json(r) for r in index.ram["regions"]]
        sid = bytes.fromhex(index.snapshot_id)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path}: malformed snapshot ({e})") from None
    fd = ramfile.open_ram(ram_path(path), sid, regions)   # beside it, whatever both were renamed to
    return Loaded(path, cfg, sections, {r.name: r for r in regions}, fd, prefault)
