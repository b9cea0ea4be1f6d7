"""Hot-plug and hot-unplug through ``domain.devices`` (xenkvm/backends/devices.py).

One test drives a running blkfront guest (guests/xen_blkfront.c,
``xk.blk_hotplug``) in process: the guest boots with xvda, the host attaches
xvdb once the guest says it is ready, the guest connects and reads it, then
the host unplugs it and the guest sees Closing, closes, and both nodes go.
The others use a built, not running, domain.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from xenkvm.backends import DeviceError, XenbusState
from xenkvm.config import GuestConfig, XenConfig
from xenkvm.diskspec import parse_disk
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.build import build_machine, xen_domain
from xenkvm.machine.machine import ExitStatus, Machine
from guestbuild import build_guests

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests"
SECTORS = 8192


def pattern(sector: int, count: int, seed: int) -> bytes:
    return b"".join(bytes((s * 31 + i * 7 + seed) % 256 for i in range(512)) for s in range(sector, sector + count))


@pytest.fixture(scope="module")
def kernel() -> Path:
    build_guests()
    return GUESTS / "out" / "xen_blkfront.elf"


def machine(kernel: Path, tmp_path: Path, cmdline: str = "xk.trap=page") -> tuple[Machine, list[bytes], Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(SECTORS * 512))
    b.write_bytes(pattern(0, SECTORS, 2))
    cfg = GuestConfig(name="hotplug", kernel=kernel, cmdline=cmdline, memory=64 << 20, vcpus=1, console="none",
                      xen=XenConfig(), disks=(parse_disk(f"vdev=xvda, target={a}", tmp_path),))
    out: list[bytes] = []
    sink = ConsoleSink(None)
    sink.add_listener(out.append)
    return build_machine(cfg, sink=sink), out, a, b


def wait_for(cond, bound: float = 120.0) -> bool:
    end = time.monotonic() + bound
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.kvm
def test_hotplug_and_unplug_while_the_guest_runs(kernel, tmp_path):
    m, out, a, b = machine(kernel, tmp_path, "xk.trap=page xk.blk_hotplug")
    core = xen_domain(m).store.core
    flag = "/local/domain/1/data/blk-hotplug"
    steps: list[str] = []

    def host(machine: Machine) -> None:
        if not wait_for(lambda: core.read_path(flag) == b"ready"):
            return machine.stop(ExitStatus.VMM_ERROR, "guest never ready")
        xen_domain(machine).devices.attach(parse_disk(f"vdev=xvdb, access=rw, target={b}", tmp_path))
        steps.append("attached")
        if not wait_for(lambda: core.read_path(flag) == b"connected"):
            return machine.stop(ExitStatus.VMM_ERROR, "guest never connected xvdb")
        gone = xen_domain(machine).devices.detach("xvdb")
        steps.append("removed" if gone.wait(60) else "not removed")

    try:
        result = m.run(lambda mm: threading.Thread(target=host, args=(mm,), daemon=True).start())
    finally:
        m.close()
    text = b"".join(out).decode(errors="replace")
    assert result.status is ExitStatus.POWEROFF, f"{result.message}\n{text[-3000:]}"
    assert not re.findall(r"^FAIL.*$", text, re.M), text[-3000:]
    for name in ("hotplug.read", "hotplug.unplug_requested", "hotplug.offline", "hotplug.frontend_node_removed",
                 "hotplug.backend_node_removed", "hotplug.grants_unmapped", "hotplug.evtchn_closed",
                 "blk.xvda_after_unplug.read_back"):
        assert f"PASS {name}" in text, text[-3000:]
    assert steps == ["attached", "removed"]
    assert ("vbd", 51728) not in {k for k, v in xen_domain(m).devices.backends.items() if not v.removed.is_set()}


@pytest.fixture
def built(kernel, tmp_path):
    m, _out, a, b = machine(kernel, tmp_path)
    m.io.start()
    yield m, a, b
    xen_domain(m).devices.close(timeout=10)
    m.close()


@pytest.mark.kvm
def test_configured_disk_is_attached_at_build(built):
    m, a, _b = built
    core = xen_domain(m).store.core
    assert core.read_path("/local/domain/0/backend/vbd/1/51712/state") == str(int(XenbusState.INIT_WAIT)).encode()
    assert core.read_path("/local/domain/0/backend/vbd/1/51712/sectors") == str(SECTORS).encode()
    assert core.read_path("/local/domain/1/device/vbd/51712/state") == b"1"


@pytest.mark.kvm
def test_attach_detach_errors_are_one_line(built, tmp_path):
    m, a, b = built
    devices = xen_domain(m).devices
    with pytest.raises(DeviceError, match="already attached"):
        devices.attach(parse_disk(f"vdev=xvda, target={b}", tmp_path))
    with pytest.raises(DeviceError, match="no vbd xvdc attached"):
        devices.detach("xvdc")
    with pytest.raises(DeviceError, match="not a device name"):
        devices.detach("floppy")
    spec = parse_disk(f"vdev=xvdb, target={b}", tmp_path)
    b.unlink()
    with pytest.raises(DeviceError, match="disk xvdb: .*No such file"):
        devices.attach(spec)
    assert devices.detach("xvda").wait(10)          # never connected: removed at once
    assert xen_domain(m).store.core.read_path("/local/domain/0/backend/vbd/1/51712") is None
    assert devices.attach(parse_disk(f"vdev=xvda, target={a}", tmp_path)).state == XenbusState.INIT_WAIT


@pytest.mark.kvm
def test_grant_copy_variant_serves_the_blkfront_guest(kernel, tmp_path):
    """The grant-copy I/O path (measured against mapping in bench_blkback) passes the same guest checks."""
    m, out, a, b = machine(kernel, tmp_path)
    xen_domain(m).devices.attach(parse_disk(f"{b},raw,xvdb,ro", tmp_path))
    for vdev in ("xvda", "xvdb"):
        xen_domain(m).devices.find(vdev).device.grant_copy = True
    try:
        result = m.run()
    finally:
        m.close()
    text = b"".join(out).decode(errors="replace")
    assert result.status is ExitStatus.POWEROFF, f"{result.message}\n{text[-3000:]}"
    assert not re.findall(r"^FAIL.*$", text, re.M), text[-3000:]
    assert "PASS blk.xvda.read_back" in text and "PASS blk.indirect_rw" in text and "PASS blk.ro.read" in text
    with open(a, "rb") as f:
        f.seek(8 * 512)
        assert f.read(96 * 512) == pattern(8, 96, 1)
