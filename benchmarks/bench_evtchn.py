"""Event channels: delivery latency and the EVTCHNOP_send hypercall path, beside same-run baselines.

No guest runs: a real Dispatcher, EventChannels and GuestMemory with the small
fake domain of tests/xen/test_evtchn.py (its upcall recorder stands in for the
interrupt injection, which the Xen layer's lead measures separately).

Rows (each the median of several timed batches, ns per operation):

* baseline: dispatch of an unknown hypercall (-ENOSYS): the dispatcher's floor;
* baseline: event_channel_op with a registered no-op sub-op (+ Call, GuestVirtual,
  big lock, sub-op table), and a no-op that also reads its u32 argument: the
  same path as EVTCHNOP_send minus the event-channel work;
* EVTCHNOP_send, port already pending: the hot no-op path;
* EVTCHNOP_send with full delivery (pending, sel, upcall_pending, raise), 2-level
  and FIFO, with the guest's acknowledgement in the loop (its cost is its own row);
* VMM notify(port) -> upcall raised, on the same thread and from the I/O thread;
* guest send on a VMM port -> on_notify running on the I/O thread.

Bounded: about 10 s.

``--cpu``: each row is the *minimum* over 25 batches of the *thread CPU time*
per operation, the figure that survives a loaded machine (medians of wall time
do not); the cross-thread latency rows are left out (CPU time cannot see the
hop).  ``--tree DIR`` measures another checkout's xenkvm with this script (its
cffi modules built), e.g. the tree before a refactor; ``--tsv`` prints
``name<TAB>ns`` lines for ``benchmarks/compare_trees.py``, which runs both
trees interleaved and prints them side by side.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path



def _tree() -> Path:
    """The checkout to measure (``--tree DIR``, else this one): read before its xenkvm is imported."""
    if "--tree" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


ROOT = _tree()
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "xen")]

from evtchnfakes import Caller, FakeDomain  # noqa: E402
from test_evtchn import ARG, ARR, CB, SH_PENDING, SHINFO, VI_SEL  # noqa: E402
import xenkvm  # noqa: E402
from benchlib import min_thread_cpu_ns  # noqa: E402  (this script's folder)
from xenkvm.xen.abi import EvtchnOp, Hypercall, ffi  # noqa: E402

BATCH = 2000
NOOP_SUBOP = 90          #: sub-op numbers Xen does not use, registered only in this benchmark
BATCHES = 7
CPU_BATCHES = 25


def per_op(fn, n=BATCH, batches=BATCHES) -> float:
    """Median ns per call of fn() over timed batches of n calls."""
    fn()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(samples)


def per_op_cpu(fn, n=BATCH, batches=CPU_BATCHES) -> float:
    """Minimum thread-CPU ns per call of fn() over timed batches of n calls (``--cpu``)."""
    return min_thread_cpu_ns(fn, n, batches)


def setup():
    d = FakeDomain()
    disp = d.dispatcher
    caller = Caller(0)
    return d, disp, caller


def bind_ipi(d, disp, caller) -> int:
    obj = ffi.new("struct evtchn_bind_ipi *", {"vcpu": 0})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    assert disp.dispatch(caller, Hypercall.event_channel_op, (EvtchnOp.bind_ipi, ARG, 0, 0, 0, 0)) == 0
    return d.mem.read_u32(ARG + ffi.offsetof("struct evtchn_bind_ipi", "port"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="min-of-batches thread CPU time (loaded machines)")
    ap.add_argument("--tree", metavar="DIR", help="measure this checkout's xenkvm (default: this one)")
    ap.add_argument("--tsv", action="store_true", help="print name<TAB>ns lines only")
    args = ap.parse_args()
    measure = per_op_cpu if args.cpu else per_op
    t_start = time.monotonic()
    rows = _two_level(measure, threaded=not args.cpu) + _fifo(measure)
    if args.tsv:
        print(f"# xenkvm from {Path(xenkvm.__file__).parents[1]}")
        for name, ns in rows:
            print(f"{name}\t{ns:.0f}")
        return 0
    base, same_path = rows[0][1], rows[2][1]
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  {'ns/op':>10}  {'x unknown':>9}  {'x no-op+read':>12}")
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:>10.0f}  {ns / base:>9.2f}  {ns / same_path:>12.2f}")
    print(f"(x unknown: / '{rows[0][0]}'; x no-op+read: / '{rows[2][0]}'; "
          f"{'min thread-CPU' if args.cpu else 'median wall'} time; {time.monotonic() - t_start:.1f} s)")
    return 0


def _two_level(per_op, threaded: bool) -> list[tuple[str, float]]:
    """The baselines and the 2-level rows (``threaded``: also the I/O-thread latencies)."""
    rows: list[tuple[str, float]] = []
    d, disp, caller = setup()
    logging.getLogger("xenkvm").setLevel(logging.ERROR)

    unknown = (0, 0, 0, 0, 0, 0)
    rows.append(("baseline: unknown hypercall (-ENOSYS)", per_op(lambda: disp.dispatch(caller, 9999, unknown))))
    # Same-path baselines: a registered no-op sub-op (dispatcher, sub-op table, big
    # lock, Call and GuestVirtual), and one that also reads its 4-byte argument the
    # way EVTCHNOP_send does; the difference to send is event-channel work.
    disp.register_subop(Hypercall.event_channel_op, NOOP_SUBOP, lambda call, arg: 0)
    disp.register_subop(Hypercall.event_channel_op, NOOP_SUBOP + 1, lambda call, arg: call.guest.read_u32(arg) & 0)
    noop = (NOOP_SUBOP, ARG, 0, 0, 0, 0)
    rows.append(("baseline: event_channel_op, no-op sub-op",
                 per_op(lambda: disp.dispatch(caller, Hypercall.event_channel_op, noop))))
    noop_read = (NOOP_SUBOP + 1, ARG, 0, 0, 0, 0)
    rows.append(("baseline: event_channel_op, no-op reading its u32 arg",
                 per_op(lambda: disp.dispatch(caller, Hypercall.event_channel_op, noop_read))))

    # -- 2-level -------------------------------------------------------------------
    port = bind_ipi(d, disp, caller)
    send_args = (EvtchnOp.send, ARG + 0x100, 0, 0, 0, 0)
    d.mem.write_u32(ARG + 0x100, port)
    nr = Hypercall.event_channel_op

    def send():
        disp.dispatch(caller, nr, send_args)
    rows.append(("EVTCHNOP_send, port already pending (2-level)", per_op(send)))

    view = d.mem.view(SHINFO, 4096)
    pend_byte, pend_bit = SH_PENDING + port // 8, 1 << (port % 8)

    def ack():
        view[pend_byte] &= ~pend_bit
        view[0] = 0
        view[VI_SEL] = 0
    rows.append(("guest ack only (clear pending, upcall, sel)", per_op(ack)))
    calls = d.upcalls.calls

    def send_deliver():
        disp.dispatch(caller, nr, send_args)
        ack()
    before = len(calls)
    rows.append(("EVTCHNOP_send + delivery + ack (2-level)", per_op(send_deliver)))
    assert len(calls) > before + BATCH, "sends did not raise upcalls"

    # VMM notify -> raise_, same thread.
    vport = d.evtchn.alloc_vmm_port(lambda: None)
    vbyte, vbit = SH_PENDING + vport // 8, 1 << (vport % 8)

    def notify_deliver():
        d.evtchn.notify(vport)
        view[vbyte] &= ~vbit
        view[0] = 0
        view[VI_SEL] = 0
    rows.append(("VMM notify(port) + delivery + ack (2-level)", per_op(notify_deliver)))
    if threaded:
        rows += _threaded(d, disp, caller, vport)
    d.io.stop()
    return rows


def _threaded(d, disp, caller, vport: int) -> list[tuple[str, float]]:
    """Wall-clock latencies across the I/O thread (medians)."""
    rows: list[tuple[str, float]] = []
    nr = Hypercall.event_channel_op
    view = d.mem.view(SHINFO, 4096)
    vbyte, vbit = SH_PENDING + vport // 8, 1 << (vport % 8)
    calls = d.upcalls.calls

    # VMM notify from the I/O thread -> raise_ called there (includes the thread hop).
    calls_t: list[int] = []
    orig_raise = d.upcalls.raise_

    def timed_raise(v):
        calls_t.append(time.perf_counter_ns())
        orig_raise(v)
    d.upcalls.raise_ = timed_raise
    lat = []
    for _ in range(300):
        view[vbyte] &= ~vbit
        view[0] = 0
        view[VI_SEL] = 0
        n = len(calls)
        t0 = time.perf_counter_ns()
        d.io.call_soon(lambda: d.evtchn.notify(vport))
        d.upcalls.wait(n + 1)            # blocking: a spin here would hold the GIL
        lat.append(calls_t[-1] - t0)
    rows.append(("I/O thread: call_soon(notify) -> upcall raised (median)", statistics.median(lat)))

    # Guest send on a VMM port -> on_notify on the I/O thread.
    hit = threading.Event()
    gport = d.evtchn.alloc_vmm_port(hit.set)
    g_args = (EvtchnOp.send, ARG + 0x200, 0, 0, 0, 0)
    d.mem.write_u32(ARG + 0x200, gport)
    lat = []
    for _ in range(300):
        hit.clear()
        t0 = time.perf_counter_ns()
        disp.dispatch(caller, nr, g_args)
        hit.wait(1)
        lat.append(time.perf_counter_ns() - t0)
    rows.append(("guest EVTCHNOP_send -> VMM on_notify on I/O thread (median)", statistics.median(lat)))
    return rows


def _fifo(per_op) -> list[tuple[str, float]]:
    """The FIFO rows (two control blocks, one event-array page)."""
    rows: list[tuple[str, float]] = []
    nr = Hypercall.event_channel_op
    send_args = (EvtchnOp.send, ARG + 0x100, 0, 0, 0, 0)
    d, disp, caller = setup()

    def send():
        disp.dispatch(caller, nr, send_args)
    for v in (0, 1):
        obj = ffi.new("struct evtchn_init_control *", {"control_gfn": (CB + v * 0x1000) >> 12, "offset": 0, "vcpu": v})
        d.mem.write(ARG, bytes(ffi.buffer(obj)))
        assert disp.dispatch(caller, nr, (EvtchnOp.init_control, ARG, 0, 0, 0, 0)) == 0
    obj = ffi.new("struct evtchn_expand_array *", {"array_gfn": ARR >> 12})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    assert disp.dispatch(caller, nr, (EvtchnOp.expand_array, ARG, 0, 0, 0, 0)) == 0
    port = bind_ipi(d, disp, caller)
    d.mem.write_u32(ARG + 0x100, port)
    words = d.mem.array(ARR, 1024, "<u4")
    cb = d.mem.array(CB, 18, "<u4")
    view = d.mem.view(SHINFO, 64)
    rows.append(("EVTCHNOP_send, port already pending (FIFO)", per_op(send)))

    def fifo_ack():
        words[port] = 0          # consumed: unlinked, not pending
        cb[0] = 0                # READY cleared
        view[0] = 0              # upcall_pending cleared

    def fifo_send_deliver():
        disp.dispatch(caller, nr, send_args)
        fifo_ack()
    rows.append(("EVTCHNOP_send + delivery + ack (FIFO)", per_op(fifo_send_deliver)))
    d.io.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
