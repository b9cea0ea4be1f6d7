"""The port table (xen/evtchn/ports.py) on its own: allocation, limits, VIRQ slots, save-state."""
from __future__ import annotations

import json

import pytest

from xenkvm.xen.abi import Errno, EvtchnStat, lib
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.evtchn.ports import Port, PortState, PortTable, virq_key

NEVER_BUSY = lambda port: False  # noqa: E731


def alloc(t: PortTable, n: int = 1, abi: int = 4096, busy=NEVER_BUSY) -> list[int]:
    return [t.alloc(PortState.UNBOUND, 0, abi, busy).port for _ in range(n)]


def test_states_are_the_abis_numbers():
    """EVTCHNSTAT_* as the guest reads them (no pirq: we have no physical IRQs to bind)."""
    assert {s.name.lower(): int(s) for s in PortState} == {s.name: int(s) for s in EvtchnStat if s.name != "pirq"}


def test_lowest_free_port_first_and_port_0_reserved():
    t = PortTable(max_port=100)
    assert alloc(t, 3) == [1, 2, 3]
    t.free(t.get(2))
    assert alloc(t, 2) == [2, 4]
    assert 0 not in t and len(t) == 4


def test_limit_is_the_domains_max_within_the_abis_count():
    t = PortTable(max_port=5)
    assert t.limit(4096) == 6 and t.limit(4) == 4
    assert alloc(t, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(HypercallError) as e:
        alloc(t)
    assert e.value.errno == Errno.ENOSPC
    small = PortTable(max_port=100)
    alloc(small, 3, abi=4)
    with pytest.raises(HypercallError):
        alloc(small, abi=4)


def test_busy_ports_are_skipped_and_taken_once_free():
    """A free FIFO port whose word is still LINKED is not reused (event_fifo.c)."""
    t = PortTable(max_port=100)
    alloc(t, 4)
    for port in (2, 3):
        t.free(t.get(port))
    busy = {2}
    assert alloc(t, busy=busy.__contains__) == [3]
    busy.clear()
    assert alloc(t, busy=busy.__contains__) == [2]     # the hint stayed at the busy port


def test_virq_bindings_follow_the_port():
    t = PortTable(max_port=100)
    timer = t.alloc(PortState.VIRQ, 1, 4096, NEVER_BUSY)
    t.bind_virq(timer, lib.VIRQ_TIMER)
    console = t.alloc(PortState.VIRQ, 0, 4096, NEVER_BUSY)
    t.bind_virq(console, lib.VIRQ_CONSOLE)
    assert t.virq_port(lib.VIRQ_TIMER, 1) is timer and t.virq_port(lib.VIRQ_TIMER, 0) is None
    # A global VIRQ lives on vCPU 0 whichever vCPU asks.
    assert virq_key(lib.VIRQ_CONSOLE, 3) == (0, lib.VIRQ_CONSOLE)
    assert t.virq_port(lib.VIRQ_CONSOLE, 3) is console
    t.free(timer)
    assert t.virq_port(lib.VIRQ_TIMER, 1) is None and t.virqs == {(0, lib.VIRQ_CONSOLE): console.port}


def test_port_state_round_trips_through_json():
    p = Port(7, PortState.INTERDOMAIN, vcpu=1, remote_dom=1, remote_port=9, priority=3,
             saved_pending=True, last_vcpu=1, last_prio=3)
    q = Port.from_state(json.loads(json.dumps(p.to_state())))
    assert q.to_state() == p.to_state() and q.state is PortState.INTERDOMAIN
    t = PortTable(max_port=100)
    v = Port(4, PortState.VIRQ, vcpu=0, virq=lib.VIRQ_CONSOLE)
    t.insert(v)
    assert t.virq_port(lib.VIRQ_CONSOLE, 0) is v
    t.clear()
    assert len(t) == 0 and t.virqs == {} and alloc(t) == [1]
