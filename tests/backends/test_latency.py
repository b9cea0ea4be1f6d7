"""EventLatency: the event-path intervals a backend records, on an injected clock."""
import pytest

from xenkvm.backends.latency import EventLatency


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def test_intervals_of_a_round_trip():
    c = Clock()
    lat = EventLatency(clock=c)
    c.t = 1_000
    lat.kicked()
    c.t = 1_500
    lat.kicked()                  # a second kick before the worker ran: the first one counts
    c.t = 31_000
    lat.serving()
    c.t = 40_000
    lat.notified(38_000)
    c.t = 100_000
    lat.kicked()
    s = lat.summary()
    assert s["notify_to_service"] == (1, 30.0, 30.0)
    assert s["notify_call"] == (1, 2.0, 2.0)
    assert s["response_to_kick"] == (1, 60.0, 60.0)


def test_serving_without_a_kick_and_bounded_samples():
    c = Clock()
    lat = EventLatency(keep=3, clock=c)
    lat.serving()                 # a pass on connect, no kick: no sample
    assert lat.summary() == {}
    for i in range(5):
        c.t = i * 10_000
        lat.kicked()
        c.t += 1_000 * (i + 1)
        lat.serving()
    n, median, p90 = lat.summary()["notify_to_service"]
    assert n == 3 and median == 4.0
    assert "notify_to_service n=3 median=4us" in lat.line()


class FakeUpcalls:
    delivered = 0
    eoi_rounds = 0


class FakeDomain:
    """The two counters CostWindow reads: the dispatcher's ops and the upcalls."""

    def __init__(self) -> None:
        import collections
        import types
        self.dispatcher = types.SimpleNamespace(ops=collections.Counter())
        self.upcalls = FakeUpcalls()
        self.io = types.SimpleNamespace(passes=3)


def test_cost_window_divides_each_window_by_its_requests():
    from xenkvm.backends.latency import CostWindow
    from xenkvm.xen.abi import Hypercall
    c, d = Clock(), FakeDomain()
    d.dispatcher.ops[(int(Hypercall.event_channel_op), 4)] = 7       # before the window: not counted
    w = CostWindow(d, clock=c)
    c.t = 2_000_000_000
    d.dispatcher.ops[(int(Hypercall.event_channel_op), 4)] += 10
    d.dispatcher.ops[(int(Hypercall.vcpu_op), 10)] += 20
    d.dispatcher.ops[(int(Hypercall.xen_version), None)] += 5
    d.upcalls.delivered, d.upcalls.eoi_rounds = 10, 0
    d.io.passes += 25
    line = w.sample(10, {"kicks": 8})
    assert line.startswith("10 requests in 2.0 s  hypercalls/req 3.50  vcpu_op/10 2.00  event_channel_op/4 1.00"
                           "  xen_version 0.50")
    assert "upcalls/req 1.00" in line and "eoi-rounds/req 0.00" in line and "kicks/req 0.80" in line
    assert "io-wakes/req 2.50" in line
    d.dispatcher.ops[(int(Hypercall.event_channel_op), 4)] += 4       # the next window starts where this ended
    assert w.sample(4).startswith("4 requests in 0.0 s  hypercalls/req 1.00  event_channel_op/4 1.00")


def test_cost_window_without_requests_does_not_divide_by_zero():
    from xenkvm.backends.latency import CostWindow
    w = CostWindow(FakeDomain(), clock=Clock())
    assert w.sample(0).startswith("0 requests in 0.0 s  hypercalls/req 0.00  sends-in-C/req 0.00  upcalls/req 0.00")


def test_cost_window_counts_the_sends_completed_in_c_as_event_channel_sends():
    """A kick the vCPU's C loop completed (xen/fastpath.py) never reaches the dispatcher, yet it is
    an EVTCHNOP_send the request cost: counted with the Python ones and shown on its own."""
    import types
    from xenkvm.backends.latency import CostWindow
    from xenkvm.xen.abi import Hypercall
    c, d = Clock(), FakeDomain()
    d.fast = types.SimpleNamespace(sends=100)                        # before the window: not counted
    w = CostWindow(d, clock=c)
    d.fast.sends += 6
    d.dispatcher.ops[(int(Hypercall.event_channel_op), 4)] += 2
    line = w.sample(4)
    assert line.startswith("4 requests in 0.0 s  hypercalls/req 2.00  event_channel_op/4 2.00")
    assert "sends-in-C/req 1.50" in line


def test_p90_is_statistics_quantiles_without_a_second_sort():
    import random
    import statistics
    from xenkvm.backends.latency import _p90
    rng = random.Random(11)
    for n in [*range(2, 40), 100, 4096]:
        data = [rng.randrange(10**6) for _ in range(n)]
        assert _p90(sorted(data)) == pytest.approx(statistics.quantiles(data, n=10)[-1])
