"""A Xen domain's part of a machine snapshot (XenDomain.save_state / restore_state).

Saved (every vCPU parked, under the domain lock and the xenstored lock, which the snapshot
holds until guest RAM is written too: ``XenDomain.snapshot_begin``/``_end``): the vCPU
registrations (vcpu_info, runstate and time areas, upcall vectors) and online state (``up``,
and ``down`` after VCPUOP_down: the restored machine holds such a vCPU until VCPUOP_up; a
snapshot from before a downed vCPU could be saved has ``down`` false or absent, which reads
as up, so version 1 stays), HVM params, VM assists,
shared_info placement, event channels, grant table and timers through their own
``to_state`` (timer deadlines are Xen system time, which a restored machine continues from
the saved instant: the remaining time is kept), the hypercall traps (kind and sites), the
whole embedded xenstored (nodes, permissions, the domain's ring watches: xenstore/state.py)
or, on the host's shared xenstored, the domain's part of it (its home subtree, ring watches and
queued connection state, exported by the daemon, which leaves the ring page alone until the
snapshot ends: xenstore/domstate.py; restored into the new domain's introduction, which may
have another domid),
the console's connection and queued input, console_io's reader flag, the test device's
counters.  Ring contents and indexes (console, xenstore) and every pending/mask bit live in
guest RAM and come back with it.

A domain saved while suspended (``suspended_vcpu``, xen/suspend.py) is restored as a new
domain instead (:func:`resume_new_domain`).

Refused with one line (SnapshotError) rather than saved wrong: the platform PCI device
(HVM guests), a ballooned domain, VMM event-channel ends other than the store's, the
console's and the PV backends' (the test device's echo backends), an open transaction on a
shared xenstored, the KVM_XEN trap.  The PV backends (vbd, vif, extra consoles) are saved by
their own extension, ``DeviceManager`` (backends/snapshot.py).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.suspend import RESUMED
from xenkvm.xen.trapsites import Site
from xenkvm.xen.traps import BreakpointTrap, HypercallPageTrap, PatchSite, PatchTrap
from xenkvm.xenstore import XenstoreServer
from xenkvm.xenstore import state as xsstate

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

VERSION = 1


def save(d: "XenDomain") -> dict[str, Any]:
    """The domain's state (vCPUs parked; caller holds the domain and xenstored locks)."""
    _refuse_unsupported(d)
    return {
        "version": VERSION,
        "vcpus": [dataclasses.asdict(v) for v in d.vcpus],
        "params": {str(int(k)): v for k, v in d.params.items()},
        "vm_assists": d.vm_assists, "shutdown_code": d.shutdown_code,
        "shinfo_gpa": d.shinfo.gpa,
        "evtchn": d.evtchn.to_state(), "gnttab": d.gnttab.to_state(), "timers": d.timers.to_state(),
        "traps": [_trap_doc(t) for t in d.traps],
        **_store_doc(d),
        "store_port": d.store.port, "console_port": d.console.port,
        "console": {"connected": d.console.connected, "pending": bytes(d.console._pending).hex()},
        "console_io_reading": d.console_io.reading,
        "testdev_last": d.testdev.last if d.testdev is not None else None,
        "suspended_vcpu": d.suspended_vcpu,
    }


def _refuse_unsupported(d: "XenDomain") -> None:
    why = None
    if d.platform is not None:
        why = "the Xen platform PCI device (HVM guests) is not saved yet"
    elif d.reservation.populated_pages != d.reservation.max_pages or d.reservation.unmapped_pages:
        why = "a ballooned domain is not saved yet"
    elif any(e.port not in _saved_vmm_ports(d) for e in d.evtchn.vmm_ends.values()):
        why = "VMM event-channel backends other than the store, consoles and PV devices are not saved yet"
    elif any(not isinstance(t, (HypercallPageTrap, PatchTrap, BreakpointTrap)) for t in d.traps):
        why = "the KVM_XEN hypercall trap is not saved yet"
    if why:
        raise SnapshotError(f"dom{d.domid}: {why}")


