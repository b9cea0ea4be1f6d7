"""The network tests' host helper (tests/linux/nethost.py): its KVMSTAT line, offline."""
from __future__ import annotations

from tests.linux import nethost


def test_exits_are_per_data_frame_of_the_direction():
    before = {"tx_packets": 100, "rx_packets": 50, "exits": 1000, "io_exits": 10}
    after = {"tx_packets": 140, "rx_packets": 70, "exits": 1200, "io_exits": 30}
    assert nethost.kvm_line("h->g", "xkn0", before, after) == (
        "KVMSTAT h->g xkn0: 20 frames in, 40 out; per data frame: exits 5.00 io_exits 0.50")
    # guest->host data arrives as the tap's rx
    assert nethost.kvm_line("g->h", "xkn0", before, after).endswith("exits 10.00 io_exits 1.00")


def test_no_line_without_frames_or_without_kvm_counters():
    taps = {"tx_packets": 5, "rx_packets": 5}
    assert nethost.kvm_line("h->g", "t", taps, taps | {"tx_packets": 5}) is None    # nothing moved
    assert nethost.kvm_line("h->g", "t", taps, {"tx_packets": 9, "rx_packets": 9}) is None   # not a KVM host
