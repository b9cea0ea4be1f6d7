"""The xenbus backend state machine (xenkvm/backends/xenbus.py) against the real store.

A recording device stands in for block/net (the guest tests in this directory
run the real block backend); the frontend is an unprivileged domid-1
connection to the same Xenstored, so permissions apply as on the guest's ring.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest

from xenkvm.backends.block import BlockDevice
from xenkvm.backends.devices import DeviceManager
from xenkvm.backends.xenbus import WORKER_NICE_BOOST, ConnectError, XenbusBackend, XenbusDevice, XenbusState
from xenkvm.backends.xsclient import VmmXsClient
from xenkvm.xen.fastpath import drain
from xenkvm.xenstore import XenstoreError, Xenstored

DOMID = 1
FE = f"/local/domain/{DOMID}/device/vbd/51712"
BE = f"/local/domain/0/backend/vbd/{DOMID}/51712"


class RecordingDevice(XenbusDevice):
    type = "vbd"

    def __init__(self, fail: str | None = None):
        super().__init__(51712, "xvda")
        self.fail = fail
        self.calls: list[str] = []
        self.keys: dict[str, str] = {}
        self.connected = False

    def backend_keys(self):
        return {"sectors": "2048", "feature-flush-cache": "1"}

    def frontend_keys(self):
        return {"virtual-device": "51712", "device-type": "disk"}

    def connect(self, frontend):
        self.calls.append("connect")
        self.keys = frontend
        if self.fail:
            raise ConnectError(self.fail)
        self.connected = True

    def disconnect(self):
        if self.connected:
            self.calls.append("disconnect")
        self.connected = False

    def service(self):
        self.calls.append("service")

    def close(self):
        self.calls.append("close")


def until(cond, what: str, bound: float = 10.0):
    """Wait for the worker thread to get there (a generous bound: behaviour, not timing)."""
    end = time.monotonic() + bound
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


@pytest.fixture
def rig():
    core = Xenstored()
    core.write_path(f"/local/domain/{DOMID}", "")
    domain = SimpleNamespace(domid=DOMID)
    vmm, guest = VmmXsClient(core), VmmXsClient(core, domid=DOMID, privileged=False)
    made: list[XenbusBackend] = []

    def make(device: RecordingDevice) -> XenbusBackend:
        b = XenbusBackend(domain, vmm, device)
        b.create()
        made.append(b)
        return b
    yield SimpleNamespace(core=core, vmm=vmm, guest=guest, make=make)
    for b in made:
        b.unplug(force=True)
        b.removed.wait(5)


def be_state(rig) -> int:
    return int(rig.vmm.read(f"{BE}/state"))


def frontend_goes(rig, state: XenbusState) -> None:
    rig.guest.write(f"{FE}/state", str(int(state)))


def test_nodes_and_permissions_as_libxl(rig):
    rig.make(RecordingDevice())
    r = rig.vmm.read
    assert (r(f"{BE}/frontend"), r(f"{BE}/frontend-id"), r(f"{BE}/online"), r(f"{BE}/sectors")) == (FE, "1", "1", "2048")
    assert (r(f"{FE}/backend"), r(f"{FE}/backend-id"), r(f"{FE}/state"), r(f"{FE}/device-type")) == (BE, "0", "1", "disk")
    assert be_state(rig) == XenbusState.INIT_WAIT
    with rig.core.lock:
        fe_perms = [p.wire() for p in rig.core.store.nodes[FE].perms]
        be_perms = [p.wire() for p in rig.core.store.nodes[BE].perms]
    assert fe_perms == ["n1", "r0"] and be_perms == ["n0", "r1"]
    assert rig.guest.read(f"{BE}/sectors") == "2048"           # the guest may read the backend
    with pytest.raises(XenstoreError, match="EACCES"):
        rig.guest.write(f"{BE}/state", "4")                    # but not write it
    rig.guest.write(f"{FE}/ring-ref", "8")                     # its own node is its own


def test_connect_reset_reconnect(rig):
    dev = RecordingDevice()
    b = rig.make(dev)
    rig.guest.write(f"{FE}/ring-ref", "9")
    rig.guest.write(f"{FE}/event-channel", "5")
    frontend_goes(rig, XenbusState.INITIALISED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    assert dev.keys["ring-ref"] == "9" and dev.keys["event-channel"] == "5"
    until(lambda: "service" in dev.calls, "the kick after connecting")
    frontend_goes(rig, XenbusState.CLOSING)
    until(lambda: be_state(rig) == XenbusState.CLOSING, "Closing")
    assert not dev.connected
    frontend_goes(rig, XenbusState.CLOSED)
    until(lambda: be_state(rig) == XenbusState.CLOSED, "Closed")
    frontend_goes(rig, XenbusState.INITIALISING)
    until(lambda: be_state(rig) == XenbusState.INIT_WAIT, "InitWait after a frontend reset")
    frontend_goes(rig, XenbusState.CONNECTED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected again")
    assert dev.calls.count("connect") == 2 and not b.removed.is_set()


def test_frontend_reset_while_connected(rig):
    dev = RecordingDevice()
    rig.make(dev)
    frontend_goes(rig, XenbusState.INITIALISED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    frontend_goes(rig, XenbusState.INITIALISING)   # kexec: the new kernel starts over
    until(lambda: be_state(rig) == XenbusState.INIT_WAIT, "InitWait")
    assert not dev.connected and "disconnect" in dev.calls


def test_garbage_state_is_logged_once_and_ignored(rig, caplog):
    dev = RecordingDevice()
    rig.make(dev)
    frontend_goes(rig, XenbusState.INITIALISED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    with caplog.at_level(logging.WARNING, "xenkvm.backends.xenbus"):
        rig.guest.write(f"{FE}/state", "banana")
        until(lambda: any("banana" in r.message for r in caplog.records), "the line for banana")
        rig.guest.write(f"{FE}/state", "banana")
        rig.guest.write(f"{FE}/state", "banana")    # the same garbage again: no new line
        rig.guest.write(f"{FE}/state", "99")
        until(lambda: any("'99'" in r.message for r in caplog.records), "the line for 99")
    lines = [r.message for r in caplog.records if "not a XenbusState" in r.message]
    assert len([m for m in lines if "banana" in m]) == 1
    assert be_state(rig) == XenbusState.CONNECTED and dev.connected and dev.calls.count("connect") == 1
    frontend_goes(rig, XenbusState.CLOSING)          # a later good value is still served
    until(lambda: be_state(rig) == XenbusState.CLOSING, "Closing")


def test_bad_keys_close_with_an_error_node(rig, caplog):
    dev = RecordingDevice(fail="ring-ref 'x' is not a number")
    rig.make(dev)
    with caplog.at_level(logging.WARNING, "xenkvm.backends.xenbus"):
        frontend_goes(rig, XenbusState.INITIALISED)
        until(lambda: be_state(rig) == XenbusState.CLOSING, "Closing")
    assert rig.vmm.read(f"{BE}/error") == "ring-ref 'x' is not a number"
    assert any("cannot connect: ring-ref" in r.message for r in caplog.records)
    dev.fail = None
    frontend_goes(rig, XenbusState.CLOSED)
    until(lambda: be_state(rig) == XenbusState.CLOSED, "Closed")
    frontend_goes(rig, XenbusState.INITIALISING)
    until(lambda: be_state(rig) == XenbusState.INIT_WAIT, "InitWait")
    frontend_goes(rig, XenbusState.INITIALISED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    assert rig.vmm.read(f"{BE}/error") is None


def test_unplug_waits_for_the_frontend(rig):
    dev = RecordingDevice()
    b = rig.make(dev)
    frontend_goes(rig, XenbusState.CONNECTED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    done = b.unplug()
    until(lambda: be_state(rig) == XenbusState.CLOSING, "Closing")
    assert rig.vmm.read(f"{BE}/online") == "0" and not done.is_set()
    frontend_goes(rig, XenbusState.CLOSED)
    assert done.wait(10)
    assert rig.vmm.read(BE) is None and rig.vmm.read(FE) is None
    assert dev.calls[-2:] == ["disconnect", "close"]


def test_unplug_of_an_unused_device_is_immediate(rig):
    dev = RecordingDevice()
    b = rig.make(dev)
    assert b.unplug().wait(10)
    assert rig.vmm.read(BE) is None and dev.calls == ["close"]


def test_kicks_are_coalesced_and_served_on_the_worker(rig):
    dev = RecordingDevice()
    b = rig.make(dev)
    frontend_goes(rig, XenbusState.CONNECTED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "Connected")
    until(lambda: "service" in dev.calls, "first kick")
    # Passes already on their way (a watch event) may still call the plain service: count only
    # the gated one, which holds the worker until the flood is in.
    gate = threading.Event()
    dev.service = lambda: (dev.calls.append("gated"), gate.wait(30))   # type: ignore[method-assign]
    b.kick()
    until(lambda: dev.calls.count("gated") == 1, "the worker is busy serving")
    for _ in range(1000):
        b.kick()                    # a flood while the worker is busy: one more pass, not 1000
    gate.set()
    until(lambda: dev.calls.count("gated") == 2, "the coalesced pass")
    until(lambda: b._events.idle, "the worker back asleep")
    assert dev.calls.count("gated") == 2
    assert drain(b.kick_fd) == 0       # the flood was drained before that pass: nothing owed


def test_a_device_asks_for_its_workers_nice(rig):
    """A device's worker runs ``worker_nice_boost`` below the VMM's nice (the vbd's preempts the
    vCPU that kicks it: xenbus.WORKER_NICE_BOOST); a device that asks nothing keeps it."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    plain = rig.make(RecordingDevice())
    boosted_dev = RecordingDevice()
    boosted_dev.devid, boosted_dev.worker_nice_boost = 52, WORKER_NICE_BOOST
    boosted = rig.make(boosted_dev)
    want = max(-20, base - WORKER_NICE_BOOST) if os.geteuid() == 0 else base
    until(lambda: boosted._thread.native_id is not None and plain._thread.native_id is not None, "started")
    until(lambda: os.getpriority(os.PRIO_PROCESS, boosted._thread.native_id) == want, f"nice {want}")
    assert os.getpriority(os.PRIO_PROCESS, plain._thread.native_id) == base
    assert BlockDevice.worker_nice_boost == WORKER_NICE_BOOST