def _saved_vmm_ports(d: "XenDomain") -> set[int]:
    """VMM ends whose service is saved: the store's, the console's and the PV backends'
    (backends/snapshot.py saves those, as the DeviceManager extension)."""
    ports = {d.store.port, d.console.port}
    if d.devices is not None:
        ports |= d.devices.event_ports()
    return ports


def _store_doc(d: "XenDomain") -> dict[str, Any]:
    """The embedded store whole; on a shared one the domain's part (none if it suspended:
    it is restored as a new domain, with the initial tree)."""
    if d.store.owns_server:
        return {"xenstore": xsstate.snapshot(d.store.core)}
    if d.suspended_vcpu is not None:
        return {"xenstore_domain": None}
    return {"xenstore_domain": d.store.export_state()}


def _trap_doc(t) -> dict[str, Any]:
    if isinstance(t, HypercallPageTrap):
        return {"kind": t.name, "pages": t.pages}
    if isinstance(t, PatchTrap):
        return {"kind": t.name, "sites": [[p.site.name, p.site.vaddr, p.gpa] for p in t.sites],
                "send_stub": t.send_stub}
    return {"kind": t.name, "sites": [[s.name, s.vaddr] for s in t.sites]}


def _trap_from(d: "XenDomain", doc: dict[str, Any]):
    kind = doc["kind"]
    if kind == HypercallPageTrap.name:
        t = HypercallPageTrap(d)
        t.pages = int(doc["pages"])
        return t
    if kind == PatchTrap.name:   # the patched bytes are in the restored RAM; install rewrites the same
        t = PatchTrap(d, [PatchSite(Site(str(n), int(v)), int(g)) for n, v, g in doc["sites"]],
                      send_stub=doc.get("send_stub", False) is True)
        if t.send_stub and t.pair() is None:
            raise ValueError("a send stub on sites that are not Linux's hypercall pair")
        return t
    if kind == BreakpointTrap.name:
        return BreakpointTrap(d, [Site(str(n), int(v)) for n, v in doc["sites"]])
    raise ValueError(f"hypercall trap {kind!r}")


def restore(d: "XenDomain", st: dict[str, Any]) -> int | None:
    """Load :func:`save`'s state into a fresh domain of the same config, vCPU state already loaded;
    returns the test device's last result (None: it had none) for ``XenDomain`` to re-create it."""
    if st.get("version") != VERSION:
        raise SnapshotError(f"dom{d.domid}: Xen state version {st.get('version')} (this xenkvm reads {VERSION})")
    if st.get("suspended_vcpu") is not None:
        resume_new_domain(d, st)
        return None
    if (st["store_port"], st["console_port"]) != (d.store.port, d.console.port):
        raise SnapshotError(f"dom{d.domid}: store/console ports differ from the saved ones")
    d.clock = d.machine.clock          # system time continues from the saved instant
    d.boot_ns = d.clock.boot_ns
    with d.lock:
        for v, saved in zip(d.vcpus, st["vcpus"]):
            for k, val in saved.items():
                setattr(v, k, val)
            _check_online(v)
        d.params = {int(k): int(v) for k, v in st["params"].items()}
        d.vm_assists, d.shutdown_code = int(st["vm_assists"]), st["shutdown_code"]
        d.evtchn.from_state(st["evtchn"])
        _restore_store(d, st)      # before the bind below notifies the store's ring
        d.evtchn.bind_vmm_to_guest_port(d.store.port, d.store.on_guest_notify)
        d.evtchn.bind_vmm_to_guest_port(d.console.port, d.console.on_guest_notify)
        d.gnttab.from_state(st["gnttab"])
        d.timers.from_state(st["timers"])
        d.console.connected = bool(st["console"]["connected"])
        d.console._pending[:] = bytes.fromhex(st["console"]["pending"])
        d.console_io.reading = bool(st["console_io_reading"])
        d.shinfo.restored(st["shinfo_gpa"])
        d.traps = [_trap_from(d, t) for t in st["traps"]]
    return st.get("testdev_last")


