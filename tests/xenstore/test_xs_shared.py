"""The shared xenstored (``xenkvm xenstored --introduce``): domains introduced by VMMs over
SCM_RIGHTS, isolated from each other, released when their VMM goes; hostile VMMs and rings.

The daemon is a real process; each domain's VMM and guest ends are played by
tests/xenstore/xsvmm.py across that process boundary (memfd page, eventfds).
tests/toolstack/test_xenstored_shared.py does the same with real guests under /dev/kvm.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from xenkvm.xenstore import ring as ringmod
from xenkvm.xenstore.client import XsClient
from xenkvm.xenstore.protocol import RingError, XenstoreError, XsError, XsType, encode
from xsvmm import ROOT, WAIT, Vmm, info, request, sealed_memfd, start_daemon


@pytest.fixture
def daemon():
    tmp = Path(tempfile.mkdtemp(prefix="xsd", dir="/tmp"))
    proc, sock, intro = start_daemon(tmp)
    yield proc, sock, intro
    proc.send_signal(signal.SIGTERM)
    proc.wait(WAIT)
    shutil.rmtree(tmp, ignore_errors=True)


def _err(reply: tuple[int, bytes]) -> str | None:
    return reply[1].rstrip(b"\0").decode() if reply[0] == XsType.ERROR else None


def test_introduce_builds_home_and_fires_watch(daemon):
    _, sock, intro = daemon
    with XsClient(sock) as xs:
        xs.watch("@introduceDomain", "intro")
        assert xs.wait_event() == ("@introduceDomain", "intro")      # the initial event
        vmm = Vmm(intro, 3, "alpha")
        assert vmm.reply == {"v": 1, "ok": True, "domid": 3}
        assert xs.wait_event() == ("@introduceDomain", "intro")
        assert xs.read("/local/domain/3/name") == b"alpha"
        assert xs.read("/local/domain/3/store/port") == b"1"
        assert xs.call(XsType.IS_DOMAIN_INTRODUCED, b"3\0") == b"T\0"
    # the guest reads its home through the ring, relative paths resolve under it
    assert vmm.guest.call(XsType.READ, "name") == (XsType.READ, b"alpha")
    assert vmm.guest.call(XsType.GET_DOMAIN_PATH, "3") == (XsType.GET_DOMAIN_PATH, b"/local/domain/3\0")


def test_domains_see_only_their_own_subtree(daemon):
    _, sock, intro = daemon
    one, two = Vmm(intro, 1, "one"), Vmm(intro, 2, "two")
    assert one.guest.call(XsType.WRITE, "data/secret", value=b"s1")[0] == XsType.WRITE
    assert two.guest.call(XsType.WRITE, "data/secret", value=b"s2")[0] == XsType.WRITE
    assert one.guest.call(XsType.READ, "data/secret") == (XsType.READ, b"s1")
    assert two.guest.call(XsType.READ, "data/secret") == (XsType.READ, b"s2")
    assert _err(two.guest.call(XsType.READ, "/local/domain/1/data/secret")) == "EACCES"
    assert _err(two.guest.call(XsType.WRITE, "/local/domain/1/data/secret", value=b"x")) == "EACCES"
    assert _err(one.guest.call(XsType.DIRECTORY, "/local/domain/2")) == "EACCES"
    assert _err(one.guest.call(XsType.RELEASE, "2")) == "EACCES"
    with XsClient(sock) as xs:                       # dom0 sees both, nothing was changed
        assert xs.read("/local/domain/1/data/secret") == b"s1"
        assert set(xs.directory("/local/domain")) >= {"1", "2"}


def test_release_and_closed_vmm_free_the_domain(daemon):
    _, sock, intro = daemon
    one, two = Vmm(intro, 1), Vmm(intro, 2)
    with XsClient(sock) as xs:
        xs.write("/local/domain/0/backend/vbd/1/51712/state", "1")     # a backend dir of dom1
        xs.watch("@releaseDomain", "rel")
        xs.wait_event()
        assert one.release() == {"v": 1, "ok": True, "domid": 1}
        assert xs.wait_event() == ("@releaseDomain", "rel")
        for path in ("/local/domain/1", "/vm/00000000-0000-0000-0000-000000000001",
                     "/local/domain/0/backend/vbd/1"):
            with pytest.raises(XenstoreError) as e:
                xs.read(path)
            assert e.value.err == XsError.ENOENT, path
        two.close()                                   # no release: the VMM just went away
        assert xs.wait_event() == ("@releaseDomain", "rel")
        assert xs.call(XsType.IS_DOMAIN_INTRODUCED, b"2\0") == b"F\0"
        assert "2" not in xs.directory("/local/domain")


def test_killed_vmm_process_is_released(daemon, tmp_path):
    """A VMM process killed with SIGKILL: its domain goes, the others and the store stay."""
    _, sock, intro = daemon
    keep = Vmm(intro, 2)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from xsvmm import Vmm
        vmm = Vmm({intro!r}, 1)
        print(vmm.reply["ok"], flush=True)
        time.sleep(600)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "True"
        with XsClient(sock) as xs:
            xs.watch("@releaseDomain", "rel")
            xs.wait_event()
            assert xs.read("/local/domain/1/domid") == b"1"
            child.kill()
            assert xs.wait_event() == ("@releaseDomain", "rel")
            assert "1" not in xs.directory("/local/domain")
    finally:
        child.kill()
        child.wait()
    assert keep.guest.call(XsType.READ, "domid") == (XsType.READ, b"2")


def test_domids_are_unique_and_reused_after_release(daemon):
    _, sock, intro = daemon
    first = Vmm(intro, 1)
    again = Vmm(intro, 1)
    assert again.reply["ok"] is False and "in use" in again.reply["error"]
    with XsClient(sock) as xs:                       # dom0 releases it behind its VMM's back:
        xs.call(XsType.RELEASE, b"1\0")               # still claimed until the VMM lets go
    assert Vmm(intro, 1).reply["ok"] is False
    first.release()
    third = Vmm(intro, 1, "third")
    assert third.reply["ok"] is True
    assert third.guest.call(XsType.READ, "name") == (XsType.READ, b"third")
    # a domid whose VMM died is free at once, even before the daemon saw the hang-up
    third.close()
    assert Vmm(intro, 1).reply["ok"] is True


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_garbage_on_the_introduce_socket_gets_errors(daemon):
    proc, sock, intro = daemon
    link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link.settimeout(WAIT)
    link.connect(intro)
    good = {"op": "introduce", "domid": 4, "page_offset": 0, "info": info()}
    efd = lambda: os.eventfd(0, os.EFD_NONBLOCK)  # noqa: E731
    r, w = os.pipe()
    cases = [
        (b"\xff\x00 not json", []),
        (b"[1, 2]", []),
        ({"op": "introduce", "v": 2}, []),
        ({"op": "reboot"}, []),
        ({"op": "release"}, []),                                  # nothing introduced yet
        (b"{" + b" " * 9000 + b"}", []),                          # oversized
        (good, []),                                               # no descriptors
        (good, [sealed_memfd(), efd()]),                          # too few
        (good, [sealed_memfd(), efd(), efd(), efd()]),            # too many
        (good, [r, efd(), efd()]),                                # a pipe, not a memfd
        (good, [sealed_memfd(seal=False), efd(), efd()]),         # can be truncated under us
        (good, [sealed_memfd(size=2048), efd(), efd()]),                # the page is outside
        (good, [sealed_memfd(), w, efd()]),                       # a pipe, not an eventfd
        ({**good, "domid": 0}, [sealed_memfd(), efd(), efd()]),
        ({**good, "domid": 0x7FF0}, [sealed_memfd(), efd(), efd()]),
        ({**good, "domid": "4"}, [sealed_memfd(), efd(), efd()]),
        ({**good, "page_offset": 100}, [sealed_memfd(), efd(), efd()]),
        ({**good, "page_offset": 1 << 30}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": {**info(), "vcpus": -1}}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": {**info(), "name": "x" * 300}}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": {**info(), "extra": 1}}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": {**info(), "online_vcpus": 2}}, [sealed_memfd(), efd(), efd()]),   # > vcpus
        ({**good, "info": {**info(), "uuid": "../../local"}}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": {**info(), "uuid": "a/b"}}, [sealed_memfd(), efd(), efd()]),
        ({**good, "info": "guest"}, [sealed_memfd(), efd(), efd()]),
    ]
    assert request(link, b"{}")["ok"] is False      # accepted: the connection's descriptor counts
    before = _fd_count(proc.pid)
    for obj, fds in cases:
        reply = request(link, obj, fds)
        assert reply["ok"] is False and reply["error"], (obj if isinstance(obj, dict) else obj[:20], reply)
        for fd in fds:
            os.close(fd)
    assert _fd_count(proc.pid) == before           # every descriptor we sent was closed
    # the same connection (and the daemon) still work
    vmm_fds = [sealed_memfd(), efd(), efd()]
    assert request(link, good, vmm_fds) == {"v": 1, "ok": True, "domid": 4}
    with XsClient(sock) as xs:
        assert xs.read("/local/domain/4/name") == b"guest"


def test_hostile_ring_hurts_only_its_domain(daemon):
    _, sock, intro = daemon
    bad, good = Vmm(intro, 1), Vmm(intro, 2)
    # request indices far ahead of the consumer: the ring is broken, for dom1 only
    bad.guest.set(ringmod.REQ_PROD, 0x7000_0000)
    os.eventfd_write(bad.guest.kick, 1)
    assert good.guest.call(XsType.READ, "domid") == (XsType.READ, b"2")
    assert bad.guest.get(ringmod.ERROR) == RingError.RINGIDX
    # an oversized message header on a reconnected ring: a protocol error, again dom1 only
    worse = Vmm(intro, 3)
    worse.guest.send(encode(int(XsType.READ), 1, 0, b"")[:12] + (5000).to_bytes(4, "little"))
    assert good.guest.call(XsType.WRITE, "data/x", value=b"y")[0] == XsType.WRITE
    assert worse.guest.get(ringmod.ERROR) == RingError.PROTO
    with XsClient(sock) as xs:
        assert xs.read("/local/domain/2/data/x") == b"y"
        assert xs.call(XsType.CONTROL, b"check\0") == b"OK\0"


@pytest.mark.skipif(shutil.which("xenstore-read") is None, reason="xenstore-utils not installed")
def test_xenstore_utils_against_the_shared_store(daemon):
    _, sock, intro = daemon
    env = {**os.environ, "XENSTORED_PATH": sock}
    run = lambda *a: subprocess.run(a, env=env, capture_output=True, text=True, timeout=WAIT)  # noqa: E731
    vmm = Vmm(intro, 5, "utils")
    assert run("xenstore-read", "/local/domain/5/name").stdout == "utils\n"
    assert run("xenstore-write", "/local/domain/5/data/from-host", "hello").returncode == 0
    assert vmm.guest.call(XsType.READ, "data/from-host") == (XsType.READ, b"hello")
    listing = run("xenstore-ls", "/local/domain").stdout
    assert re.search(r'^5 = ""$', listing, re.M) and re.search(r'^ name = "utils"$', listing, re.M), listing
    watch = subprocess.Popen(["xenstore-watch", "-n", "2", "@releaseDomain"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout.readline().strip() == "@releaseDomain"     # the initial event
        vmm.release()
        assert watch.stdout.readline().strip() == "@releaseDomain"
        assert watch.wait(WAIT) == 0
    finally:
        watch.kill()
    assert run("xenstore-read", "/local/domain/5/name").returncode != 0


def test_vmm_watch_client_concurrent_requests_and_callbacks(daemon):
    """XsWatchClient: the VMM's dom0 connection to the daemon (its backends and control ops)."""
    import queue
    import threading

    from xenkvm.xenstore.watchclient import XsWatchClient
    proc, sock, _ = daemon
    client = XsWatchClient(sock, timeout=WAIT)
    events: queue.Queue = queue.Queue()
    token = client.watch("/w", lambda path, tok: events.put((path, tok)))
    assert events.get(timeout=WAIT) == ("/w", token)            # the initial event
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(40):
                client.write(f"/w/{i}", str(j))
                assert client.read(f"/w/{i}") == str(j)
        except BaseException as e:      # noqa: BLE001 - reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert failures == []
    seen = set()
    while len(seen) < 4:
        seen.add(events.get(timeout=WAIT)[0])
    assert seen == {f"/w/{i}" for i in range(4)}
    client.unwatch("/w", token)
    assert client.read("/missing") is None and client.directory("/missing") == []
    with pytest.raises(XenstoreError) as e:
        client.write("/bad//path", "x")
    assert e.value.err == XsError.EINVAL
    proc.send_signal(signal.SIGTERM)
    proc.wait(WAIT)
    with pytest.raises(XenstoreError) as e:
        client.read("/w/0")                                      # the daemon is gone: EIO, no hang
    assert e.value.err == XsError.EIO
    client.close()


def test_initial_tree_marks_vcpus_past_online_offline():
    """xl's maxvcpus: every created vCPU has cpu/N/availability, those past ``vcpus`` offline."""
    from xenkvm.xenstore.layout import DomainInfo, initial_tree
    tree = {e.path: e.value for e in initial_tree(DomainInfo(7, "g", "u", vcpus=3, memory_kib=1024,
                                                             store_port=1, store_gfn=2, online_vcpus=1))}
    assert [tree[f"/local/domain/7/cpu/{i}/availability"] for i in range(3)] == ["online", "offline", "offline"]
    full = {e.path: e.value for e in initial_tree(DomainInfo(7, "g", "u", 2, 1024, 1, 2))}
    assert [full[f"/local/domain/7/cpu/{i}/availability"] for i in range(2)] == ["online", "online"]
