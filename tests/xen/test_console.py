"""The primary console ring: output drain (wrap, free-running indices, hostile
indices), host input with back-pressure, params and event channel use.

The domain is a small stand-in with real guest memory and the real special
region; the event channel is a recorder.  The guest side of the ring is written
here with the offsets Linux's ``console.h`` gives (in[1024] @0, out[2048]
@0x400, in_cons @0xC00, in_prod @0xC04, out_cons @0xC08, out_prod @0xC0C),
independently of the cffi layout the console uses.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from types import SimpleNamespace

import pytest

from xenkvm.config import ConfigError, XenConfig
from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.abi import HvmParam
from xenkvm.xen.console import LAYOUT, PENDING_MAX, XEN_PREFIX, HypervisorLog, PrimaryConsole
from xenkvm.xen.domain import CONSOLE_PAGE, SPECIAL_PAGES, SPECIAL_PAGES_GPA, InputQueue

IN, OUT, IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 0, 0x400, 0xC00, 0xC04, 0xC08, 0xC0C
IN_SIZE, OUT_SIZE = 1024, 2048
U32 = struct.Struct("<I")


class FakeEvtchn:
    """Records VMM ports and notifies; ``send`` plays the guest's EVTCHNOP_send."""

    def __init__(self, first_port: int = 3):
        self.handlers: dict[int, object] = {}
        self.notified: list[int] = []
        self._next = first_port

    def alloc_vmm_port(self, on_notify, vcpu: int = 0) -> int:
        port, self._next = self._next, self._next + 1
        self.handlers[port] = on_notify
        return port

    def notify(self, port: int) -> None:
        self.notified.append(port)

    def send(self, port: int) -> None:
        self.handlers[port]()


def fake_domain(domid: int = 1, io=None):
    mem = GuestMemory(4 << 20)
    mem.add_region(SPECIAL_PAGES_GPA, SPECIAL_PAGES * 4096, "xen-special-pages")
    sink = ConsoleSink(None)
    cfg = SimpleNamespace(name="guest1", console="none")
    machine = SimpleNamespace(console=sink, cfg=cfg, io=io)
    pfn = lambda i: (SPECIAL_PAGES_GPA >> 12) + i  # noqa: E731
    dom = SimpleNamespace(machine=machine, mem=mem, domid=domid, params={}, evtchn=FakeEvtchn(), cfg=XenConfig(),
                          lock=threading.RLock(), io=io, console_input=InputQueue(),
                          vcpus=[SimpleNamespace(id=0), SimpleNamespace(id=1)], special_pfn=pfn)
    dom.params[HvmParam.STORE_PFN] = pfn(0)
    dom.params[HvmParam.CONSOLE_PFN] = pfn(CONSOLE_PAGE)
    return dom


class GuestSide:
    """What hvc_xen does with the page."""

    def __init__(self, dom):
        self.gpa = dom.params[HvmParam.CONSOLE_PFN] << 12
        self.mem = dom.mem

    def get(self, off: int) -> int:
        return self.mem.read_u32(self.gpa + off)

    def set(self, off: int, v: int) -> None:
        self.mem.write_u32(self.gpa + off, v & 0xFFFFFFFF)

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
    return fake_domain()


@pytest.fixture
def con(dom):
    return PrimaryConsole.attach(dom)


def test_layout_matches_console_h():
    assert (LAYOUT.in_off, LAYOUT.in_size, LAYOUT.out_off, LAYOUT.out_size) == (IN, IN_SIZE, OUT, OUT_SIZE)
    assert (LAYOUT.in_cons, LAYOUT.in_prod, LAYOUT.out_cons, LAYOUT.out_prod) == (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD)


def test_params_and_port(dom, con):
    assert dom.params[HvmParam.CONSOLE_EVTCHN] == con.port != 0
    assert con.port in dom.evtchn.handlers
    # The page lies in the special region, above RAM.
    assert con.gfn << 12 == SPECIAL_PAGES_GPA + CONSOLE_PAGE * 4096 >= dom.mem.ram_size


