"""xenkvm/xen/testdev.py: the test backend's command blocks, good and bad, against fake backends.

The guest side of the protocol is firmware/include/xen_testdev.h; the block
layout is checked against the header's _Static_assert offsets here too.
"""
from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import pytest

from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.testdev import (BLOCK, MAGIC, PAGE, Command, Op, Result, TestDevice, fnv1a32)

HEADER = Path(__file__).resolve().parents[2] / "firmware" / "include" / "xen_testdev.h"
BLOCK_GPA = 0x10000
BUF_GPA = 0x20000
GNTST_BAD_GNTREF = -4
GNTST_PERMISSION_DENIED = -8


class GrantError(Exception):
    def __init__(self, status: int, why: str = ""):
        super().__init__(why)
        self.status = status


class FakeGnttab:
    """One granted page per ref: {ref: (domid, bytearray, readonly)}."""

    def __init__(self):
        self.grants: dict[int, tuple[int, bytearray, bool]] = {}
        self.unmapped = 0

    def _get(self, domid: int, ref: int) -> tuple[bytearray, bool]:
        if ref not in self.grants:
            raise GrantError(GNTST_BAD_GNTREF)
        gdom, page, ro = self.grants[ref]
        if gdom != domid:
            raise GrantError(GNTST_PERMISSION_DENIED)
        return page, ro

    def copy_from(self, domid: int, ref: int, offset: int, length: int) -> bytes:
        page, _ = self._get(domid, ref)
        return bytes(page[offset:offset + length])

    def copy_to(self, domid: int, ref: int, offset: int, data: bytes) -> None:
        page, ro = self._get(domid, ref)
        if ro:
            raise GrantError(GNTST_PERMISSION_DENIED)
        page[offset:offset + len(data)] = data

    def map(self, domid: int, ref: int, writable: bool):
        page, ro = self._get(domid, ref)
        if writable and ro:
            raise GrantError(GNTST_PERMISSION_DENIED)
        return FakeMapping(self, memoryview(page) if writable else memoryview(page).toreadonly())


class FakeMapping:
    """Like gnttab.GrantMapping: a ``view`` and ``unmap()``, which fails if the view is still exported."""

    def __init__(self, table: FakeGnttab, view: memoryview):
        self.table = table
        self.view = view

    def unmap(self) -> None:
        self.view.release()     # BufferError if the device leaked an export of it
        self.table.unmapped += 1


class EvtchnError(Exception):
    pass


class FakeEvtchn:
    """Like evtchn.EventChannels' VMM API: ports are guest port numbers."""

    def __init__(self):
        self.next_port = 10
        self.callbacks: dict[int, object] = {}
        self.notified: list[int] = []
        self.guest_unbound = {5}

    def alloc_vmm_port(self, on_notify) -> int:
        port = self.next_port
        self.next_port += 1
        self.callbacks[port] = on_notify
        return port

    def bind_vmm_to_guest_port(self, port: int, on_notify) -> int:
        if port not in self.guest_unbound:
            raise EvtchnError(f"guest port {port} is not unbound to domain 0")
        self.guest_unbound.discard(port)
        self.callbacks[port] = on_notify
        return port

    def notify(self, port: int) -> None:
        self.notified.append(port)

    def guest_sends(self, port: int) -> None:
        self.callbacks[port]()


class Broken:
    def copy_from(self, *a):
        raise RuntimeError("backend bug")


class FakeDomain:
    def __init__(self):
        self.mem = GuestMemory(4 << 20)
        self.gnttab = FakeGnttab()
        self.evtchn = FakeEvtchn()
        self.lock = threading.RLock()


@pytest.fixture
def dom() -> FakeDomain:
    d = FakeDomain()
    d.gnttab.grants[8] = (1, bytearray(range(256)) * 16, False)
    d.gnttab.grants[9] = (1, bytearray(b"R" * PAGE), True)
    return d


