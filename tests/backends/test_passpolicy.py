"""PassPolicy: a backend worker's scheduling policy follows the requests its passes find."""
from __future__ import annotations

import os
import threading

from xenkvm.backends.xenbus import WORKER_NICE_BOOST, PassPolicy, _set_policy, raise_priority


def test_queue_depth_one_stays_other_a_stream_goes_batch_and_back():
    applied: list[bool] = []
    pol = PassPolicy(apply=applied.append)
    for _ in range(50):
        pol.after_pass(1)                     # QD1: one request a pass, the kick's own
    assert applied == [] and not pol.batch
    pol.after_pass(4)                         # requests streaming in: several a pass
    assert pol.batch and applied == [True]
    for _ in range(3):
        pol.after_pass(3)
    assert applied == [True]                  # no flapping while it streams
    while pol.batch:
        pol.after_pass(1)                     # back to one a pass
    assert applied == [True, False] and pol.switches == 2 and pol.average < PassPolicy.OTHER_BELOW


def test_empty_passes_count_toward_other():
    pol = PassPolicy(apply=lambda _b: None)
    pol.after_pass(8)
    assert pol.batch
    for _ in range(6):
        pol.after_pass(0)                     # spurious kicks: nothing found
    assert not pol.batch


def test_the_policy_is_the_calling_threads_own():
    seen = {}

    def worker():
        _set_policy(True)
        seen["worker"] = os.sched_getscheduler(0)
        _set_policy(False)
        seen["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"worker": os.SCHED_BATCH, "after": os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER        # this thread untouched


def test_a_worker_is_nicer_than_the_vmm_by_the_boost_its_own_thread_only():
    """raise_priority: the calling thread WORKER_NICE_BOOST below the process's nice (where
    CAP_SYS_NICE allows; refused, nothing changes and nothing is raised); a boost of 0 nothing."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def worker():
        raise_priority(WORKER_NICE_BOOST)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def plain():
        raise_priority(0)
        seen["plain"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for fn in (worker, plain):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen["plain"] == base
    allowed = os.geteuid() == 0
    assert seen["worker"] == (max(-20, base - WORKER_NICE_BOOST) if allowed else base)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base   # this thread untouched