class SlowClosingDevice(RecordingDevice):
    """A device whose close blocks until the test lets it go (an image daemon still flushing)."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def close(self):
        self.entered.set()
        self.release.wait(30)
        super().close()


def _manager() -> tuple[DeviceManager, SlowClosingDevice]:
    core = Xenstored()
    core.write_path(f"/local/domain/{DOMID}", "")
    mgr = DeviceManager(SimpleNamespace(domid=DOMID))
    mgr._xs = VmmXsClient(core)
    dev = SlowClosingDevice()
    mgr.attach(dev)
    return mgr, dev


def test_closing_the_domain_waits_for_its_devices():
    """DeviceManager.close (Machine.close: a restart builds the next machine right after) returns only
    once every device is closed, so the next machine finds the image's lock and the tap free; before,
    it returned at once with the devices still closing."""
    mgr, dev = _manager()
    returned = threading.Event()
    seen: list[bool] = []

    def release_later():
        dev.entered.wait(10)
        seen.append(returned.wait(2.0))      # close() still waiting while the device closes
        dev.release.set()

    helper = threading.Thread(target=release_later, daemon=True)
    helper.start()
    mgr.close()
    returned.set()
    helper.join(10)
    assert seen == [False] and dev.calls[-1] == "close"
    assert all(b.removed.is_set() for b in mgr.backends.values())


def test_stopping_the_machine_does_not_wait():
    """DeviceManager.stop may run inside a hypercall that holds the lock the workers need: it only
    starts the removal."""
    mgr, dev = _manager()
    mgr.stop()
    assert "close" not in dev.calls
    dev.release.set()
    until(lambda: all(b.removed.is_set() for b in mgr.backends.values()), "the devices removed")
    assert dev.calls[-1] == "close"


def test_an_event_put_while_the_worker_closes_its_inbox_is_not_an_error():
    """``put`` from another thread (an unplug, a watch) may meet the worker's ``close`` (the
    worker took an earlier event and ended): the event is dropped, never written to a closed,
    or another device's reused, eventfd number."""
    import sys
    from xenkvm.backends.xenbus import Inbox
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)         # switch threads as often as CPython allows
    try:
        for _ in range(300):
            inbox, errors = Inbox(SimpleNamespace(domid=DOMID)), []

            def putter():
                try:
                    for _ in range(50):
                        inbox.put("frontend")
                        inbox.kick()
                except OSError as e:
                    errors.append(e)
            t = threading.Thread(target=putter)
            t.start()
            inbox.close()
            t.join()
            assert not errors
    finally:
        sys.setswitchinterval(old)
