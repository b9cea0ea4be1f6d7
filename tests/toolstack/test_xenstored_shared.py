"""One xenstore for all managed domains: ``xenkvm create`` introduces each domain to the host's
shared xenstored (started on demand), real guests under /dev/kvm use it through their rings.

guests/managed_neighbour writes data/secret = "secret-of-<domid>" and, for each path the host
writes to its data/probe, prints what reading and writing that path gave it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from xenkvm.toolstack.client import ControlClient
from xenkvm.xenstore.client import XsClient
from xenkvm.xenstore.protocol import XenstoreError, XsError, XsType
from guestbuild import build_guests

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
TIMEOUT = 300


@pytest.fixture(scope="module")
def built_guests() -> Path:
    build_guests()
    return GUESTS


def xenkvm(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", *args], cwd=ROOT, capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT, env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)})


def listing(run_dir: Path) -> dict[str, dict]:
    r = xenkvm(run_dir, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


@pytest.fixture
def run_dir(built_guests):
    run = Path(tempfile.mkdtemp(prefix="xk-xsd-", dir="/tmp"))
    yield run
    for name in listing(run):
        xenkvm(run, "destroy", name)
    assert xenkvm(run, "xenstored", "--shared", "--stop").returncode == 0
    shutil.rmtree(run, ignore_errors=True)


def guest_cfg(run_dir: Path, name: str, extra: str = "") -> Path:
    cfg = run_dir.parent / f"{run_dir.name}-{name}.yaml"
    cfg.write_text(f"name: {name}\nkernel: {GUESTS / 'out' / 'managed_neighbour.elf'}\n"
                   "cmdline: \"xk.trap=page\"\nmemory: 32M\nvcpus: 1\n"
                   "xen:\n  version: \"4.17\"\n  hypercall_trap: auto\n" + extra)
    return cfg


def create_at_once(run_dir: Path, *names: str) -> dict[str, dict]:
    """``xenkvm create`` for each name, all started together; their ``list`` rows."""
    procs = [subprocess.Popen([sys.executable, "-m", "xenkvm", "create", str(guest_cfg(run_dir, n))], cwd=ROOT,
                              env={**os.environ, "XENKVM_RUN_DIR": str(run_dir)}, stderr=subprocess.PIPE,
                              text=True) for n in names]
    for p in procs:
        assert p.wait(TIMEOUT) == 0, p.stderr.read()
    rows = listing(run_dir)
    return {n: rows[n] for n in names}


class Console:
    """A domain's console over the control API: collects output, finds lines in it."""

    def __init__(self, run_dir: Path, name: str):
        self.client = ControlClient(str(run_dir / name / "control.sock"), timeout=TIMEOUT)
        self.out = bytearray(self.client.attach_console())

    def read_until(self, pattern: bytes, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while (m := re.compile(pattern, re.M).search(self.out)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.out[-2000:].decode(errors='replace')}"
            self.client.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.client.sock.recv(65536)
            assert chunk, f"console closed before {pattern!r}"
            self.out += chunk
        return m

    def close(self) -> None:
        self.client.close()


def store(run_dir: Path) -> XsClient:
    return XsClient(str(run_dir / ".xenstored" / "socket"), timeout=30)


def probe(xs: XsClient, con: Console, domid: int, target: str) -> tuple[str, str]:
    """Have guest ``domid`` read and write ``target``; what each gave it."""
    xs.write(f"/local/domain/{domid}/data/probe", target)
    read = con.read_until(rb"^PROBE " + re.escape(target.encode()) + rb" READ (.*?)\r?\n").group(1).decode()
    write = con.read_until(rb"^PROBE " + re.escape(target.encode()) + rb" WRITE (.*?)\r?\n").group(1).decode()
    con.out.clear()
    return read.strip(), write.strip()


def test_two_domains_share_the_store_and_stay_apart(run_dir):
    rows = create_at_once(run_dir, "left", "right")
    assert sorted(r["domid"] for r in rows.values()) == [1, 2]
    assert all(r["state"] == "running" for r in rows.values())
    cons = {name: Console(run_dir, name) for name in rows}
    for name, con in cons.items():
        con.read_until(rb"^NEIGHBOUR-UP %d\r?\n" % rows[name]["domid"])
    left, right = rows["left"]["domid"], rows["right"]["domid"]
    with store(run_dir) as xs:
        assert xs.read(f"/local/domain/{left}/name") == b"left"
        assert xs.read(f"/local/domain/{left}/data/secret") == f"secret-of-{left}".encode()
        assert xs.read(f"/local/domain/{right}/data/secret") == f"secret-of-{right}".encode()
        mine = f"/local/domain/{left}/data/secret"
        assert probe(xs, cons["left"], left, mine)[0] == f"OK secret-of-{left}"
        for me, other in ((left, right), (right, left)):
            con = cons["left" if me == left else "right"]
            assert probe(xs, con, me, f"/local/domain/{other}/data/secret") == ("EACCES", "EACCES")
            assert probe(xs, con, me, f"/local/domain/{other}/name") == ("EACCES", "EACCES")
        assert xs.read(f"/local/domain/{right}/data/secret") == f"secret-of-{right}".encode()
    for con in cons.values():
        con.close()
    assert len(list((run_dir / ".xenstored").glob("*.pid"))) == 1     # one daemon for both


def _released(xs: XsClient, domid: int) -> None:
    assert xs.wait_event() == ("@releaseDomain", "rel")
    with pytest.raises(XenstoreError) as e:
        xs.read(f"/local/domain/{domid}/name")
    assert e.value.err == XsError.ENOENT
    assert xs.call(XsType.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode()) == b"F\0"


def test_destroy_and_kill_release_the_domain_and_free_its_domid(run_dir):
    rows = create_at_once(run_dir, "first", "second")
    first, second = rows["first"], rows["second"]
    with store(run_dir) as xs:
        xs.watch("@releaseDomain", "rel")
        assert xs.wait_event() == ("@releaseDomain", "rel")
        assert xenkvm(run_dir, "destroy", "first").returncode == 0
        _released(xs, first["domid"])
        assert xs.read(f"/local/domain/{second['domid']}/name") == b"second"
        os.kill(second["pid"], signal.SIGKILL)                     # a crashed VMM
        _released(xs, second["domid"])
        assert xs.call(XsType.CONTROL, b"check\0") == b"OK\0"
        assert listing(run_dir)["second"]["state"] == "crashed"
        again = create_at_once(run_dir, "third", "fourth")         # both domids are free again
        assert sorted(r["domid"] for r in again.values()) == [1, 2]
        con = Console(run_dir, "fourth")
        con.read_until(rb"^NEIGHBOUR-UP %d\r?\n" % again["fourth"]["domid"])
        con.close()
        assert xs.read(f"/local/domain/{again['third']['domid']}/name") == b"third"


def test_backends_serve_disks_through_the_shared_store(run_dir):
    """The VMM is the dom0 side of its backends: blkback's xenbus handshake over the shared store."""
    r = xenkvm(run_dir, "create", "-F", str(GUESTS / "xen_blkfront.yaml"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^SUMMARY: [1-9]\d* passed, 0 failed", r.stdout, re.M), r.stdout[-3000:]
    log = (run_dir / ".xenstored" / "xenstored.log").read_text()
    assert "dom1 (xen-blkfront) introduced" in log and "dom1 released" in log


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun for the vif's tap")
def test_netback_through_the_shared_store(run_dir):
    """netback's xenbus handshake (and its rings) for a domain on the shared store."""
    cfg = run_dir.parent / f"{run_dir.name}-net.yaml"
    cfg.write_text(f"name: xsd-netfront\nkernel: {GUESTS / 'out' / 'xen_netfront.elf'}\n"
                   "cmdline: \"xk.trap=page xk.net_selftest\"\nmemory: 64M\nvcpus: 1\n"
                   "xen:\n  version: \"4.17\"\n  hypercall_trap: auto\n"
                   "vifs:\n  - \"mac=00:16:3e:0a:0b:0d, vifname=xkxsd0\"\n")
    r = xenkvm(run_dir, "create", "-F", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^SUMMARY: [1-9]\d* passed, 0 failed", r.stdout, re.M), r.stdout[-3000:]
    assert "dom1 (xsd-netfront) introduced" in (run_dir / ".xenstored" / "xenstored.log").read_text()


def test_embedded_store_on_request(run_dir):
    """``create --xenstore embedded``: the domain's own xenstored, no shared daemon."""
    r = xenkvm(run_dir, "create", "--xenstore", "embedded", str(guest_cfg(run_dir, "alone")))
    assert r.returncode == 0, r.stderr
    con = Console(run_dir, "alone")
    con.read_until(rb"^NEIGHBOUR-UP 1\r?\n")
    con.close()
    assert not (run_dir / ".xenstored").exists()
    with XsClient(str(run_dir / "alone" / "xenstore.sock"), timeout=30) as xs:
        assert xs.read("/local/domain/1/data/secret") == b"secret-of-1"


def test_vcpu_set_toggles_cpu_availability(run_dir):
    """``vcpu-set``: maxvcpus vCPUs exist, cpu/N/availability says which the guest should use."""
    r = xenkvm(run_dir, "create", str(guest_cfg(run_dir, "hot", "maxvcpus: 3\n")))
    assert r.returncode == 0, r.stderr
    con = Console(run_dir, "hot")
    con.read_until(rb"^NEIGHBOUR-UP 1\r?\n")
    row = listing(run_dir)["hot"]
    assert (row["vcpus"], row["maxvcpus"]) == (1, 3)
    with store(run_dir) as xs:
        assert [xs.read(f"/local/domain/1/cpu/{i}/availability") for i in range(3)] == \
            [b"online", b"offline", b"offline"]
    assert xenkvm(run_dir, "vcpu-set", "hot", "3").returncode == 0
    con.read_until(rb"^VCPU cpu/1/availability online\r?\n")
    con.read_until(rb"^VCPU cpu/2/availability online\r?\n")
    assert listing(run_dir)["hot"]["vcpus"] == 3
    con.out.clear()
    assert xenkvm(run_dir, "vcpu-set", "hot", "2").returncode == 0
    con.read_until(rb"^VCPU cpu/2/availability offline\r?\n")
    for bad in ("4", "0"):
        r = xenkvm(run_dir, "vcpu-set", "hot", bad)
        assert r.returncode == 1 and "count: expected 1 to 3" in r.stderr, r.stderr
    assert listing(run_dir)["hot"]["vcpus"] == 2
    con.close()
