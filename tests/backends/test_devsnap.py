"""backends/snapshot.py and the xenbus snapshot hooks, without a guest: parking a worker,
re-attaching a backend without a handshake, disk identity, disk copies, tap names, a damaged
section.  (The guest tests are test_snapshot_backends.py.)"""
from __future__ import annotations

import os
import select
from types import SimpleNamespace

import pytest
import test_xenbus
from test_xenbus import FE, RecordingDevice, be_state, frontend_goes, until

from xenkvm.backends import snapshot as devsnap
from xenkvm.backends.xenbus import XenbusBackend, XenbusState
from xenkvm.machine.snapshot.format import SnapshotError

rig = test_xenbus.rig          # the store, a dom0 and a guest connection (a fixture)


class Restorable(RecordingDevice):
    """Records its restore; connects with the saved keys as a real device does."""

    def save_state(self):
        return {"mine": 7}

    def restore_state(self, state, frontend):
        self.calls.append(("restore", state["mine"]))
        if frontend is not None:
            self.connect(frontend)


def _connected(rig) -> XenbusBackend:
    b = rig.make(Restorable())
    rig.guest.write(f"{FE}/ring-ref", "8")
    frontend_goes(rig, XenbusState.INITIALISED)
    until(lambda: be_state(rig) == XenbusState.CONNECTED, "connected")
    frontend_goes(rig, XenbusState.CONNECTED)
    return b


def test_a_parked_worker_serves_nothing_until_unparked(rig):
    b = _connected(rig)
    until(lambda: "service" in b.device.calls, "the kick after connecting")
    assert b.park(10)
    b.device.calls.clear()      # after parking: a pass already under way may still have served
    b.kick()
    owed = select.select([b.kick_fd], [], [], 0)[0]                     # the kick waits in the eventfd
    assert owed and "service" not in b.device.calls
    b.unpark()
    until(lambda: "service" in b.device.calls, "served after unpark")


def test_restore_reattaches_without_a_handshake(rig):
    b = _connected(rig)
    assert b.park(10)
    st = b.save_state()
    b.unpark()
    assert st["connected"] and st["frontend"]["ring-ref"] == "8" and st["device"] == {"mine": 7}
    # a restored domain on the same store contents: a new backend object re-attaches
    writes = []
    again = XenbusBackend(b.domain, rig.vmm, Restorable())
    real_write = rig.vmm.write
    rig.vmm.write = lambda path, value: (writes.append(path), real_write(path, value))
    again.restore(st)
    assert again.connected and again.device.calls[:2] == [("restore", 7), "connect"]
    assert again.device.keys["ring-ref"] == "8"
    until(lambda: "service" in again.device.calls, "one kick for requests queued before the snapshot")
    assert writes == []                     # every node already agreed: nothing rewritten
    assert rig.vmm.read(f"{FE}/state") == str(int(XenbusState.CONNECTED))
    assert be_state(rig) == XenbusState.CONNECTED
    again.unplug(force=True)
    again.removed.wait(5)


def test_restore_refuses_frontend_keys_that_are_not_strings(rig):
    b = _connected(rig)
    st = {**b.save_state(), "frontend": {"ring-ref": 8}}
    with pytest.raises(ValueError, match="not strings"):
        XenbusBackend(b.domain, rig.vmm, Restorable()).restore(st)