def block(op: int, *, magic: int = MAGIC, domid: int = 1, flags: int = 0, ref: int = 8, offset: int = 0,
          length: int = 16, buffer: int = BUF_GPA, port: int = 0) -> bytes:
    return Command(magic, op, domid, flags, ref, offset, length, buffer, port, 1, 0).pack()


def run(dom: FakeDomain, data: bytes, gpa: int = BLOCK_GPA) -> tuple[int, int, int]:
    """Write the block, OUT its address; returns (result in block, value, IN status)."""
    dev = TestDevice(dom)
    dom.mem.write(gpa, data)
    dev.pio_write(0, 4, gpa)
    result, value = struct.unpack_from("<iQ", dom.mem.read(gpa + 36, 12))
    status = dev.pio_read(0, 4)
    return result, value, status


def test_block_layout_matches_header():
    text = HEADER.read_text()
    offsets = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"offsetof\(struct xk_testdev_cmd, (\w+)\) == (\d+)", text)}
    assert offsets == {"op": 4, "domid": 8, "flags": 10, "ref": 12, "offset": 16, "length": 20,
                       "buffer": 24, "port": 32, "result": 36, "value": 40}
    assert "sizeof(struct xk_testdev_cmd) == 64" in text and BLOCK.size == 64
    fields = struct.unpack(BLOCK.format, Command(MAGIC, 1, 2, 3, 4, 5, 6, 7, 8, -9, 10).pack())
    assert fields == (MAGIC, 1, 2, 3, 4, 5, 6, 7, 8, -9, 10)
    assert f"{MAGIC:#x}" in text.lower()
    for op in Op:
        assert re.search(rf"XK_TESTDEV_OP_{op.name} = {op.value}\b", text), op
    for r in Result:
        if r is not Result.OK:
            assert re.search(rf"XK_TESTDEV_{r.name} = {r.value}\b", text), r


def test_fnv1a_known_values():
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_copy_from_and_to(dom):
    r, value, status = run(dom, block(Op.COPY_FROM, offset=4, length=8))
    assert (r, value, status) == (0, 8, 0)
    assert dom.mem.read(BUF_GPA, 8) == bytes(range(4, 12))
    dom.mem.write(BUF_GPA, b"hello, backend!!")
    r, _, _ = run(dom, block(Op.COPY_TO, offset=100, length=16))
    assert r == 0
    assert bytes(dom.gnttab.grants[8][1][100:116]) == b"hello, backend!!"


def test_map_sum_readonly_and_write(dom):
    r, value, _ = run(dom, block(Op.MAP_SUM, ref=9, length=PAGE))
    assert r == 0 and value == fnv1a32(b"R" * PAGE)
    assert dom.gnttab.unmapped == 1
    r, _, _ = run(dom, block(Op.MAP_SUM, ref=9, flags=1, length=4))
    assert r == GNTST_PERMISSION_DENIED
    dom.mem.write(BUF_GPA, b"WXYZ")
    r, value, _ = run(dom, block(Op.MAP_SUM, ref=8, flags=1, offset=PAGE - 4, length=4))
    assert r == 0 and value == fnv1a32(b"WXYZ")
    assert bytes(dom.gnttab.grants[8][1][-4:]) == b"WXYZ"


@pytest.mark.parametrize("kw, expect", [
    ({"ref": 1234}, GNTST_BAD_GNTREF),
    ({"domid": 7}, GNTST_PERMISSION_DENIED),
    ({"magic": 0}, Result.EMAGIC),
    ({"length": 0}, Result.ERANGE),
    ({"length": PAGE + 1}, Result.ERANGE),
    ({"offset": PAGE}, Result.ERANGE),
    ({"offset": PAGE - 8, "length": 9}, Result.ERANGE),
    ({"offset": 0xFFFFFFFF, "length": 2}, Result.ERANGE),
    ({"length": 0xFFFFFFFF}, Result.ERANGE),
    ({"flags": 0x80}, Result.ERANGE),
    ({"buffer": 0xFFFF_FFFF_FFFF_F000}, Result.EBUFFER),
    ({"buffer": (4 << 20) - 8}, Result.EBUFFER),
])
def test_bad_copy_from_fields(dom, kw, expect):
    before = dom.mem.read(BUF_GPA, 64)
    r, value, status = run(dom, block(Op.COPY_FROM, **kw))
    assert r == expect and status == expect & 0xFFFFFFFF and value == 0
    assert dom.mem.read(BUF_GPA, 64) == before


