"""The primary console ring: output drain (wrap, free-running indices, hostile
indices), host input with back-pressure, params and event channel use; and the
hypervisor log that console_io output goes to.

The domain is the shared fake (evtchnfakes) with real guest memory, the real
special region and the real ``EventChannels``: the guest's EVTCHNOP_send is a
hypercall, the console's handler runs on the I/O thread as in a real run
(``io.wait_idle()`` says it has), and a notify to the guest is its port
pending in shared_info.  The guest side of the ring is written here with the
offsets Linux's ``console.h`` gives (in[1024] @0, out[2048] @0x400, in_cons
@0xC00, in_prod @0xC04, out_cons @0xC08, out_prod @0xC0C), independently of
the cffi layout the console uses.
"""
from __future__ import annotations

import logging
import os
import struct

import pytest

from evtchnfakes import SHINFO, FakeDomain, hc
from xenkvm.config import ConfigError
from xenkvm.xen.abi import EvtchnOp, HvmParam, Hypercall, ffi
from xenkvm.xen.console import LAYOUT, PENDING_MAX, XEN_PREFIX, HypervisorLog
from xenkvm.xen.domain import CONSOLE_PAGE, SPECIAL_PAGES_GPA

IN, OUT, IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 0, 0x400, 0xC00, 0xC04, 0xC08, 0xC0C
IN_SIZE, OUT_SIZE = 1024, 2048
U32 = struct.Struct("<I")
ARG = 0x20000
SH_PENDING = SHINFO + ffi.offsetof("struct shared_info", "evtchn_pending")


def guest_send(dom, port: int) -> None:
    """The guest's EVTCHNOP_send; returns once the VMM's handler has run on the I/O thread."""
    obj = ffi.new("struct evtchn_send *", {"port": port})
    dom.mem.write(ARG, bytes(ffi.buffer(obj)))
    assert hc(dom, Hypercall.event_channel_op, EvtchnOp.send, ARG) == 0
    assert dom.io.wait_idle()


