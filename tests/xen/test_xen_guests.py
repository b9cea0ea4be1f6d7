"""The freestanding Xen test guests (guests/xen_*.c) under the Xen personality, end to end.

Each guests/xen_*.yaml is run as ``python -m xenkvm run`` (a subprocess, from
the repository root); the guest prints PASS/FAIL lines and a SUMMARY, then
powers off.  On top of "exit 0, no FAIL, N > 0 passed", some guests get
host-side checks: console output that only the Xen console paths carry, and
for xenstore, the host reading the key the guest wrote through the
embedded xenstored's socket (``XENSTORED_PATH``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
TIMEOUT = 120
YAMLS = sorted(p.name for p in GUESTS.glob("xen_*.yaml"))
SUMMARY = re.compile(r"^SUMMARY: (\d+) passed, (\d+) failed$", re.M)


@pytest.fixture(scope="session")
def built_guests() -> Path:
    subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True)
    return GUESTS


def run_guest(yaml: str, *extra: str, env: dict | None = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xenkvm", "run", f"guests/{yaml}", *extra], cwd=ROOT,
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_passed(r: subprocess.CompletedProcess) -> int:
    out = r.stdout
    context = f"\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{r.stderr[-3000:]}"
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not fails, "guest failures:\n" + "\n".join(fails) + context
    m = SUMMARY.search(out)
    assert m, "no SUMMARY line" + context
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0, m.group(0) + context
    assert r.returncode == 0, f"exit status {r.returncode}" + context
    return int(m.group(1))


@pytest.fixture
def xs_socket(tmp_path) -> dict:
    """A private xenstored socket path, so parallel runs and a host xenstored do not collide."""
    return {"XENSTORED_PATH": str(tmp_path / "xenstored.sock")}


def test_every_guest_has_a_yaml_pair():
    sources = {p.stem for p in GUESTS.glob("xen_*.c")}
    assert sources >= {"xen_version", "xen_shinfo", "xen_evtchn", "xen_gnttab", "xen_console",
                       "xen_xenstore", "xen_hostile", "xen_shutdown", "xen_hvm_platform", "xen_userpriv"}
    for s in sources:
        assert f"{s}.yaml" in YAMLS and f"{s}_direct.yaml" in YAMLS, s


@pytest.mark.parametrize("yaml", YAMLS)
def test_xen_guest(built_guests, yaml, xs_socket):
    r = run_guest(yaml, env=xs_socket)
    assert_passed(r)
    direct = "direct" in yaml
    assert ("trap: direct" in r.stdout) == direct, r.stdout[:600]


@pytest.mark.parametrize("yaml", [y for y in YAMLS if y.endswith("_direct.yaml")])
def test_direct_guest_with_patch_trap(built_guests, yaml, xs_socket):
    """The _direct guests (xen_hypercall_intel/_amd, breakpoint trap in their yaml) with their
    vmcall/vmmcall rewritten into port exits instead."""
    r = subprocess.run([sys.executable, "-m", "xenkvm", "-v", "run", f"guests/{yaml}", "--hypercall-trap", "patch"],
                       cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=TIMEOUT,
                       env={**os.environ, **xs_socket})
    assert_passed(r)
    assert "trap: direct" in r.stdout
    assert "hypercall traps: patch\n" in r.stderr and "breakpoint" not in r.stderr


@pytest.mark.parametrize("yaml", ["xen_console.yaml", "xen_console_direct.yaml"])
def test_console_markers_reach_the_host(built_guests, yaml, xs_socket):
    r = run_guest(yaml, env=xs_socket)
    assert_passed(r)
    # written only through the console ring / console_io, never the UART (the ring's
    # output comes from the VMM's I/O thread, so it is not line-synchronised with the UART)
    assert "XENKVM-CONSOLE-RING-OK written through the console ring\n" in r.stdout, r.stdout
    assert "XENKVM-CONSOLE-RING-OK-AFTER-WRAP\n" in r.stdout, r.stdout
    assert "XENKVM-CONSOLE-IO-OK written with console_io" in r.stdout
    assert r.stdout.count("ring-bulk:") == 1


def test_hostile_is_reproducible_and_alive(built_guests, xs_socket):
    r = run_guest("xen_hostile.yaml", "--cmdline", "xk.trap=page xk.seed=99 xk.calls=500", env=xs_socket)
    assert_passed(r)
    assert "seed 99, 500 random calls" in r.stdout
    assert "XENKVM-HOSTILE-ALIVE" in r.stdout
    again = run_guest("xen_hostile.yaml", "--cmdline", "xk.trap=page xk.seed=99 xk.calls=500", env=xs_socket)
    tally = [line for line in r.stdout.splitlines() if line.startswith(("sweep:", "random:"))]
    assert tally and tally == [line for line in again.stdout.splitlines() if line.startswith(("sweep:", "random:"))]


def test_xenstore_key_visible_to_host(built_guests, xs_socket):
    """The guest writes data/host-check; the host reads it over the xenstored socket and acks."""
    client_mod = pytest.importorskip("xenkvm.xenstore.client")
    marker = f"m{os.getpid()}x{int(time.time()) % 100000}"
    proc = subprocess.Popen([sys.executable, "-m", "xenkvm", "run", "guests/xen_xenstore.yaml", "--cmdline",
                             f"xk.trap=page xk.xs_marker={marker} xk.xs_host_ack"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            env={**os.environ, **xs_socket})
    out: list[str] = []
    waiting = threading.Event()

    def reader():
        for line in proc.stdout:
            out.append(line)
            if line.startswith("XS-WAITING-FOR-HOST"):
                waiting.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + TIMEOUT / 2
        while not waiting.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
            pass
        if not waiting.is_set():
            proc.kill()
            t.join(5)
            pytest.fail("guest never reached the host check:\n" + "".join(out) + proc.stderr.read())
        sock = xs_socket["XENSTORED_PATH"]
        if not os.path.exists(sock):
            proc.kill()
            pytest.skip(f"the VMM exposes no xenstored socket at {sock}")
        domid = 1
        with client_mod.XsClient(sock) as c:
            value = c.read(f"/local/domain/{domid}/data/host-check")
            assert value == marker.encode()
            c.write(f"/local/domain/{domid}/data/host-ack", marker)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        t.join(5)
    stderr = proc.stderr.read()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), stderr)
    assert_passed(r)
    assert "PASS xs.host_ack" in r.stdout
