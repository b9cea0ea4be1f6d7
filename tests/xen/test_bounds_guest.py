"""guests/xen_bounds.c in this process: the guest asks for far too much, and the host checks
what that cost it (memslots, memory regions, I/O-loop timers) stayed bounded all along."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from xenkvm.config import load_config
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.ioloop import COMPACT_MIN
from xenkvm.build import build_machine
from xenkvm.machine.machine import ExitStatus, Machine
from xenkvm.xen.limits import DEFAULT_MAX_GRANT_FRAMES
from guestbuild import build_guests

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 8


@pytest.fixture(scope="module")
def built() -> None:
    build_guests()


class Peaks:
    """Records the most memory regions (one memslot each) and I/O-loop timer entries the
    machine ever held."""

    def __init__(self, m: Machine):
        self.regions = self.timers = 0
        vm, io = m.vm, m.io
        set_region, call_at = vm.set_memory_region, io.call_at

        def memslot(*args, **kw):
            slot = set_region(*args, **kw)
            self.regions = max(self.regions, len(m.mem.regions) + 1)   # the new one is not in yet
            return slot

        def timer(deadline, fn):
            handle = call_at(deadline, fn)
            self.timers = max(self.timers, len(io._timers))
            return handle

        vm.set_memory_region, io.call_at = memslot, timer


def test_guest_asking_too_much_gets_errors_and_the_vmm_stays_bounded(built, tmp_path):
    cfg = load_config(ROOT / "guests" / "xen_bounds.yaml", {"cmdline": f"xk.trap=page xk.rounds={ROUNDS}"})
    cfg = dataclasses.replace(cfg, console="none",
                              xen=dataclasses.replace(cfg.xen, xenstore_socket=str(tmp_path / "xs.sock")))
    sink = ConsoleSink(None)
    m = build_machine(cfg, sink=sink)
    try:
        at_boot = len(m.mem.regions)
        peaks = Peaks(m)
        result = m.run()
        regions = [r.name for r in m.mem.regions if not r.ram]
    finally:
        m.close()
    out = sink.tail().decode(errors="replace")
    assert result.status is ExitStatus.POWEROFF, out
    assert f"over {ROUNDS * 1024} hole gfns" in out, out
    # 8192 + 2000 grant-frame moves onto hole gfns: never more than one memslot per frame (plus
    # one while a frame moves: its new page is backed before the old one goes).
    grant = [n for n in regions if n.startswith("grant")]
    assert peaks.regions <= at_boot + DEFAULT_MAX_GRANT_FRAMES + 1, (at_boot, peaks.regions)
    assert len(grant) <= DEFAULT_MAX_GRANT_FRAMES, len(grant)
    assert m.vm.slots_used == at_boot + len(grant)  # KVM holds exactly the regions GuestMemory has
    # 20000 re-armed timers: cancelled entries are compacted away.
    assert peaks.timers <= 2 * COMPACT_MIN + 16, peaks.timers
    assert not re.search(r"^FAIL", out, re.M) and re.search(r"SUMMARY: \d+ passed, 0 failed", out), out
