"""Xenbus backends: the device directories, the XenbusState handshake, hot-unplug.

For each device the VMM plays dom0's part as libxl and a Linux backend
driver do:

* **Directories** (libxl ``libxl__device_generic_add``): the backend node
  ``/local/domain/0/backend/<type>/<domid>/<devid>`` is owned by dom0 with read
  access for the guest; the frontend node ``/local/domain/<domid>/device/<type>/<devid>``
  is owned by the guest with read access for the backend.  The backend node
  gets ``frontend``, ``frontend-id``, ``online`` = 1, ``state`` and the
  device's keys; the frontend node ``backend``, ``backend-id`` and
  ``state`` = 1 (Initialising: "a frontend node is probed only in state 1").
* **Handshake** (driven by a watch on the frontend's ``state``), as Linux's
  xen-blkback ``frontend_changed``: the backend waits in InitWait; frontend
  Initialised or Connected -> read its keys, connect, Connected; Closing ->
  Closing; Closed -> disconnect, Closed (and removal if the device was
  unplugged); Initialising while we are Closed or Connected (a frontend that
  reset: kexec, a driver reload) -> disconnect, InitWait again.
* **Misbehaviour**: a frontend ``state`` that is not a number is logged once
  and ignored; keys that do not let the device connect (no ring-ref, a bad
  grant, a port not unbound to dom0) are logged in one line, written to the
  backend's ``error`` node and the backend goes to Closing (what
  ``xenbus_dev_fatal`` does); the device stays disconnected until the
  frontend starts over.
* **Unplug** (libxl): ``online`` = 0 and ``state`` = Closing; once the frontend
  is Closed (or never started) the device disconnects (grants unmapped, event
  channel closed), closes its host resources and both nodes are removed.

Each device has one worker thread: store events and ring kicks are served in
order there, never on a vCPU thread, the I/O thread or the xenstored thread.
It sleeps on one eventfd (``kick_fd``, from the domain's fast-path pool): its
rings' event channels are bound to it (``bind_vmm_to_guest_port(kick_fd=)``),
so a guest's kick wakes it straight from the vCPU's C loop (xen/fastpath.py);
store events are queued beside it and write the same eventfd.  Each wake-up
serves the queued events, then the rings (a pass over idle rings costs a look
at each ``req_prod``).
"""
from __future__ import annotations

import collections
import enum
import logging
import os
import select
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

from xenkvm.xen.fastpath import drain
from xenkvm.xenstore import Perm, PermFlag

from .xsclient import VmmXsClient

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain

log = logging.getLogger(__name__)


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (io/xenbus.h)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class ConnectError(Exception):
    """The frontend's keys do not let the device connect (one line for the log)."""


class XenbusDevice(ABC):
    """What block, net and console backends implement; the framework calls it on the worker thread."""

    #: xenstore device type ("vbd", "vif", "console")
    type: str = ""
    #: how much nicer than the VMM its worker thread runs (``raise_priority``; the vbd's: ``WORKER_NICE_BOOST``)
    worker_nice_boost: int = 0

    def __init__(self, devid: int, name: str):
        self.devid = devid
        self.name = name                 #: the user's name for it (``xvda``)
        self.backend: XenbusBackend | None = None

    @property
    def domain(self) -> "XenDomain":
        assert self.backend is not None
        return self.backend.domain

    def frontend_keys(self) -> dict[str, str]:
        """Extra keys of the frontend node (written before ``state`` = 1)."""
        return {}

    @abstractmethod
    def backend_keys(self) -> dict[str, str]:
        """The device's keys in the backend node: features and geometry, written before InitWait."""

    @abstractmethod
    def connect(self, frontend: dict[str, str]) -> None:
        """Map the rings and bind the event channel the frontend published; raise ConnectError."""

    @abstractmethod
    def disconnect(self) -> None:
        """Unmap every grant and close the event channel; idempotent."""

    def service(self) -> None:
        """A kick from the frontend: serve the rings (worker thread)."""

    def serve_loop(self, ctl_fd: int) -> bool:
        """Serve kicks on the worker's own loop until ``ctl_fd`` (its events) is readable; False
        if the device has none now (the worker then sleeps in Python and calls :meth:`service`)."""
        return False

    def close(self) -> None:
        """Release host resources (files, taps); the device is gone."""

    # -- snapshots (backends/snapshot.py) ----------------------------------------------
    def event_ports(self) -> set[int]:
        """The guest ports this device's connection is bound to (VMM ends a snapshot saves)."""
        return set()

    def quiesce(self) -> None:
        """Snapshots: hold the device's own threads (not the worker) still; the worker is parked."""

    def unquiesce(self) -> None:
        """Snapshots: let what :meth:`quiesce` held run again."""

    def save_state(self) -> dict:
        """Snapshots (worker parked): the device's bookkeeping beside its rings in guest RAM."""
        return {}

    def restore_state(self, state: dict, frontend: dict[str, str] | None) -> None:
        """Snapshots: re-attach to the rings in restored RAM as they were (``frontend``: the keys
        the saved connection used; None: it was not connected); raise ConnectError or ValueError."""


