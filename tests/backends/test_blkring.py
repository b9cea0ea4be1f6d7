"""What blkring.open_rings accepts from a frontend, and that a refusal releases everything.

The grant table and event channels are recording fakes here; the guest tests
(test_blkfront_guest.py) connect real rings, one and two queues, 1 and 2 pages.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from xenkvm.backends.blkring import MAX_QUEUES, open_rings
from xenkvm.backends.xenbus import ConnectError
from xenkvm.xen.evtchn import EvtchnError
from xenkvm.xen.gnttab import GrantError


class Mapping:
    def __init__(self, log: list, ref: int):
        self.view = memoryview(bytearray(4096))
        self.writable = True
        self.log, self.ref = log, ref

    def unmap(self):
        self.log.append(("unmap", self.ref))


class Domain:
    domid = 1

    def __init__(self, bad_refs=(), bad_ports=()):
        self.log: list = []
        self.direct: dict[int, bool] = {}
        self.gnttab = SimpleNamespace(map_refs=self._map_refs)
        self.evtchn = SimpleNamespace(bind_vmm_to_guest_port=self._bind, close_vmm_port=self._close)
        self.bad_refs, self.bad_ports = set(bad_refs), set(bad_ports)

    def _map_refs(self, domid, refs, writable):
        if self.bad_refs & set(refs):
            raise GrantError(-4, "bad ref")
        self.log += [("map", r) for r in refs]
        return [Mapping(self.log, r) for r in refs]

    def _bind(self, port, fn, *, direct=False):
        if port in self.bad_ports:
            raise EvtchnError("not unbound")
        self.direct[port] = direct
        self.log.append(("bind", port))
        return port

    def _close(self, port):
        self.log.append(("close", port))


def two_queues(**extra):
    return {"multi-queue-num-queues": "2", "queue-0/ring-ref": "8", "queue-0/event-channel": "5",
            "queue-1/ring-page-order": "1", "queue-1/ring-ref0": "9", "queue-1/ring-ref1": "10",
            "queue-1/event-channel": "6", **extra}


def test_two_queues_with_a_two_page_ring():
    d = Domain()
    rings = open_rings(d, two_queues(), lambda: None)
    assert [(r.port, len(r.mappings), r.nr_ents) for r in rings] == [(5, 1, 32), (6, 2, 64)]
    assert d.direct == {5: True, 6: True}    # kicks go to the worker from the guest's own send
    for r in rings:
        r.close(d)
    assert sorted(e for e in d.log if e[0] == "unmap") == [("unmap", 8), ("unmap", 9), ("unmap", 10)]


@pytest.mark.parametrize("keys,why", [
    ({"event-channel": "5"}, "no ring-ref"),
    ({"ring-ref": "x8", "event-channel": "5"}, "ring-ref 'x8' is not a number"),
    ({"ring-ref": "8", "event-channel": "-1"}, "event-channel -1 out of range"),
    ({"ring-page-order": "5", "ring-ref0": "8", "event-channel": "5"}, "ring-page-order 5 out of range"),
    ({"ring-ref": "8", "event-channel": "5", "protocol": "x86_32-abi"}, "not supported"),
    ({"ring-ref": "8", "event-channel": "5", "multi-queue-num-queues": "0"}, "multi-queue-num-queues 0"),
    ({"ring-ref": "8", "event-channel": "5", "multi-queue-num-queues": str(MAX_QUEUES + 1)}, "out of range"),
])
def test_bad_keys(keys, why):
    with pytest.raises(ConnectError, match=why):
        open_rings(Domain(), keys, lambda: None)


@pytest.mark.parametrize("domain,keys,why", [
    (Domain(), two_queues(**{"queue-1/event-channel": "junk"}), "queue-1/event-channel 'junk'"),
    (Domain(bad_refs={9}), two_queues(), r"queue-1/ring-ref \[9, 10\]"),
    (Domain(bad_ports={6}), two_queues(), "queue-1/event-channel 6"),
])
def test_a_bad_second_queue_releases_the_first(domain, keys, why):
    with pytest.raises(ConnectError, match=why):
        open_rings(domain, keys, lambda: None)
    maps = [e for e in domain.log if e[0] == "map"]
    unmaps = [e for e in domain.log if e[0] == "unmap"]
    binds = [e for e in domain.log if e[0] == "bind"]
    closes = [e for e in domain.log if e[0] == "close"]
    assert len(maps) == len(unmaps) and len(binds) == len(closes)
