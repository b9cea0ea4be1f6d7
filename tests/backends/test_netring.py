"""What netring.open_queues accepts from a frontend, and that a refusal releases everything.

The grant table and event channels are the recording fakes of test_blkring.py;
the guest tests (test_netfront_guest.py) connect real rings: one queue on one
channel, two queues on split channels.
"""
from __future__ import annotations

import pytest
from test_blkring import Domain

from xenkvm.backends.netring import open_queues
from xenkvm.backends.xenbus import ConnectError

BASE = {"request-rx-copy": "1", "feature-rx-notify": "1"}


def noop(_q):
    pass


def test_one_queue_one_channel_and_features():
    d = Domain()
    f, qs = open_queues(d, {**BASE, "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "feature-sg": "1",
                            "feature-gso-tcpv4": "1", "feature-no-csum-offload": "1"}, noop, noop, 4)
    assert len(qs) == 1 and (qs[0].tx_port, qs[0].rx_port) == (5, 5)
    assert f.sg and f.gso_tcpv4 and not f.gso_tcpv6 and not f.csum
    assert d.log == [("map", 8), ("map", 9), ("bind", 5)]
    qs[0].close(d)
    assert d.log[-3:] == [("close", 5), ("unmap", 8), ("unmap", 9)]


def test_gso_needs_sg():
    f, _ = open_queues(Domain(), {**BASE, "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5",
                                  "feature-gso-tcpv4": "1"}, noop, noop, 4)
    assert not f.gso_tcpv4


def test_offload_off_withdraws_gso_and_ipv6_csum():
    """A vif with ``offload=off`` offered none: the frontend's keys for them do not count."""
    keys = {**BASE, "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "feature-sg": "1",
            "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1"}
    on, _ = open_queues(Domain(), keys, noop, noop, 4)
    off, _ = open_queues(Domain(), keys, noop, noop, 4, offload=False)
    assert on.gso_tcpv4 and on.gso_tcpv6 and on.ipv6_csum
    assert off.sg and off.csum and not (off.gso_tcpv4 or off.gso_tcpv6 or off.ipv6_csum)


def test_two_queues_split_channels_and_callbacks():
    d, seen = Domain(), []
    bound = {}
    d.evtchn.bind_vmm_to_guest_port = lambda port, fn, direct=False: bound.setdefault(port, (fn, direct))
    keys = {**BASE, "multi-queue-num-queues": "2"}
    for q in range(2):
        keys.update({f"queue-{q}/tx-ring-ref": str(10 + q), f"queue-{q}/rx-ring-ref": str(20 + q),
                     f"queue-{q}/event-channel-tx": str(30 + q), f"queue-{q}/event-channel-rx": str(40 + q)})
    _f, qs = open_queues(d, keys, lambda q: seen.append(("tx", q)), lambda q: seen.append(("rx", q)), 4)
    assert [(q.tx_port, q.rx_port) for q in qs] == [(30, 40), (31, 41)]
    bound[31][0]()
    bound[40][0]()
    assert seen == [("tx", 1), ("rx", 0)]
    assert all(direct for _fn, direct in bound.values())   # kicks go to the threads from the guest's own send


@pytest.mark.parametrize("keys,needle", [
    ({"feature-rx-notify": "1"}, "request-rx-copy"),
    ({"request-rx-copy": "1"}, "feature-rx-notify is mandatory"),
    ({**BASE, "rx-ring-ref": "9", "event-channel": "5"}, "no tx-ring-ref"),
    ({**BASE, "tx-ring-ref": "x", "rx-ring-ref": "9", "event-channel": "5"}, "tx-ring-ref 'x' is not a number"),
    ({**BASE, "multi-queue-num-queues": "5"}, "multi-queue-num-queues 5 out of range"),
    ({**BASE, "multi-queue-num-queues": "0"}, "multi-queue-num-queues 0"),
    ({**BASE, "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel-tx": "5", "event-channel-rx": "5"},
     "are the same port"),
    ({**BASE, "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel-tx": "5"}, "no event-channel-rx"),
])
def test_refusals_are_one_line(keys, needle):
    with pytest.raises(ConnectError, match=needle):
        open_queues(Domain(), keys, noop, noop, 4)


def test_a_bad_second_queue_releases_the_first():
    d = Domain(bad_ports={41})
    keys = {**BASE, "multi-queue-num-queues": "2"}
    for q in range(2):
        keys.update({f"queue-{q}/tx-ring-ref": str(10 + q), f"queue-{q}/rx-ring-ref": str(20 + q),
                     f"queue-{q}/event-channel-tx": str(30 + q), f"queue-{q}/event-channel-rx": str(40 + q)})
    with pytest.raises(ConnectError, match="queue-1/event channel 41"):
        open_queues(d, keys, noop, noop, 4)
    closes = {e for e in d.log if e[0] in ("close", "unmap")}
    assert {("close", 30), ("close", 40), ("close", 31), ("unmap", 10), ("unmap", 20), ("unmap", 11),
            ("unmap", 21)} <= closes
