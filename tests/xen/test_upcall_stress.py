"""guests/xen_upcall_stress.c: two vCPUs, IPIs, VMM notifies and timers, no delivery lost.

The guest counts every delivery and reports PASS/FAIL itself; here the host
also reads its closing ``stress:`` line and checks the counts: each stream
delivered exactly what was sent, the lockstep streams once per round.  The
global callback vector is the mode under test (the VMM EOIs it for the guest,
xenkvm/xen/upcall.py); x2APIC adds raw LAPIC IPIs on 16 vectors that race
that EOI.  The deterministic race checks are in test_upcall_eoi.py.
"""
from __future__ import annotations

import re

import pytest

from test_xen_guests import assert_passed, built_guests, run_guest  # noqa: F401 (fixture)

pytestmark = pytest.mark.kvm

LINE = re.compile(r"^stress: mode (\w+)/(\w+) rounds (\d+) \| (.*)$", re.M)
COUNT = re.compile(r"(\w+)=(\d+)/(\d+)")


def parse(out: str) -> tuple[str, str, int, list[dict[str, tuple[int, int]]]]:
    m = LINE.search(out)
    assert m, "no stress: line\n" + out[-3000:]
    cpus = [{k: (int(g), int(s)) for k, g, s in COUNT.findall(part)} for part in m.group(4).split(" | ")]
    return m.group(1), m.group(2), int(m.group(3)), cpus


@pytest.mark.parametrize("yaml, apic", [("xen_upcall_stress.yaml", "x2apic"),
                                        pytest.param("xen_upcall_stress_direct.yaml", "xapic",
                                                     marks=pytest.mark.breakpoint)])
def test_every_delivery_arrives_with_the_global_vector(built_guests, yaml, apic, tmp_path):
    r = run_guest(yaml, env={"XENSTORED_PATH": str(tmp_path / "xs.sock")})
    assert_passed(r)
    mode, got_apic, rounds, cpus = parse(r.stdout)
    assert (mode, got_apic) == ("global", apic) and rounds > 0 and len(cpus) == 2
    for counts in cpus:
        for stream in ("xen_ipi", "vmm_notify"):
            assert counts[stream] == (rounds, rounds), (stream, counts)
        got, sent = counts["lapic_ipi"]
        assert got == sent and (sent > 0) == (apic == "x2apic"), counts
