"""A domain's part of the shared xenstored, exported for a snapshot and imported into a new
introduction (``export``/``resume``/``import`` on the introduce socket; xenstore/domstate.py).

The daemon is a real process; the VMM and guest ends are tests/xenstore/xsvmm.py across the
process boundary.  tests/toolstack/test_managed_snapshot.py does it with real guests.
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from xenkvm.xenstore import ring as ringmod
from xenkvm.xenstore.client import XsClient
from xenkvm.xenstore.protocol import XsType, encode
from xsvmm import WAIT, Vmm, request, start_daemon


@pytest.fixture
def daemon():
    tmp = Path(tempfile.mkdtemp(prefix="xsds", dir="/tmp"))
    proc, sock, intro = start_daemon(tmp)
    yield proc, sock, intro
    proc.send_signal(signal.SIGTERM)
    proc.wait(WAIT)
    shutil.rmtree(tmp, ignore_errors=True)


def _event(vmm: Vmm) -> tuple[bytes, bytes]:
    msg = vmm.guest.wait(lambda m: m.type == XsType.WATCH_EVENT)
    path, token = msg.payload.split(b"\0")[:2]
    return path, token


def _until(cond) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def _watched(vmm: Vmm) -> Vmm:
    """The guest has data/x, a relative watch on control/shutdown (initial event read)."""
    assert vmm.guest.call(XsType.WRITE, "data/x", value=b"mine")[0] == XsType.WRITE
    assert vmm.guest.call(XsType.WATCH, "control/shutdown", "t")[0] == XsType.WATCH
    assert _event(vmm) == (b"control/shutdown", b"t")
    return vmm


def test_export_then_import_moves_the_domain_to_its_new_domid(daemon):
    """Nodes (values, perms), the watch and a half-sent request go to a copy with another domid;
    the copy's watch fires on its own home only, the original's still on its own."""
    _, sock, intro = daemon
    orig = _watched(Vmm(intro, 1, "orig"))
    frame = encode(int(XsType.READ), 77, 0, b"data/x\0")
    orig.guest.send(frame[:10])                       # a partial request: the daemon buffers it
    prod = orig.guest.get(ringmod.REQ_PROD)
    _until(lambda: orig.guest.get(ringmod.REQ_CONS) == prod)   # taken from the ring, buffered
    reply = request(orig.link, {"op": "export"})
    assert reply["ok"], reply
    state = reply["state"]
    assert state["domid"] == 1 and ["/local/domain/1/control/shutdown", "t", True] in state["watches"]
    assert bytes.fromhex(state["partial"]) == frame[:10]
    assert request(orig.link, {"op": "resume"})["ok"]
    copy = Vmm(intro, 5, "copy")
    assert request(copy.link, {"op": "import", "state": state}) == {"v": 1, "ok": True, "domid": 5}
    assert request(copy.link, {"op": "resume"})["ok"]
    copy.guest.send(frame[10:])                       # the copy completes the saved request
    assert copy.guest.wait(lambda m: m.req_id == 77).payload == b"mine"
    with XsClient(sock) as xs:
        assert xs.read("/local/domain/5/data/x") == b"mine"
        assert xs.read("/local/domain/5/domid") == b"5" and xs.read("/local/domain/5/name") == b"copy"
        assert xs.get_perms("/local/domain/5/data/x")[0] == "n5"
        xs.write("/local/domain/5/control/shutdown", "to-copy")
        assert _event(copy) == (b"control/shutdown", b"t")
        assert copy.guest.call(XsType.READ, "control/shutdown") == (XsType.READ, b"to-copy")
        orig.guest.send(frame[10:])                   # the original completes its own copy of it
        assert orig.guest.wait(lambda m: m.req_id == 77).payload == b"mine"
        xs.write("/local/domain/1/control/shutdown", "to-orig")
        assert _event(orig) == (b"control/shutdown", b"t")
        assert orig.guest.call(XsType.READ, "control/shutdown") == (XsType.READ, b"to-orig")
        assert xs.read("/local/domain/1/domid") == b"1"
    assert not copy.guest.pending                     # the original's write never reached the copy


def test_a_held_ring_keeps_events_queued_and_the_export_carries_them(daemon):
    """After export the daemon leaves the page alone: an event fired meanwhile stays queued,
    a second export carries it, and the imported copy receives it once resumed."""
    _, sock, intro = daemon
    orig = _watched(Vmm(intro, 1))
    assert request(orig.link, {"op": "export"})["ok"]
    with XsClient(sock) as xs:
        xs.write("/local/domain/1/control/shutdown", "while-held")
    rsp_prod = orig.guest.get(ringmod.RSP_PROD)
    again = request(orig.link, {"op": "export"})["state"]
    assert orig.guest.get(ringmod.RSP_PROD) == rsp_prod            # nothing reached the page
    assert [ev for _, ev in again["output"]] == [True]
    copy = Vmm(intro, 6)
    assert request(copy.link, {"op": "import", "state": again})["ok"]
    assert request(copy.link, {"op": "resume"})["ok"]
    assert _event(copy) == (b"control/shutdown", b"t")
    assert request(orig.link, {"op": "resume"})["ok"]
    assert _event(orig) == (b"control/shutdown", b"t")            # the original's, delivered now


def test_an_open_transaction_refuses_the_export(daemon):
    """Xen's stream would carry TRANSACTION_DATA; xenkvm does not, so it refuses (one line)
    and leaves the ring working."""
    _, _, intro = daemon
    vmm = Vmm(intro, 2)
    kind, tx = vmm.guest.call(XsType.TRANSACTION_START, "")
    assert kind == XsType.TRANSACTION_START
    reply = request(vmm.link, {"op": "export"})
    assert not reply["ok"] and "open xenstore transaction" in reply["error"]
    assert vmm.guest.call(XsType.READ, "domid") == (XsType.READ, b"2")     # not held


@pytest.mark.parametrize("bad", [
    None, 7, {"version": 2}, {"version": 1, "domid": True},
    {"version": 1, "domid": 1, "nodes": [{"path": "x", "value": "", "perms": [[0, 1]]}],
     "watches": [], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [{"path": "/a", "value": "", "perms": [[0, 3]]}],
     "watches": [], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [{"path": "/a//b", "value": "", "perms": [[0, 1]]}],
     "watches": [], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [{"path": "/a", "value": "!!", "perms": [[0, 1]]}],
     "watches": [], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [{"path": "/a", "value": base64.b64encode(b"v" * 5000).decode(),
                                          "perms": [[0, 1]]}], "watches": [], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [], "watches": [["/x", "t\0", False]], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [], "watches": [["no-slash", "t", False]], "partial": "", "output": []},
    {"version": 1, "domid": 1, "nodes": [], "watches": [], "partial": "zz", "output": []},
    {"version": 1, "domid": 1, "nodes": [], "watches": [], "partial": "", "output": [["00", 1]]},
    {"version": 1, "domid": 1, "nodes": [], "watches": [], "partial": "", "output": [["00" * 40000, True]] * 2},
])
def test_hostile_imports_are_refused_and_change_nothing(daemon, bad):
    _, sock, intro = daemon
    vmm = Vmm(intro, 3)
    with XsClient(sock) as xs:
        before = xs.directory("/local/domain/3")
    reply = request(vmm.link, {"op": "import", "state": bad})
    assert not reply["ok"] and len(reply["error"].splitlines()) == 1, reply
    with XsClient(sock) as xs:
        assert xs.directory("/local/domain/3") == before
    assert vmm.guest.call(XsType.READ, "domid") == (XsType.READ, b"3")     # not held, still served
    good = {"version": 1, "domid": 1, "nodes": [], "watches": [], "partial": "", "output": []}
    assert request(vmm.link, {"op": "import", "state": good})["ok"]      # refused for its content only


def test_snapshot_requests_need_a_domain_and_no_descriptors(daemon):
    _, _, intro = daemon
    link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link.settimeout(WAIT)
    link.connect(intro)
    for op in ("export", "resume", "import"):
        reply = request(link, {"op": op})
        assert not reply["ok"] and "no domain introduced" in reply["error"], reply
    vmm = Vmm(intro, 4)
    assert "unknown keys" in request(vmm.link, {"op": "export", "extra": 1})["error"]
    r, w = os.pipe()
    assert "no descriptors" in request(vmm.link, {"op": "export"}, [r])["error"]
    for fd in (r, w):
        os.close(fd)
    link.close()