def test_readonly_grant_refuses_copy_to(dom):
    r, _, _ = run(dom, block(Op.COPY_TO, ref=9))
    assert r == GNTST_PERMISSION_DENIED
    assert bytes(dom.gnttab.grants[9][1]) == b"R" * PAGE


def test_bad_buffer_for_copy_to(dom):
    r, _, _ = run(dom, block(Op.COPY_TO, buffer=1 << 40))
    assert r == Result.EBUFFER


def test_unknown_op(dom):
    for op in (0, 8, 0xFFFFFFFF):
        assert run(dom, block(op))[0] == Result.EOP


@pytest.mark.parametrize("gpa", [BLOCK_GPA + 4, PAGE - 8, (4 << 20) - 8, 0xFFFFF000, 0xFFFFFFF8])
def test_bad_block_address_only_in_status(dom, gpa):
    dev = TestDevice(dom)
    dev.pio_write(0, 4, gpa)
    assert dev.pio_read(0, 4) == Result.EBLOCK & 0xFFFFFFFF


def test_wrong_access_sizes(dom):
    dev = TestDevice(dom)
    dom.mem.write(BLOCK_GPA, block(Op.COPY_FROM))
    dev.pio_write(0, 1, BLOCK_GPA)
    dev.pio_write(2, 2, BLOCK_GPA)
    assert struct.unpack_from("<i", dom.mem.read(BLOCK_GPA + 36, 4))[0] == 1   # untouched
    assert dev.pio_read(0, 4) == Result.EACCESS & 0xFFFFFFFF
    assert dev.pio_read(1, 1) == 0xFF
    assert dev.pio_read(0, 2) == 0xFFFF


def test_backend_bug_is_an_error_code(dom):
    dom.gnttab = Broken()
    assert run(dom, block(Op.COPY_FROM))[0] == Result.EINTERNAL


def test_echo_ports(dom):
    dev = TestDevice(dom)
    dom.mem.write(BLOCK_GPA, block(Op.ALLOC_ECHO))
    dev.pio_write(0, 4, BLOCK_GPA)
    r, port = struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12))
    assert r == 0 and port == 10
    dom.evtchn.guest_sends(port)
    dom.evtchn.guest_sends(port)
    assert dom.evtchn.notified == [10, 10]
    dom.mem.write(BLOCK_GPA, block(Op.ECHO_COUNT, port=port))
    dev.pio_write(0, 4, BLOCK_GPA)
    assert struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12)) == (0, 2)
    dom.mem.write(BLOCK_GPA, block(Op.NOTIFY, port=port))
    dev.pio_write(0, 4, BLOCK_GPA)
    assert dev.pio_read(0, 4) == 0 and dom.evtchn.notified == [10, 10, 10]

    dom.mem.write(BLOCK_GPA, block(Op.BIND_ECHO, port=5))
    dev.pio_write(0, 4, BLOCK_GPA)
    r, vport = struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12))
    assert r == 0 and vport == 5
    dom.evtchn.guest_sends(5)
    assert dom.evtchn.notified[-1] == 5
    dom.mem.write(BLOCK_GPA, block(Op.BIND_ECHO, port=5))     # already bound: refused
    dev.pio_write(0, 4, BLOCK_GPA)
    assert dev.pio_read(0, 4) == Result.EEVTCHN & 0xFFFFFFFF


@pytest.mark.parametrize("op, port", [(Op.BIND_ECHO, 6), (Op.NOTIFY, 99), (Op.ECHO_COUNT, 3)])
def test_bad_ports(dom, op, port):
    assert run(dom, block(op, port=port))[0] == Result.EEVTCHN