def resume_new_domain(d: "XenDomain", st: dict[str, Any]) -> None:
    """A domain saved in SHUTDOWN_suspend (xen/suspend.py) comes back as Xen's restore makes it:
    a new domain, as this XenDomain was built: no event channels but the store's and console's
    (set up by the toolstack, their ports in the HVM params), no shared_info, vcpu_info, timers
    or grant frames mapped, the domain's initial xenstore tree without watches, cleared store
    and console pages.  Kept: each vCPU's online state, the hypercall traps (the hypercall
    page or patched sites are guest RAM) and whether the console ring was in use; the suspending vCPU's hypercall returns 0 there, and
    the guest re-registers the rest (Linux: xen_hvm_post_suspend, xen_irq_resume, gnttab_resume,
    xs_resume)."""
    vcpu_id = int(st["suspended_vcpu"])
    if not 0 <= vcpu_id < len(d.vcpus):
        raise SnapshotError(f"dom{d.domid}: suspended vCPU {vcpu_id} is not in the snapshot")
    d.clock = d.machine.clock          # system time continues from the saved instant
    d.boot_ns = d.clock.boot_ns
    with d.lock:
        for v, saved in zip(d.vcpus, st["vcpus"]):
            v.up, v.down = saved["up"], saved.get("down", False)
            _check_online(v)
        d.shinfo.restored(None)
        d.traps = [_trap_from(d, t) for t in st["traps"]]
        # the guest's console driver re-binds the same ring (Linux: xen_console_resume), so host
        # keystrokes go to the (cleared) ring from the start, not to the UART until it next writes
        d.console.connected = bool(st["console"]["connected"])
        d.resumed_new = True
    vcpu = d.machine.vcpus[vcpu_id]
    regs = vcpu.get_regs()
    regs.rax = RESUMED
    vcpu.set_regs(regs)


def _check_online(v) -> None:
    """A saved vCPU's ``up``/``down`` are booleans, and only a started vCPU can be down."""
    if not isinstance(v.up, bool) or not isinstance(v.down, bool):
        raise ValueError(f"vcpu {v.id}: up/down {v.up!r}/{v.down!r} are not booleans")
    if v.down and not v.up:
        raise ValueError(f"vcpu {v.id}: down but never started")


def reinstall(d: "XenDomain", trap) -> None:
    """``trap.install()`` for a restored domain: a patch trap's sites already hold the patched
    bytes in the restored RAM (checked: anything else is not this guest), so only its port hook
    is registered; the other traps write no guest memory and install as usual."""
    if not isinstance(trap, PatchTrap):
        trap.install()
        return
    for gpa, code in trap.expected():
        try:
            ok = bytes(d.mem.read(gpa, len(code))) == code
        except GuestMemoryError:
            ok = False
        if not ok:
            raise SnapshotError(f"dom{d.domid}: the hypercall site at GPA {gpa:#x} is not "
                                "patched in the snapshot's RAM")
    trap.hook()
    trap.plan_stub()


def _restore_store(d: "XenDomain", st: dict[str, Any]) -> None:
    """A new embedded xenstored from the saved one; the ring re-attached brings the domain's
    watches back (xenstore/dispatch.py: _restore_watches).  On the shared xenstored the
    domain's saved part goes to its new introduction.  A snapshot of one kind restores only
    on a domain of the same kind."""
    if ("xenstore" in st) != d.store.owns_server:
        raise SnapshotError(f"dom{d.domid}: saved on {'an embedded' if 'xenstore' in st else 'a shared'} "
                            "xenstored, restored on the other kind")
    if not d.store.owns_server:
        d.store.import_state(st["xenstore_domain"])
        return
    doc = st["xenstore"]
    try:
        core = xsstate.restore(doc)
    except (xsstate.StateError, KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"dom{d.domid}: xenstore state not accepted: {e}") from None
    s = d.store
    s.server.close()
    s.server = XenstoreServer(core, s.server.socket_path)
    s.core = core
    page = d.mem.view(s.gfn << 12, 4096)
    s.ring = s.server.add_ring(d.domid, page, s._notify_guest, port=s.port)
    d.params[HvmParam.STORE_EVTCHN] = s.port