# -- disk identity and copies -------------------------------------------------------------------
def test_disk_identity_catches_changes(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(3 << 20))
    saved = devsnap.disk_identity(disk)
    devsnap.check_disk(saved, "xvda")                      # unchanged: accepted
    st = os.stat(disk)
    with open(disk, "r+b") as f:                           # the last MiB, mtime put back
        f.seek((3 << 20) - 10)
        f.write(b"x")
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(SnapshotError, match=r"changed since the snapshot \(sha256_ends differ\)"):
        devsnap.check_disk(saved, "xvda")
    disk.write_bytes(bytes(3 << 20))                       # same bytes again, but a later mtime
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(SnapshotError, match=r"\(mtime_ns differ\)"):
        devsnap.check_disk(saved, "xvda")
    other = tmp_path / "e.img"                             # another file renamed over it, mtime kept
    other.write_bytes(bytes(3 << 20))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, disk)
    with pytest.raises(SnapshotError, match=r"\((dev, )?ino differ\)"):
        devsnap.check_disk(saved, "xvda")
    disk.unlink()
    with pytest.raises(SnapshotError, match="No such file"):
        devsnap.check_disk(saved, "xvda")


def test_disk_copy(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"abc" * 1000)
    out = tmp_path / "copies"
    out.mkdir()
    copy = devsnap.copy_disk(str(disk), str(out), "xvda")
    assert copy == str(out / "xvda-d.img") and open(copy, "rb").read() == disk.read_bytes()
    with pytest.raises(SnapshotError, match="exists"):
        devsnap.copy_disk(str(disk), str(out), "xvda")
    with pytest.raises(SnapshotError, match="not a directory"):
        devsnap.copy_disk(str(disk), str(tmp_path / "none"), "xvda")


def test_tap_names_tried():
    names = list(devsnap.ifnames("mytap", 0, 12345))
    assert names[:3] == ["mytap", "vif12345.0-r1", "vif12345.0-r2"]
    assert all(len(n) <= 15 for n in names)


# -- the section ---------------------------------------------------------------------------------------
def _mgr():
    return SimpleNamespace(domain=SimpleNamespace(domid=3, resumed_new=False), backends={})


@pytest.mark.parametrize("doc,needle", [
    ({"version": 2, "devices": []}, "version 2"),
    ("junk", "version 'junk'"),
    ({"version": 1}, "not accepted"),
    ({"version": 1, "devices": [{"type": "9pfs", "devid": 1, "spec": {}, "backend": {}}]}, "not accepted"),
    ({"version": 1, "devices": [{"type": "vbd", "devid": 1, "spec": {"target": 5}, "backend": {}}]},
     "not accepted"),
])
def test_a_damaged_section_is_one_line(doc, needle):
    with pytest.raises(SnapshotError, match=needle):
        devsnap.restore(_mgr(), doc)


def test_no_section_restores_nothing():
    assert devsnap.restore(_mgr(), None) == {}


def test_a_new_domains_vif_takes_a_fallback_tap_when_its_saved_name_is_taken():
    """A cooperative save's restore (a new domain: fresh backends, the frontend reconnects) names
    its tap as a transparent restore does: the saved name if free, else ``vif<domid>.<devid>-rN``.
    It used to attach the saved spec as it was, so a taken name failed the restore (two restores
    of one saved file, or the saved domain's tap not gone yet)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun (taps)")
    from xenkvm.backends.devices import DeviceManager
    from xenkvm.backends.tap import Tap
    from xenkvm.vifspec import VifSpec
    name, domid = f"xkds{os.getpid() % 100000}", 30000 + os.getpid() % 1000
    taken = Tap(name)
    attached: list = []
    mgr = SimpleNamespace(domain=SimpleNamespace(domid=domid, resumed_new=True), backends={})
    mgr._device = lambda spec: DeviceManager._device(mgr, spec)      # the real device for a spec
    mgr.attach = lambda spec: attached.append(mgr._device(spec))
    spec = VifSpec(devid=0, mac="00:16:3e:00:00:01", vifname=name)
    doc = {"type": "vif", "devid": 0, "spec": devsnap._spec_doc(spec), "backend": {"device": {"tap": name}}}
    try:
        devsnap.restore(mgr, {"version": 1, "devices": [doc]})
        assert [d.name for d in attached] == [f"vif{domid}.0-r1"]
    finally:
        for d in attached:
            d.tap.close()       # never attached to a backend: only its tap to drop
        taken.close()