def frontend_perms(domid: int) -> tuple[Perm, ...]:
    """libxl: the frontend node is the guest's, the backend (dom0) may read it."""
    return (Perm(PermFlag.NONE, domid), Perm(PermFlag.READ, 0))


def backend_perms(domid: int) -> tuple[Perm, ...]:
    """libxl: the backend node is dom0's, the guest may read it."""
    return (Perm(PermFlag.NONE, 0), Perm(PermFlag.READ, domid))


class Inbox:
    """What wakes a worker: ring kicks on ``fd``, named events in order on ``ctl`` (two eventfds).

    ``fd`` comes from the domain's fast-path pool (kept open while the machine lives,
    released back by :meth:`close`), or is the inbox's own for a domain without one; the rings'
    ports are bound to it.  ``ctl`` is readable while events are queued, so a worker sleeping
    in C on both (the vbd's ``xkb_loop``) knows when Python has something to do.
    """

    def __init__(self, domain) -> None:
        self._fast = getattr(domain, "fast", None)
        self.fd = self._fast.lease_fd() if self._fast is not None else os.eventfd(
            0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events: collections.deque[str] = collections.deque()
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._poll.register(self.ctl, select.POLLIN)
        self._closed = False
        #: put/kick against close: another thread's write must not meet a closed (or by then
        #: another device's, reused) eventfd number
        self._lock = threading.Lock()
        self.idle = False       #: the worker sleeps in :meth:`wait` with nothing owed to it

    def put(self, what: str) -> None:
        with self._lock:
            self._events.append(what)
            if not self._closed:
                os.eventfd_write(self.ctl, 1)

    def kick(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def take(self) -> list[str]:
        """The events queued so far (without waiting)."""
        drain(self.ctl)
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def wait(self) -> None:
        """Block until a kick (drained: the caller serves) or an event (left for :meth:`take`)."""
        while not drain(self.fd) and not self._events:
            self.idle = True
            self._poll.poll()
            self.idle = False
            if not self._events:
                drain(self.ctl)     # a signal whose event take() already had: do not spin on it

    def close(self) -> None:
        """The worker has ended: the eventfd back to the pool (or closed, if the inbox's own)."""
        with self._lock:
            self._closed = True
            if self._fast is not None:
                self._fast.release_fd(self.fd)
            else:
                os.close(self.fd)
            os.close(self.ctl)


#: How much nicer than the VMM the vbd's worker thread is (``XenbusDevice.worker_nice_boost``):
#: -10, 9.3x the weight under CFS.  A worker that a guest's kick wakes preempts the
#: kicking vCPU's thread (when they share a CPU) only while its vruntime is behind the vCPU's:
#: true of a worker serving 4-KiB requests, not of one copying more than the guest computes
#: (a 1-MiB read: ~2.8 ms of ``preadv`` against ~1 ms of guest).  Then the vCPU runs on to
#: idle and halts, and pays for it: the halt, the guest's tick stopped and restarted (two timer
#: hypercalls), its tick landing inside the copy (the timer thread preempts the worker, every
#: other 1-MiB read in a rig trace).  With the weight the worker preempts at the kick, as
#: QEMU's I/O thread does for virtio-blk: the rig's sequential read 1.08-1.26x, write
#: 1.16-1.29x in three boots (docs/linux-disk.md, "The vbd worker's nice").  Not the vif's threads: a guest
#: receiving TCP has work of its own between frames, and with the boost on the rx thread and the
#: tx worker host->guest fell from 25.3 to 21.0 MB/s in the same boot.  Needs CAP_SYS_NICE (or
#: RLIMIT_NICE); refused, the worker keeps the VMM's nice.
WORKER_NICE_BOOST = 10


def raise_priority(boost: int) -> None:
    """The calling thread ``boost`` below the VMM's nice (a thread's own: Linux's setpriority
    takes a thread id); 0: nothing."""
    if not boost:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(-20, os.getpriority(os.PRIO_PROCESS, tid) - boost))
    except OSError as e:
        log.debug("setpriority refused: %s; the worker keeps the VMM's nice", e)


def _set_policy(batch: bool) -> None:
    """SCHED_BATCH or SCHED_OTHER for the calling thread (Linux; elsewhere nothing changes)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH if batch else os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError) as e:
        log.debug("sched_setscheduler refused: %s", e)


class PassPolicy:
    """A worker's scheduling policy, from how many requests its passes find.

    Under SCHED_OTHER the worker that a kick wakes preempts the kicking vCPU's thread on its
    CPU at once (it has slept, and the vbd's has ``WORKER_NICE_BOOST``'s weight: its vruntime
    is behind), serves, and raises the upcall while that
    vCPU is out of KVM_RUN with the guest's interrupts still off (blkfront kicks under
    spin_lock_irqsave): KVM injects it through an interrupt-window exit, and each pass finds the
    one request just kicked.  Right for queue depth 1: the answer comes soonest.  With requests
    streaming in, SCHED_BATCH (never a wakeup preemptor, sched(7)) lets the guest queue more
    before the worker runs: in the one-CPU rig L1, QD32 rose from 227-724 to 795-1395 IOPS and
    interrupt-window exits fell from 0.7-1.2 to 0.2-0.4 a request, but QD1 fell by a third
    (the worker then waits for the vCPU to halt).  So: BATCH while passes average
    ``BATCH_AT`` requests or more, OTHER again below ``OTHER_BELOW`` (an EWMA of 1/4).
    On a CPU of its own the worker runs at once either way.
    """

    BATCH_AT = 1.25
    OTHER_BELOW = 1.05
    #: the C loops (xk_policy.h) try SCHED_BATCH every this many SCHED_OTHER wake-ups: their passes
    #: are quick enough to find one request a kick whatever the guest's queue depth (the rig's QD32
    #: fell from 3324 to 746 IOPS without the probe once the vbd's notifies were in C too)
    PROBE_EVERY = 64

    def __init__(self, apply=_set_policy):
        self._apply = apply
        self.batch = False
        self.average = 1.0
        self.switches = 0

    def after_pass(self, requests: int) -> None:
        self.average += (requests - self.average) / 4
        want = self.average >= self.BATCH_AT if not self.batch else self.average >= self.OTHER_BELOW
        if want != self.batch:
            self.batch = want
            self.switches += 1
            self._apply(want)


def bind_kick(domain, port: int, kick: Callable[[], None] | int) -> None:
    """Bind a ring's event channel: to a worker's eventfd ``kick`` (a send writes it, in C when
    the fast path runs: xen/fastpath.py), or to a callback run in the sender's thread."""
    if isinstance(kick, int):
        domain.evtchn.bind_vmm_to_guest_port(port, kick_fd=kick)
    else:
        domain.evtchn.bind_vmm_to_guest_port(port, kick, direct=True)