def take_notify(dom, port: int) -> bool:
    """Whether the VMM notified ``port`` since the last call (the guest clears the pending bit)."""
    byte = dom.mem.read(SH_PENDING + port // 8, 1)[0]
    bit = 1 << (port % 8)
    dom.mem.write(SH_PENDING + port // 8, bytes([byte & ~bit]))
    return bool(byte & bit)


class GuestSide:
    """What hvc_xen does with the page."""

    def __init__(self, dom):
        self.dom = dom
        self.gpa = dom.params[HvmParam.CONSOLE_PFN] << 12
        self.port = dom.params[HvmParam.CONSOLE_EVTCHN]
        self.mem = dom.mem

    def get(self, off: int) -> int:
        return self.mem.read_u32(self.gpa + off)

    def set(self, off: int, v: int) -> None:
        self.mem.write_u32(self.gpa + off, v & 0xFFFFFFFF)

    def send(self) -> None:
        guest_send(self.dom, self.port)

    def notified(self) -> bool:
        return take_notify(self.dom, self.port)

    def write_out(self, data: bytes) -> None:
        prod = self.get(OUT_PROD)
        for i, b in enumerate(data):   # byte at a time, as the C loop does
            self.mem.write(self.gpa + OUT + ((prod + i) % OUT_SIZE), bytes([b]))
        self.set(OUT_PROD, prod + len(data))

    def read_in(self) -> bytes:
        cons, prod = self.get(IN_CONS), self.get(IN_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        data = bytes(self.mem.read(self.gpa + IN + ((cons + i) % IN_SIZE), 1)[0] for i in range(n))
        self.set(IN_CONS, cons + n)
        return data


@pytest.fixture
def dom():
    d = FakeDomain(console=True)
    yield d
    d.close()


@pytest.fixture
def con(dom):
    return dom.console


@pytest.fixture
def g(dom, con):
    return GuestSide(dom)


def test_layout_matches_console_h():
    assert (LAYOUT.in_off, LAYOUT.in_size, LAYOUT.out_off, LAYOUT.out_size) == (IN, IN_SIZE, OUT, OUT_SIZE)
    assert (LAYOUT.in_cons, LAYOUT.in_prod, LAYOUT.out_cons, LAYOUT.out_prod) == (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD)


def test_params_and_port(dom, con):
    assert dom.params[HvmParam.CONSOLE_EVTCHN] == con.port != 0
    st = dom.evtchn.status(con.port)
    assert st["vmm"] and st["state"] == "interdomain" and st["remote_dom"] == 0
    # The page lies in the special region, above RAM.
    assert con.gfn << 12 == SPECIAL_PAGES_GPA + CONSOLE_PAGE * 4096 >= dom.mem.ram_size


def test_output_reaches_sink_and_guest_is_notified(dom, con, g):
    assert not con.connected
    g.write_out(b"hello, xen\r\n")
    g.send()
    assert dom.machine.console.tail() == b"hello, xen\r\n"
    assert g.get(OUT_CONS) == g.get(OUT_PROD) == 12
    assert g.notified()
    assert con.connected
    g.send()                            # nothing new: no output, no notify
    assert not g.notified()
    assert dom.machine.console.tail() == b"hello, xen\r\n"


def test_a_send_alone_connects_the_ring(con, g):
    """A guest that only reads (notifies after consuming in[]) gets host input too."""
    g.send()
    assert con.connected


def test_output_wraps_around_the_ring(dom, con, g):
    g.set(OUT_CONS, 2040)
    g.set(OUT_PROD, 2040)
    data = bytes(range(65, 65 + 26))
    g.write_out(data)
    g.send()
    assert dom.machine.console.tail() == data
    assert g.get(OUT_CONS) == 2040 + 26


def test_free_running_indices_wrap_at_2_32(dom, con, g):
    start = 0xFFFF_FFF0
    g.set(OUT_CONS, start)
    g.set(OUT_PROD, start)
    data = b"x" * 10 + b"y" * 30
    g.write_out(data)
    assert g.get(OUT_PROD) == (start + 40) & 0xFFFFFFFF
    g.send()
    assert dom.machine.console.tail() == data
    assert g.get(OUT_CONS) == g.get(OUT_PROD)


def test_full_ring_is_drained_in_one_go(dom, con, g):
    data = bytes(i % 251 for i in range(OUT_SIZE))
    g.write_out(data)
    g.send()
    assert dom.machine.console.tail() == data


def test_hostile_out_indices_break_the_ring_once(dom, con, g, caplog):
    g.set(OUT_CONS, 0)
    g.set(OUT_PROD, OUT_SIZE + 1)
    with caplog.at_level(logging.ERROR, logger="xenkvm.xen.console"):
        g.send()
        g.send()
        con.push_input(b"ignored")
    assert con.broken
    assert dom.machine.console.tail() == b""
    assert g.get(OUT_CONS) == 0 and g.get(IN_PROD) == 0
    assert sum("broken" in r.message for r in caplog.records) == 1


def test_hostile_in_cons_breaks_the_ring(con, g):
    g.set(IN_CONS, 0x8000_0000)
    con.push_input(b"abc")
    assert con.broken
    assert g.get(IN_PROD) == 0


def test_input_written_and_notified(con, g):
    assert con.push_input(b"ls\r") == 3
    assert g.get(IN_PROD) == 3
    assert g.notified()
    assert g.read_in() == b"ls\r"


def test_input_beyond_free_space_waits_for_the_guest(con, g):
    data = bytes(i % 256 for i in range(IN_SIZE + 500))
    assert con.push_input(data) == len(data)
    assert g.get(IN_PROD) == IN_SIZE
    assert con.pending_input == 500
    assert g.notified()
    got = g.read_in()
    g.send()                            # guest consumed: the rest goes in
    assert con.pending_input == 0
    assert g.notified()
    got += g.read_in()
    assert got == data


def test_input_wraps_with_free_running_indices(con, g):
    g.set(IN_CONS, 0xFFFF_FFFE)
    g.set(IN_PROD, 0xFFFF_FFFE)
    con.push_input(b"wrapped!")
    assert g.get(IN_PROD) == 6
    assert g.read_in() == b"wrapped!"


def test_pending_input_is_bounded(con):
    assert con.push_input(b"a" * (PENDING_MAX + 10)) == PENDING_MAX
    assert con.pending_input == PENDING_MAX - IN_SIZE
    assert con.push_input(b"b") == 1        # the ring took IN_SIZE: there is room again


# -- the hypervisor console (console_io output) --------------------------------------------
def test_hypervisor_log_prefixes_every_line_across_writes():
    r, w = os.pipe()
    log_ = HypervisorLog(os.fdopen(w, "wb", buffering=0), XEN_PREFIX)
    for chunk in (b"first line\nsec", b"ond line\n", b"\n", b"third"):
        log_.write(chunk)
    log_.close()
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"(XEN) first line\n(XEN) second line\n(XEN) \n(XEN) third"
    assert log_.sink.tail() == b"first line\nsecond line\n\nthird"     # the tail is unprefixed


def test_hypervisor_log_file_and_none(tmp_path):
    path = tmp_path / "xen.log"
    log_ = HypervisorLog.open(f"file:{path}")
    log_.write(b"to the file\n")
    log_.close()
    assert path.read_bytes() == b"to the file\n"
    quiet = HypervisorLog.open("none")
    quiet.write(b"dropped\n")
    assert quiet.sink.tail() == b"dropped\n"
    with pytest.raises(ConfigError, match="xen.hypervisor_log: cannot open"):
        HypervisorLog.open(f"file:{tmp_path}/no/such/dir/log")
