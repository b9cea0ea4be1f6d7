"""EventLatency: the event-path intervals a backend records, on an injected clock."""
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