def test_output_reaches_sink_and_guest_is_notified(dom, con):
    g = GuestSide(dom)
    assert not con.connected
    g.write_out(b"hello, xen\r\n")
    dom.evtchn.send(con.port)
    assert dom.machine.console.tail() == b"hello, xen\r\n"
    assert g.get(OUT_CONS) == g.get(OUT_PROD) == 12
    assert dom.evtchn.notified == [con.port]
    assert con.connected
    dom.evtchn.send(con.port)          # nothing new: no output, no notify
    assert dom.evtchn.notified == [con.port]


def test_output_wraps_around_the_ring(dom, con):
    g = GuestSide(dom)
    g.set(OUT_CONS, 2040)
    g.set(OUT_PROD, 2040)
    data = bytes(range(65, 65 + 26))
    g.write_out(data)
    dom.evtchn.send(con.port)
    assert dom.machine.console.tail() == data
    assert g.get(OUT_CONS) == 2040 + 26


def test_free_running_indices_wrap_at_2_32(dom, con):
    g = GuestSide(dom)
    start = 0xFFFF_FFF0
    g.set(OUT_CONS, start)
    g.set(OUT_PROD, start)
    data = b"x" * 10 + b"y" * 30
    g.write_out(data)
    assert g.get(OUT_PROD) == (start + 40) & 0xFFFFFFFF
    dom.evtchn.send(con.port)
    assert dom.machine.console.tail() == data
    assert g.get(OUT_CONS) == g.get(OUT_PROD)


def test_full_ring_is_drained_in_one_go(dom, con):
    g = GuestSide(dom)
    data = bytes(i % 251 for i in range(OUT_SIZE))
    g.write_out(data)
    dom.evtchn.send(con.port)
    assert dom.machine.console.tail() == data


def test_hostile_out_indices_break_the_ring_once(dom, con, caplog):
    g = GuestSide(dom)
    g.set(OUT_CONS, 0)
    g.set(OUT_PROD, OUT_SIZE + 1)
    with caplog.at_level(logging.ERROR, logger="xenkvm.xen.console"):
        dom.evtchn.send(con.port)
        dom.evtchn.send(con.port)
        con.push_input(b"ignored")
    assert con.broken
    assert dom.machine.console.tail() == b""
    assert g.get(OUT_CONS) == 0 and g.get(IN_PROD) == 0
    assert sum("broken" in r.message for r in caplog.records) == 1


def test_hostile_in_cons_breaks_the_ring(dom, con):
    g = GuestSide(dom)
    g.set(IN_CONS, 0x8000_0000)
    con.push_input(b"abc")
    assert con.broken
    assert g.get(IN_PROD) == 0


def test_input_written_and_notified(dom, con):
    g = GuestSide(dom)
    assert con.push_input(b"ls\r") == 3
    assert g.get(IN_PROD) == 3
    assert dom.evtchn.notified == [con.port]
    assert g.read_in() == b"ls\r"


def test_input_beyond_free_space_waits_for_the_guest(dom, con):
    g = GuestSide(dom)
    data = bytes(i % 256 for i in range(IN_SIZE + 500))
    assert con.push_input(data) == len(data)
    assert g.get(IN_PROD) == IN_SIZE
    assert con.pending_input == 500
    got = g.read_in()
    dom.evtchn.send(con.port)           # guest consumed: the rest goes in
    assert con.pending_input == 0
    got += g.read_in()
    assert got == data
    assert dom.evtchn.notified == [con.port, con.port]


def test_input_wraps_with_free_running_indices(dom, con):
    g = GuestSide(dom)
    g.set(IN_CONS, 0xFFFF_FFFE)
    g.set(IN_PROD, 0xFFFF_FFFE)
    con.push_input(b"wrapped!")
    assert g.get(IN_PROD) == 6
    assert g.read_in() == b"wrapped!"


def test_pending_input_is_bounded(dom, con):
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
