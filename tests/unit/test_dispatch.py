"""The hypercall dispatcher's bookkeeping against a guest that makes up hypercall numbers and sub-ops."""
from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from xenkvm.xen.abi import Errno, Hypercall
from xenkvm.xen.dispatch import MASK64, MAX_UNKNOWN_LOGGED, UNKNOWN, Dispatcher, op_name


def dispatcher() -> Dispatcher:
    domain = SimpleNamespace(vcpus=[SimpleNamespace(up=False)], lock=threading.RLock(), mem=None)
    d = Dispatcher(domain)
    domain.dispatcher = d
    d.register_subop(Hypercall.event_channel_op, 4, lambda call, arg: 0)
    d.register(Hypercall.xen_version, lambda call: 7)
    return d


def test_made_up_numbers_and_sub_ops_share_one_bucket(caplog):
    """Every unknown hypercall number or sub-op is counted under UNKNOWN: a guest trying 10 000 of each
    does not grow ``stats``, ``ops`` or the log (before: one entry, and one log line, per value)."""
    d, vcpu = dispatcher(), SimpleNamespace(id=0)
    with caplog.at_level(logging.WARNING, logger="xenkvm.xen.dispatch"):
        for i in range(10_000):
            assert d.dispatch(vcpu, 1000 + i, (0,) * 6) == -Errno.ENOSYS & MASK64
            assert d.dispatch(vcpu, int(Hypercall.event_channel_op), (100 + i,) + (0,) * 5) == -Errno.ENOSYS & MASK64
        assert d.dispatch(vcpu, int(Hypercall.event_channel_op), (4,) + (0,) * 5) == 0
        assert d.dispatch(vcpu, int(Hypercall.xen_version), (0,) * 6) == 7
    evtchn, xenver = int(Hypercall.event_channel_op), int(Hypercall.xen_version)
    assert dict(d.ops) == {(UNKNOWN, None): 10_000, (evtchn, UNKNOWN): 10_000, (evtchn, 4): 1, (xenver, None): 1}
    assert set(d.stats) == {UNKNOWN, evtchn, xenver} and d.stats[UNKNOWN].count == 10_000
    assert len(d._unknown_seen) <= MAX_UNKNOWN_LOGGED + 1
    assert len(caplog.records) == MAX_UNKNOWN_LOGGED + 1
    assert op_name(evtchn, UNKNOWN) == "event_channel_op/unknown" and op_name(evtchn, 4) == "event_channel_op/4"
