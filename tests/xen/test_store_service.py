"""The guest's xenstore: initial tree (content and permissions), the ring wired to
the real embedded server, and the server's lifecycle on its UNIX socket
(Debian's xenstore-utils read the tree through ``XENSTORED_PATH``).

The domain is the shared fake (evtchnfakes) with real guest memory, a real I/O
loop and the real ``EventChannels``: the guest's send is a hypercall and the
store's handler runs on the I/O thread, the hop its locking depends on.  The
guest side of the ring is written here with the ``xs_wire.h`` offsets.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from evtchnfakes import FakeDomain
from test_console import guest_send
from xenkvm.config import ConfigError
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.console import PrimaryConsole
from xenkvm.xen.store import StoreService, XenstoreSocketBusy
from xenkvm.xenstore.layout import DomainInfo, initial_tree, vm_uuid, write_tree
from xenkvm.xenstore import Perm, PermFlag, Xenstored, XsType
from xenkvm.xenstore.protocol import Message

R, N = PermFlag.READ, PermFlag.NONE
REQ, RSP, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 0, 1024, 2048, 2052, 2056, 2060
HDR = struct.Struct("<IIII")
INFO = DomainInfo(domid=3, name="web", uuid=vm_uuid("web", 3), vcpus=2, memory_kib=131072,
                  store_port=1, store_gfn=0xFEB00, console_port=2, console_gfn=0xFEB01)
XS_TOOLS = shutil.which("xenstore-read") and shutil.which("xenstore-ls")


# -- the initial tree (pure) ---------------------------------------------------------
def tree_dict(info=INFO):
    return {e.path: e for e in initial_tree(info)}


def test_tree_values():
    t = tree_dict()
    home = "/local/domain/3"
    vm = f"/vm/{INFO.uuid}"
    values = {p: e.value for p, e in t.items()}
    assert values[f"{home}/name"] == "web"
    assert values[f"{home}/domid"] == "3"
    assert values[f"{home}/vm"] == vm
    assert values[f"{vm}/name"] == "web" and values[f"{vm}/uuid"] == INFO.uuid
    assert values[f"{home}/control/platform-feature-multiprocessor-suspend"] == "1"
    assert values[f"{home}/control/platform-feature-xs_reset_watches"] == "1"
    assert values[f"{home}/cpu/0/availability"] == values[f"{home}/cpu/1/availability"] == "online"
    assert f"{home}/cpu/2/availability" not in t
    assert values[f"{home}/store/port"] == "1" and values[f"{home}/store/ring-ref"] == str(0xFEB00)
    assert values[f"{home}/console/port"] == "2"
    assert values[f"{home}/memory/static-max"] == "131072"
    assert values["/local/domain/0/name"] == "Domain-0"
    assert values[f"{home}/memory/target"] == "131072"   # the guest starts at its target
    assert f"{home}/control/feature-s3" not in t     # PVH, not HVM


def test_tree_parents_first_and_valid():
    """Directories with their own perms come before what is written under them
    (a plain write inherits the nearest existing ancestor's perms)."""
    entries = initial_tree(INFO)
    order = {e.path: i for i, e in enumerate(entries)}
    for e in entries:
        assert e.path.startswith("/") and "//" not in e.path and not e.path.endswith("/")
        ancestor = e.path.rsplit("/", 1)[0]
        while ancestor and ancestor not in order:
            ancestor = ancestor.rsplit("/", 1)[0]
        if ancestor:
            assert order[ancestor] < order[e.path], (ancestor, e.path)
    assert len(entries) == len(order)        # no path twice


def test_vm_uuid_is_stable():
    assert vm_uuid("web", 3) == vm_uuid("web", 3) != vm_uuid("web", 4)


@pytest.fixture
def core():
    c = Xenstored()
    write_tree(c, initial_tree(INFO))
    return c


def perms(core, path):
    return core.store.nodes[path].perms


def test_tree_perms(core):
    home = "/local/domain/3"
    ro, rw = (Perm(N, 0), Perm(R, 3)), (Perm(N, 3),)
    for path in (home, f"/vm/{INFO.uuid}", f"{home}/device", f"{home}/control", f"{home}/cpu",
                 f"{home}/memory", f"{home}/name", f"{home}/domid", f"{home}/vm",
                 f"{home}/control/platform-feature-xs_reset_watches", f"{home}/store/port",
                 f"{home}/cpu/1/availability", f"{home}/console/ring-ref"):
        assert perms(core, path) == ro, path
    for path in ("control/shutdown", "control/feature-poweroff", "control/sysrq", "data", "drivers",
                 "feature", "attr", "error", "device/suspend/event-channel"):
        assert perms(core, f"{home}/{path}") == rw, path
    assert perms(core, "/local/domain/0/name") == (Perm(N, 0),)


def guest_request(core, domid, type_, payload):
    """One request as the guest's ring connection would make it; returns (type, payload)."""
    conn = core.connect(domid, kind="ring")
    with core.lock:
        core.handle(conn, Message(type_, 1, 0, payload))
    data = conn.out.chunk(1 << 20)
    rtype, _, _, n = HDR.unpack_from(data)
    return rtype, data[16:16 + n]


def test_guest_view_of_the_tree(core):
    ok = lambda t, p: guest_request(core, 3, t, p)[0] == t  # noqa: E731
    assert guest_request(core, 3, XsType.READ, b"name\0") == (XsType.READ, b"web")
    assert ok(XsType.WRITE, b"control/feature-poweroff\x001")    # Linux writes these
    assert ok(XsType.WRITE, b"data/updated\x00yes")
    assert ok(XsType.WRITE, b"control/shutdown\x00")
    assert not ok(XsType.WRITE, b"name\x00evil")                 # read-only for the guest
    assert not ok(XsType.WRITE, b"control/platform-feature-xs_reset_watches\x000")
    assert not ok(XsType.READ, b"/local/domain/0/name\0")         # dom0's home is hidden
    assert guest_request(core, 4, XsType.READ, b"/local/domain/3/name\0")[0] == XsType.ERROR


# -- the service: ring + server ---------------------------------------------------------
class GuestRing:
    """The guest side of xenstore_domain_interface."""

    def __init__(self, dom):
        self.gpa = dom.params[HvmParam.STORE_PFN] << 12
        self.mem = dom.mem
        self.req_id = 0

    def u32(self, off, value=None):
        if value is None:
            return self.mem.read_u32(self.gpa + off)
        self.mem.write_u32(self.gpa + off, value)

    def send(self, type_, payload):
        self.req_id += 1
        msg = HDR.pack(type_, self.req_id, 0, len(payload)) + payload
        prod = self.u32(REQ_PROD)
        for i, b in enumerate(msg):
            self.mem.write(self.gpa + REQ + (prod + i) % 1024, bytes([b]))
        self.u32(REQ_PROD, prod + len(msg))

    def reply(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            cons, prod = self.u32(RSP_CONS), self.u32(RSP_PROD)
            if prod - cons >= 16:
                head = bytes(self.mem.read(self.gpa + RSP + (cons + i) % 1024, 1)[0] for i in range(16))
                rtype, _, _, n = HDR.unpack(head)
                if prod - cons >= 16 + n:
                    body = bytes(self.mem.read(self.gpa + RSP + (cons + 16 + i) % 1024, 1)[0]
                                 for i in range(n))
                    self.u32(RSP_CONS, cons + 16 + n)
                    return rtype, body
            assert time.monotonic() < deadline, "no reply on the ring"
            time.sleep(0.005)


@pytest.fixture
def domains():
    made: list[FakeDomain] = []
    yield made
    for d in made:
        d.close()


@pytest.fixture
def sock_path(tmp_path, monkeypatch):
    path = str(tmp_path / "xs" / "socket")
    monkeypatch.setenv("XENSTORED_PATH", path)
    return path


@pytest.fixture
def make_service(domains):
    """make_service(domid=1) -> (domain, its StoreService), the console built first as in XenDomain."""
    def make(domid=1):
        dom = FakeDomain(console=True, store=True, domid=domid)
        domains.append(dom)
        return dom, dom.store
    return make


@pytest.fixture
def service(make_service, sock_path):
    dom, svc = make_service()
    svc.start()
    yield dom, svc


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_params_ports_and_socket(service, sock_path):
    dom, svc = service
    assert dom.params[HvmParam.STORE_EVTCHN] == svc.port != dom.params[HvmParam.CONSOLE_EVTCHN]
    assert svc.socket_path == sock_path and os.path.exists(sock_path)
    assert svc.core.read_path("/local/domain/1/store/port") == str(svc.port).encode()
    assert svc.core.read_path("/local/domain/1/console/port") == str(dom.console.port).encode()
    assert svc.core.domains.is_introduced(1)


def test_guest_ring_round_trip(service):
    dom, svc = service
    g = GuestRing(dom)
    assert g.u32(2064) & 1          # server_features: reconnection advertised
    g.send(XsType.READ, b"name\0")
    guest_send(dom, svc.port)
    assert g.reply() == (XsType.READ, b"guest1")
    wait_for(lambda: dom.evtchn.is_pending(svc.port))
    g.send(XsType.WRITE, b"control/feature-poweroff\x001")
    guest_send(dom, svc.port)
    assert g.reply() == (XsType.WRITE, b"OK\0")
    assert svc.core.read_path("/local/domain/1/control/feature-poweroff") == b"1"


def test_ring_works_before_start(make_service, sock_path):
    dom, svc = make_service()
    g = GuestRing(dom)
    g.send(XsType.READ, b"domid\0")
    guest_send(dom, svc.port)
    assert g.reply() == (XsType.READ, b"1")
    assert not os.path.exists(sock_path)


def test_socket_removed_on_close(make_service, sock_path):
    dom, svc = make_service()
    svc.start()
    assert os.path.exists(sock_path)
    svc.close()
    assert not os.path.exists(sock_path)
    assert svc.socket_path is None


def test_busy_socket_is_refused(service, make_service, sock_path):
    with pytest.raises(XenstoreSocketBusy) as err:
        make_service(domid=2)[1].start()
    msg = str(err.value)
    assert sock_path in msg and "XENSTORED_PATH" in msg and "XENSTORED_RUNDIR" in msg
    assert "\n" not in msg and isinstance(err.value, ConfigError)
    assert os.path.exists(sock_path)        # the live server keeps its socket


def test_stale_socket_is_replaced(make_service, sock_path):
    os.makedirs(os.path.dirname(sock_path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()                            # bound, nobody listening
    dom, svc = make_service()
    svc.start()
    assert svc.socket_path == sock_path


def test_non_socket_path_is_refused(make_service, sock_path):
    os.makedirs(os.path.dirname(sock_path))
    open(sock_path, "w").close()
    dom, svc = make_service()
    with pytest.raises(XenstoreSocketBusy):
        svc.start()
    svc.close()
    assert os.path.exists(sock_path)         # not ours: left alone


def test_unusable_path_degrades_to_ring_only(make_service, tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "file" / "socket"))
    dom, svc = make_service()
    svc.start()
    assert svc.socket_path is None
    assert "XENSTORED_PATH" in caplog.text
    g = GuestRing(dom)
    g.send(XsType.READ, b"name\0")
    guest_send(dom, svc.port)
    assert g.reply() == (XsType.READ, b"guest1")


@pytest.mark.skipif(not XS_TOOLS, reason="Debian xenstore-utils not installed")
def test_xenstore_utils_read_the_initial_tree(service, sock_path):
    dom, svc = service
    env = dict(os.environ, XENSTORED_PATH=sock_path)
    run = lambda *a: subprocess.run(a, env=env, capture_output=True, text=True, timeout=10)  # noqa: E731
    r = run("xenstore-read", "/local/domain/1/name", "/local/domain/1/domid",
            "/local/domain/1/cpu/1/availability")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["guest1", "1", "online"]
    vm = run("xenstore-read", "/local/domain/1/vm").stdout.strip()
    assert run("xenstore-read", f"{vm}/name").stdout.strip() == "guest1"
    ls = run("xenstore-ls", "-p", "/local/domain/1")
    assert ls.returncode == 0, ls.stderr
    lines = {line.split("=")[0].strip(): line for line in ls.stdout.splitlines()}
    assert "platform-feature-xs_reset_watches" in lines
    assert "(n1)" in lines["shutdown"] and "(n0,r1)" in lines["name"]
    kib = dom.mem.ram_size // 1024      # libxl's memory/target: the RAM size, in KiB
    assert "(n0,r1)" in lines["target"] and f'"{kib}"' in lines["target"]


# -- with the real XenDomain and event channels (guest sends via EVTCHNOP_send) ----------
def test_real_domain_console_and_store(sock_path, xen_machine, hcall):
    from xenkvm.xen.abi import EvtchnOp, Hypercall, ffi

    d = xen_machine.xen
    con = getattr(d, "console", None) or PrimaryConsole.attach(d)
    svc = getattr(d, "store", None) or StoreService.attach(d)
    svc.start()
    arg = 0x20000

    def guest_send(port):
        obj = ffi.new("struct evtchn_send *", {"port": port})
        d.mem.write(arg, bytes(ffi.buffer(obj)))
        assert hcall(Hypercall.event_channel_op, EvtchnOp.send, arg) == 0

    try:
        assert d.evtchn.status(con.port)["vmm"] and d.evtchn.status(svc.port)["vmm"]
        # console: out[] -> sink, then the guest's port is raised
        cgpa = d.params[HvmParam.CONSOLE_PFN] << 12
        d.mem.write(cgpa + 0x400, b"hvc0 says hi\n")
        d.mem.write_u32(cgpa + 0xC0C, 13)
        guest_send(con.port)
        wait_for(lambda: xen_machine.console.tail() == b"hvc0 says hi\n")
        wait_for(lambda: d.evtchn.is_pending(con.port))
        # store: a READ over the ring, reply and event back
        g = GuestRing(d)
        g.send(XsType.READ, b"domid\0")
        guest_send(svc.port)
        assert g.reply() == (XsType.READ, str(d.domid).encode())
        wait_for(lambda: d.evtchn.is_pending(svc.port))
        assert svc.socket_path == sock_path
    finally:
        svc.close()