class XenbusBackend:
    """One device's store nodes, state machine and worker thread."""

    def __init__(self, domain: "XenDomain", xs: VmmXsClient, device: XenbusDevice):
        self.domain = domain
        self.xs = xs
        self.device = device
        device.backend = self
        d, t, n = domain.domid, device.type, device.devid
        self.fe_path = f"/local/domain/{d}/device/{t}/{n}"
        self.be_path = f"/local/domain/0/backend/{t}/{d}/{n}"
        self.label = f"d{d} {t} {n} ({device.name})"
        self.state = XenbusState.INITIALISING
        self.connected = False
        self.online = True
        self.removed = threading.Event()
        self._events = Inbox(domain)
        #: the eventfd the worker sleeps on: the device binds its rings' ports to it
        self.kick_fd = self._events.fd
        self._bad_state: str | None = None
        self._token: str | None = None
        self.frontend: dict[str, str] | None = None     #: the keys the connection was made with
        self._parked = threading.Event()                #: snapshots: the worker waits in _park
        self._unpark = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"xenbus-{t}-{d}-{n}", daemon=True)
        #: the worker's scheduling policy; the device feeds it each pass's requests (worker thread only)
        self.policy = PassPolicy()

    # -- creation ---------------------------------------------------------------
    def create(self) -> None:
        """Write both nodes as libxl does, go to InitWait, start watching the frontend."""
        d = self.domain.domid
        xs, be, fe = self.xs, self.be_path, self.fe_path
        xs.mkdir(be, backend_perms(d))
        keys = {"frontend": fe, "frontend-id": str(d), "online": "1",
                "state": str(int(XenbusState.INITIALISING)), **self.device.backend_keys()}
        for k, v in keys.items():
            xs.write(f"{be}/{k}", v)
        xs.mkdir(fe, frontend_perms(d))
        for k, v in {"backend": be, "backend-id": "0", **self.device.frontend_keys()}.items():
            xs.write(f"{fe}/{k}", v)
        xs.write(f"{fe}/state", str(int(XenbusState.INITIALISING)))
        self._switch(XenbusState.INIT_WAIT)
        self._thread.start()
        self._token = xs.watch(f"{fe}/state", lambda _p, _t: self._events.put("frontend"))
        log.info("%s: backend %s, frontend %s", self.label, be, fe)

    # -- events from other threads ----------------------------------------------------
    def kick(self) -> None:
        """Serve the rings on the worker (kicks coalesce in the eventfd)."""
        self._events.kick()

    def unplug(self, force: bool = False) -> threading.Event:
        """Start a hot-unplug; the returned event is set once both nodes are gone."""
        self._events.put("force" if force else "unplug")
        return self.removed

    # -- worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        raise_priority(self.device.worker_nice_boost)
        handlers = {"frontend": self._frontend_changed, "kick": self._service,
                    "unplug": self._unplug, "force": self._teardown, "park": self._park}
        try:
            while not self.removed.is_set():
                for what in self._events.take() + ["kick", "loop"]:
                    if self.removed.is_set():
                        break
                    try:
                        if what == "loop":
                            self._sleep()
                        else:
                            handlers[what]()
                    except Exception:   # a backend bug must not take the VM down: close the device
                        log.exception("%s: %s failed; the device is closed", self.label, what)
                        self._safe_teardown()
        finally:
            self._events.close()

    def _sleep(self) -> None:
        """Until the next event or kick: in the device's own serve loop while it can serve, else
        in the inbox (the loop's ``kick`` then serves)."""
        if not (self._may_serve() and self.device.serve_loop(self._events.ctl)):
            self._events.wait()

    def _may_serve(self) -> bool:
        machine = getattr(self.domain, "machine", None)
        return self.connected and not (machine is not None and machine.stopping)

    def _service(self) -> None:
        if self._may_serve():
            self.device.service()   # a stopping machine serves nothing more (a saved disk stays as saved)

    def _frontend_state(self) -> XenbusState | None:
        raw = self.xs.read(f"{self.fe_path}/state")
        if raw is None:
            return XenbusState.UNKNOWN
        try:
            return XenbusState(int(raw.strip()))
        except ValueError:
            if raw != self._bad_state:
                log.warning("%s: frontend state %r is not a XenbusState; ignored", self.label, raw[:32])
                self._bad_state = raw
            return None

    def _frontend_changed(self) -> None:
        fe = self._frontend_state()
        if fe is None:
            return
        log.debug("%s: frontend %s, backend %s", self.label, fe.name, self.state.name)
        if fe in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.state != XenbusState.CONNECTED and self.online:
                self._connect()
        elif fe == XenbusState.INITIALISING:
            if self.state in (XenbusState.CLOSED, XenbusState.CONNECTED) and self.online:
                self._disconnect()
                self._switch(XenbusState.INIT_WAIT)
        elif fe == XenbusState.CLOSING:
            self._disconnect()
            self._switch(XenbusState.CLOSING)
        elif fe in (XenbusState.CLOSED, XenbusState.UNKNOWN):
            self._disconnect()
            self._switch(XenbusState.CLOSED)
            if not self.online:
                self._teardown()

    def _connect(self) -> None:
        self._disconnect()   # idempotent: a frontend may connect twice in a row
        keys = self._frontend_keys()
        try:
            self.device.connect(keys)
        except ConnectError as e:
            log.warning("%s: cannot connect: %s", self.label, e)
            self.device.disconnect()
            self.xs.write(f"{self.be_path}/error", str(e)[:200])
            self._switch(XenbusState.CLOSING)
            return
        self.connected = True
        self.frontend = keys
        self.xs.rm(f"{self.be_path}/error")
        self._switch(XenbusState.CONNECTED)
        self.kick()   # requests queued before we connected

    def _frontend_keys(self) -> dict[str, str]:
        """The frontend node's keys, and one level below (``queue-N/ring-ref``), as a flat dict."""
        keys: dict[str, str] = {}
        for k in self.xs.directory(self.fe_path):
            keys[k] = self.xs.read(f"{self.fe_path}/{k}") or ""
            for sub in self.xs.directory(f"{self.fe_path}/{k}"):
                keys[f"{k}/{sub}"] = self.xs.read(f"{self.fe_path}/{k}/{sub}") or ""
        return keys

    def _disconnect(self) -> None:
        if self.connected:
            self.connected = False
        self.frontend = None
        self.device.disconnect()

    def _unplug(self) -> None:
        self.online = False
        self.xs.write(f"{self.be_path}/online", "0")
        fe = self._frontend_state()
        if fe in (XenbusState.INITIALISING, XenbusState.CLOSED, XenbusState.UNKNOWN):
            self._teardown()    # the frontend never used it (or already let go)
        else:
            self._switch(XenbusState.CLOSING)

    def _teardown(self) -> None:
        """Disconnect, release, remove both nodes; the worker ends."""
        if self.removed.is_set():
            return
        self.online = False
        if self._token is not None:
            self.xs.unwatch(f"{self.fe_path}/state", self._token)
            self._token = None
        self._disconnect()
        self.device.close()
        self.state = XenbusState.CLOSED
        self.xs.rm(self.fe_path)
        self.xs.rm(self.be_path)
        log.info("%s: removed", self.label)
        self.removed.set()

    def _safe_teardown(self) -> None:
        try:
            self._teardown()
        except Exception:
            log.exception("%s: teardown failed", self.label)
            self.removed.set()

    def _switch(self, state: XenbusState) -> None:
        if state != self.state:
            self.state = state
            self.xs.write(f"{self.be_path}/state", str(int(state)))

    # -- snapshots (backends/snapshot.py) ------------------------------------------------
    def park(self, timeout: float) -> bool:
        """Stop the worker between two events (so no request is half served) and the device's
        other threads; False if the worker did not get there within ``timeout`` s."""
        if self.removed.is_set() or not self._thread.is_alive():
            return True
        self._unpark.clear()
        self._parked.clear()
        self._events.put("park")
        if not self._parked.wait(timeout):
            self._unpark.set()      # it parks late: let it go at once
            return False
        self.device.quiesce()
        return True

    def unpark(self) -> None:
        """The snapshot is written (or failed): the device's threads and the worker go on."""
        if self._parked.is_set():
            self.device.unquiesce()
        self._unpark.set()

    def _park(self) -> None:
        self._parked.set()
        self._unpark.wait()
        self._parked.clear()

    def save_state(self) -> dict:
        """The handshake's state and the device's own (worker parked)."""
        return {"state": int(self.state), "connected": self.connected, "online": self.online,
                "frontend": self.frontend if self.connected else None, "device": self.device.save_state()}

    def restore(self, st: dict) -> None:
        """A restored domain: the nodes made to agree with the device (keys that differ rewritten:
        a new pty, a disk copy, a new domid on a shared xenstored; never the frontend's ``state``),
        the rings in restored RAM re-attached as saved, the worker and the watch started, and one
        kick for requests the frontend queued before the snapshot.  No handshake: the frontend
        does not notice."""
        self.state = XenbusState(int(st["state"]))
        self.online = bool(st["online"])
        frontend = st["frontend"] if st["connected"] else None
        if frontend is not None and not (isinstance(frontend, dict)
                                         and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in frontend.items())):
            raise ValueError(f"{self.label}: saved frontend keys are not strings")
        d = self.domain.domid
        be = {"frontend": self.fe_path, "frontend-id": str(d), "online": "1" if self.online else "0",
              "state": str(int(self.state)), **self.device.backend_keys()}
        if self.xs.read(f"{self.be_path}/state") is None:
            self.xs.mkdir(self.be_path, backend_perms(d))
        self._write_differing(self.be_path, be)
        if self.xs.read(f"{self.fe_path}/state") is None:      # not in the restored store: written afresh
            self.xs.mkdir(self.fe_path, frontend_perms(d))
            self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.INITIALISING)))
        self._write_differing(self.fe_path, {"backend": self.be_path, "backend-id": "0",
                                             **self.device.frontend_keys()})
        self.device.restore_state(st["device"], frontend)
        self.connected, self.frontend = frontend is not None, frontend
        self._thread.start()
        self._token = self.xs.watch(f"{self.fe_path}/state", lambda _p, _t: self._events.put("frontend"))
        if self.connected:
            self.kick()
        log.info("%s: restored (%s)", self.label, self.state.name)

    def _write_differing(self, path: str, keys: dict[str, str]) -> None:
        for k, v in keys.items():
            if self.xs.read(f"{path}/{k}") != v:
                self.xs.write(f"{path}/{k}", v)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to end (after an unplug)."""
        if self._thread.is_alive():
            self._thread.join(timeout)
