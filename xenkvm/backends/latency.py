"""Where a PV backend's request time goes on the VMM side: the event path's latencies.

A backend records three intervals per kick (issue 11 item 5, "measure
notify-to-service and service-to-upcall latencies"):

``notify_to_service``
    the guest's EVTCHNOP_send reaching the VMM (the bound end's ``on_notify``)
    to the backend's worker starting to serve the ring: the hand-off hops;
``notify_call``
    the worker's ``evtchn.notify`` after pushing responses: setting the port
    pending and raising the upcall (KVM_SIGNAL_MSI) on the guest's vCPU;
``response_to_kick``
    responses pushed and notified to the guest's next kick: the upcall reaching
    the guest's handler, the guest completing the request and issuing the next
    one (at queue depth 1 the guest's whole turn of a round trip).

Only the last ``keep`` samples of each are kept (a long run must not grow
memory).  The stamps are written by the thread that sends (a vCPU or the I/O
thread) and read by the worker without a lock: a lost or doubled stamp moves
one sample, never the data path, so statistics do not pay for a lock.
"""
from __future__ import annotations

import collections
import statistics
import time

from xenkvm.xen.abi import Hypercall, lib
from xenkvm.xen.dispatch import op_name

NAMES = ("notify_to_service", "notify_call", "response_to_kick")
FAST_OP = (int(Hypercall.event_channel_op), int(lib.EVTCHNOP_send))   #: the ``ops`` key of a send


def _p90(ordered: list[int]) -> float:
    """``statistics.quantiles(data, n=10)[-1]`` (its default "exclusive" method, clamped and
    extrapolated as it does) of sorted data with two or more items, without sorting again."""
    m = len(ordered) + 1
    j = min(max(9 * m // 10, 1), len(ordered) - 1)
    delta = 9 * m - j * 10
    return (ordered[j - 1] * (10 - delta) + ordered[j] * delta) / 10


class EventLatency:
    """Bounded samples (ns) of the three event-path intervals of one device."""

    def __init__(self, keep: int = 4096, clock=time.perf_counter_ns):
        self.clock = clock
        self.samples = {n: collections.deque(maxlen=keep) for n in NAMES}
        self._sent: int | None = None        #: the first unserved kick's time
        self._pushed: int | None = None      #: the last notified push's time

    def kicked(self, at: int | None = None) -> None:
        """The guest notified the backend's port (any thread), now or ``at`` (``clock()``'s ns,
        as the fast path stamps a send; a kick older than the last push is not its answer)."""
        now = self.clock() if at is None else at
        if self._pushed is not None and now >= self._pushed:
            self.samples["response_to_kick"].append(now - self._pushed)
            self._pushed = None
        if self._sent is None:
            self._sent = now

    def serving(self, at: int | None = None) -> None:
        """The worker starts a pass over the rings, now or ``at`` (``clock()``'s ns: the C serve
        loop's wake-up, CLOCK_MONOTONIC as ``time.perf_counter_ns`` on Linux)."""
        sent, self._sent = self._sent, None
        if sent is not None:
            self.samples["notify_to_service"].append((self.clock() if at is None else at) - sent)

    def notified(self, started: int) -> None:
        """The worker's notify, begun at ``started`` (``clock()``), has returned."""
        now = self.clock()
        self.samples["notify_call"].append(now - started)
        self._pushed = now

    def pushed(self, at: int) -> None:
        """Responses were pushed and their notify finished at ``at`` (``clock()``'s ns) by C,
        whose notify call is not timed: the start of the next ``response_to_kick``."""
        self._pushed = at

    def summary(self) -> dict[str, tuple[int, float, float]]:
        """name -> (samples, median us, 90th percentile us) for the intervals that have samples."""
        out = {}
        for name, s in self.samples.items():
            if len(s) >= 2:
                ordered = sorted(s)
                out[name] = (len(s), statistics.median(ordered) / 1e3, _p90(ordered) / 1e3)
            elif s:
                out[name] = (1, s[0] / 1e3, s[0] / 1e3)
        return out

    def line(self) -> str:
        """One log line: ``name n=.. median=..us p90=..us`` per interval."""
        return "  ".join(f"{k} n={n} median={m:.0f}us p90={p:.0f}us" for k, (n, m, p) in self.summary().items())


class CostWindow:
    """What a device's requests cost the VMM between two log lines, per request.

    ``sample(requests)`` reads the domain's cumulative counters (hypercalls by
    op from ``dispatcher.ops``, upcall interrupts and auto-EOI rounds from
    ``upcalls``, the I/O thread's wake-ups from ``io.passes``) and returns one
    line of their growth since the previous
    sample divided by the requests served in between: the hypercalls and
    upcalls a request costs, whichever of them the guest makes around it
    (its kicks, its timers while it waits).  The counters are the whole
    domain's: another busy device in the same window adds to them.
    """

    def __init__(self, domain, clock=time.perf_counter_ns):
        self.domain = domain
        self.clock = clock
        self._last = self._read()

    def _read(self) -> tuple[int, dict, int, int, int, int]:
        d = self.domain
        ops = dict(d.dispatcher.ops)
        fast = getattr(d, "fast", None)
        in_c = fast.sends if fast is not None else 0
        ops[FAST_OP] = ops.get(FAST_OP, 0) + in_c   # sends completed in C (xen/fastpath.py) count alike
        cdeliver = getattr(d, "cdeliver", None)     # upcalls C delivery injected count alike
        upcalls = d.upcalls.delivered + (cdeliver.upcalls if cdeliver is not None else 0)
        return self.clock(), ops, upcalls, d.upcalls.eoi_rounds, d.io.passes, in_c

    def sample(self, requests: int, extra: dict[str, int] | None = None) -> str:
        """The line for the window that ends now; ``extra``: the device's own counts in it."""
        now = self._read()
        t0, ops0, up0, eoi0, io0, inc0 = self._last
        self._last = now
        t, ops, up, eoi, io, inc = now
        n = max(requests, 1)
        grown = sorted(((ops.get(k, 0) - ops0.get(k, 0), k) for k in ops), key=lambda ck: ck[0], reverse=True)
        calls = sum(c for c, _ in grown)
        parts = [f"{requests} requests in {(t - t0) / 1e9:.1f} s", f"hypercalls/req {calls / n:.2f}"]
        parts += [f"{op_name(*k)} {c / n:.2f}" for c, k in grown[:6] if c]
        parts += [f"sends-in-C/req {(inc - inc0) / n:.2f}", f"upcalls/req {(up - up0) / n:.2f}",
                  f"eoi-rounds/req {(eoi - eoi0) / n:.2f}", f"io-wakes/req {(io - io0) / n:.2f}"]
        parts += [f"{name}/req {v / n:.2f}" for name, v in (extra or {}).items()]
        return "  ".join(parts)
