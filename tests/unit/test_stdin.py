"""Host keystrokes: raw mode on a pty (and its restoration), routing to exactly one
of the UART, the Xen primary console and console_io, the Ctrl-] escape, pipes and EOF.

The machine is a stand-in with a real IoLoop and a real 16550; ``stop`` records.
"""
from __future__ import annotations

import os
import signal
import termios
import time
from types import SimpleNamespace

import pytest

from xenkvm.machine.devices.console import ConsoleSink
from xenkvm.machine.devices.serial import Serial16550
from xenkvm.machine.devices.stdin import ESCAPE, StdinReader, raw_attrs
from xenkvm.machine.ioloop import IoLoop
from xenkvm.machine.machine import ExitStatus
from xenkvm.xen.console import ConsoleIo, HypervisorLog
from xenkvm.xen.domain import InputQueue, XenDomain


class FakeConsole:
    def __init__(self, connected=False):
        self.connected = connected
        self.got = bytearray()

    def push_input(self, data):
        self.got += data
        return len(data)


class FakeMachine:
    def __init__(self, console="stdio", xen=None):
        self.cfg = SimpleNamespace(console=console)
        self.io = IoLoop()
        self.io.start()
        self.serial = Serial16550(ConsoleSink(None))
        self.xen = xen
        self.extensions = [] if xen is None else [xen]
        self.stops = []

    def stop(self, status, message):
        self.stops.append((status, message))

    def serial_rx(self):
        return bytes(self.serial._rx)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def pty():
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def machine():
    m = FakeMachine()
    yield m
    m.io.stop()


def xen_machine(connected):
    queue = InputQueue()
    return FakeMachine(xen=FakeXen(FakeConsole(connected), queue, ConsoleIo(HypervisorLog(None), queue)))


class FakeXen:
    """The Xen consoles without a domain; the routing rule is XenDomain's own."""

    input_sink = XenDomain.input_sink

    def __init__(self, console, console_input, console_io):
        self.console, self.console_input, self.console_io = console, console_input, console_io


def test_attach_only_for_stdio():
    m = FakeMachine(console="none")
    try:
        assert StdinReader.attach(m) is None
    finally:
        m.io.stop()


def test_raw_attrs_keep_output_processing():
    attrs = [termios.ICRNL | termios.IXON, termios.OPOST | termios.ONLCR, termios.CS7,
             termios.ECHO | termios.ICANON | termios.ISIG, 9600, 9600, [b"\0"] * 32]
    iflag, oflag, cflag, lflag, *_ , cc = raw_attrs(attrs)
    assert iflag & (termios.ICRNL | termios.IXON) == 0
    assert lflag & (termios.ECHO | termios.ICANON | termios.ISIG) == 0
    assert oflag == termios.OPOST | termios.ONLCR
    assert cflag & termios.CSIZE == termios.CS8
    assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0


def test_pty_raw_mode_routes_to_uart_and_restores(machine, pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    old_term = signal.getsignal(signal.SIGTERM)
    reader = StdinReader(machine, slave)
    reader.start()
    try:
        raw = termios.tcgetattr(slave)
        assert raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        assert signal.getsignal(signal.SIGTERM) != old_term
        os.write(master, b"ab\x03c")          # no line buffering; Ctrl-C is data
        wait_for(lambda: machine.serial_rx() == b"ab\x03c")
    finally:
        reader.close()
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) == old_term
    assert machine.stops == []


def test_escape_ends_the_run_and_sends_what_precedes(machine, pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    reader = StdinReader(machine, slave)
    reader.start()
    try:
        os.write(master, b"xy" + bytes([ESCAPE]) + b"z")
        wait_for(lambda: machine.stops)
        assert machine.stops[0][0] is ExitStatus.INTERRUPTED
        assert machine.serial_rx() == b"xy"
        assert termios.tcgetattr(slave) == before     # restored at once
    finally:
        reader.close()


def test_signal_restores_terminal_and_stops(machine, pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    reader = StdinReader(machine, slave)
    reader.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: machine.stops)
        assert machine.stops[0][0] is ExitStatus.INTERRUPTED
        assert termios.tcgetattr(slave) == before
    finally:
        reader.close()


@pytest.mark.parametrize("ring,reading,target", [
    (False, False, "uart"),       # the guest uses neither Xen console yet
    (False, True, "console_io"),  # it has issued CONSOLEIO_read
    (True, True, "ring"),         # its ring is connected: that wins
    (True, False, "ring"),
])
def test_xen_routing_delivers_each_byte_once(pty, ring, reading, target):
    master, slave = pty
    m = xen_machine(ring)
    m.xen.console_io.reading = reading
    reader = StdinReader(m, slave)
    reader.start()
    try:
        os.write(master, b"hello")
        got = {"uart": m.serial_rx, "ring": lambda: bytes(m.xen.console.got),
               "console_io": lambda: bytes(m.xen.console_input._data)}
        wait_for(lambda: got[target]() == b"hello")
        m.io.wait_idle()
        assert {name: fn() for name, fn in got.items()} == {
            name: b"hello" if name == target else b"" for name in got}
    finally:
        reader.close()
        m.io.stop()


def test_pipe_is_read_without_escape_and_eof_keeps_running(machine):
    r, w = os.pipe()
    reader = StdinReader(machine, r)
    reader.start()
    try:
        assert not reader.is_tty and reader.escape is None
        os.write(w, b"one" + bytes([ESCAPE]) + b"two")
        os.close(w)
        wait_for(lambda: machine.serial_rx() == b"one\x1dtwo")
        wait_for(lambda: not reader._reading)
        assert machine.stops == []
    finally:
        reader.close()
        os.close(r)


def test_regular_file_is_read_by_a_thread(machine, tmp_path):
    path = tmp_path / "input"
    path.write_bytes(b"from a file")
    fd = os.open(path, os.O_RDONLY)
    reader = StdinReader(machine, fd)
    reader.start()
    try:
        wait_for(lambda: machine.serial_rx() == b"from a file")
        assert machine.stops == []
    finally:
        reader.close()
        os.close(fd)
