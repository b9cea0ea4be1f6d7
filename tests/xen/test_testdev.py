"""xenkvm/xen/testdev.py: the test backend's command blocks, good and bad, against the real
grant table and event channels of the shared fake domain (evtchnfakes).

The guest side of the protocol is firmware/include/xen_testdev.h; the block
layout is checked against the header's _Static_assert offsets here too.  The
granted pages are guest RAM, granted with the grant table's own ``seed`` (a
full-page permit_access entry, as a guest or the toolstack writes it).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from evtchnfakes import SHINFO, FakeDomain, hc
from xenkvm.xen.abi import DOMID_SELF, EvtchnOp, Gntst, Hypercall, ffi
from xenkvm.xen.testdev import (BLOCK, MAGIC, PAGE, Command, Op, Result, TestDevice, fnv1a32)

HEADER = Path(__file__).resolve().parents[2] / "firmware" / "include" / "xen_testdev.h"
BLOCK_GPA = 0x30000
BUF_GPA = 0x40000
ARG = 0x50000
RAM = 4 << 20
RW_GFN, RO_GFN = 0x100, 0x101          #: the pages granted by refs 8 (writable) and 9 (read-only)


def page(d, gfn: int) -> bytes:
    return d.mem.read(gfn << 12, PAGE)


def guest_unbound_port(d) -> int:
    """EVTCHNOP_alloc_unbound(DOMID_SELF, remote 0): a port a backend in dom0 may bind."""
    obj = ffi.new("struct evtchn_alloc_unbound *", {"dom": DOMID_SELF, "remote_dom": 0})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.alloc_unbound, ARG) == 0
    return d.mem.read_u32(ARG + ffi.offsetof("struct evtchn_alloc_unbound", "port"))


def guest_send(d, port: int) -> None:
    obj = ffi.new("struct evtchn_send *", {"port": port})
    d.mem.write(ARG, bytes(ffi.buffer(obj)))
    assert hc(d, Hypercall.event_channel_op, EvtchnOp.send, ARG) == 0
    assert d.io.wait_idle()


def take_pending(d, port: int) -> bool:
    """Whether ``port`` was notified since the last call (the guest clears its pending bit)."""
    at = SHINFO + ffi.offsetof("struct shared_info", "evtchn_pending") + port // 8
    byte, bit = d.mem.read(at, 1)[0], 1 << port % 8
    d.mem.write(at, bytes([byte & ~bit]))
    return bool(byte & bit)


@pytest.fixture
def dom():
    d = FakeDomain(ram=RAM, gnttab=True)
    d.mem.write(RW_GFN << 12, bytes(range(256)) * 16)
    d.mem.write(RO_GFN << 12, b"R" * PAGE)
    d.gnttab.seed(8, 0, RW_GFN)
    d.gnttab.seed(9, 0, RO_GFN, readonly=True)
    yield d
    d.close()


def block(op: int, *, magic: int = MAGIC, domid: int = 1, flags: int = 0, ref: int = 8, offset: int = 0,
          length: int = 16, buffer: int = BUF_GPA, port: int = 0) -> bytes:
    return Command(magic, op, domid, flags, ref, offset, length, buffer, port, 1, 0).pack()


def run(dom, data: bytes, gpa: int = BLOCK_GPA) -> tuple[int, int, int]:
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
    assert page(dom, RW_GFN)[100:116] == b"hello, backend!!"
    assert dom.gnttab.pinned == {}             # the copies released their pins


def test_map_sum_readonly_and_write(dom):
    r, value, _ = run(dom, block(Op.MAP_SUM, ref=9, length=PAGE))
    assert r == 0 and value == fnv1a32(b"R" * PAGE)
    assert dom.gnttab.pinned == {}             # mapped, summed, unmapped
    r, _, _ = run(dom, block(Op.MAP_SUM, ref=9, flags=1, length=4))
    assert r == Gntst.general_error              # Xen: write-pin of a read-only grant
    dom.mem.write(BUF_GPA, b"WXYZ")
    r, value, _ = run(dom, block(Op.MAP_SUM, ref=8, flags=1, offset=PAGE - 4, length=4))
    assert r == 0 and value == fnv1a32(b"WXYZ")
    assert page(dom, RW_GFN)[-4:] == b"WXYZ"
    assert dom.gnttab.pinned == {}


@pytest.mark.parametrize("kw, expect", [
    ({"ref": 1 << 20}, Gntst.bad_gntref),
    ({"ref": 10}, Gntst.general_error),          # in the table, never granted
    ({"domid": 7}, Gntst.bad_domain),
    ({"magic": 0}, Result.EMAGIC),
    ({"length": 0}, Result.ERANGE),
    ({"length": PAGE + 1}, Result.ERANGE),
    ({"offset": PAGE}, Result.ERANGE),
    ({"offset": PAGE - 8, "length": 9}, Result.ERANGE),
    ({"offset": 0xFFFFFFFF, "length": 2}, Result.ERANGE),
    ({"length": 0xFFFFFFFF}, Result.ERANGE),
    ({"flags": 0x80}, Result.ERANGE),
    ({"buffer": 0xFFFF_FFFF_FFFF_F000}, Result.EBUFFER),
    ({"buffer": RAM - 8}, Result.EBUFFER),
])
def test_bad_copy_from_fields(dom, kw, expect):
    before = dom.mem.read(BUF_GPA, 64)
    r, value, status = run(dom, block(Op.COPY_FROM, **kw))
    assert r == expect and status == expect & 0xFFFFFFFF and value == 0
    assert dom.mem.read(BUF_GPA, 64) == before


def test_readonly_grant_refuses_copy_to(dom):
    r, _, _ = run(dom, block(Op.COPY_TO, ref=9))
    assert r == Gntst.general_error
    assert page(dom, RO_GFN) == b"R" * PAGE


def test_bad_buffer_for_copy_to(dom):
    r, _, _ = run(dom, block(Op.COPY_TO, buffer=1 << 40))
    assert r == Result.EBUFFER


def test_unknown_op(dom):
    for op in (0, 8, 0xFFFFFFFF):
        assert run(dom, block(op))[0] == Result.EOP


@pytest.mark.parametrize("gpa", [BLOCK_GPA + 4, PAGE - 8, RAM - 8, 0xFFFFF000, 0xFFFFFFF8])
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


def test_backend_bug_is_an_error_code(dom, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("backend bug")
    monkeypatch.setattr(dom.gnttab, "copy_from", broken)
    assert run(dom, block(Op.COPY_FROM))[0] == Result.EINTERNAL


def test_echo_ports(dom):
    dev = TestDevice(dom)
    dom.mem.write(BLOCK_GPA, block(Op.ALLOC_ECHO))
    dev.pio_write(0, 4, BLOCK_GPA)
    r, port = struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12))
    assert r == 0 and dom.evtchn.status(port)["vmm"]
    # The guest sends twice (the device's handler runs on the I/O thread); each is echoed.
    guest_send(dom, port)
    assert take_pending(dom, port)
    guest_send(dom, port)
    assert take_pending(dom, port)
    dom.mem.write(BLOCK_GPA, block(Op.ECHO_COUNT, port=port))
    dev.pio_write(0, 4, BLOCK_GPA)
    assert struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12)) == (0, 2)
    dom.mem.write(BLOCK_GPA, block(Op.NOTIFY, port=port))
    dev.pio_write(0, 4, BLOCK_GPA)
    assert dev.pio_read(0, 4) == 0 and take_pending(dom, port)

    unbound = guest_unbound_port(dom)
    dom.mem.write(BLOCK_GPA, block(Op.BIND_ECHO, port=unbound))
    dev.pio_write(0, 4, BLOCK_GPA)
    r, vport = struct.unpack_from("<iQ", dom.mem.read(BLOCK_GPA + 36, 12))
    assert r == 0 and vport == unbound
    assert dom.io.wait_idle()
    take_pending(dom, unbound)                   # Xen notifies the binder's end once
    guest_send(dom, unbound)
    assert take_pending(dom, unbound)
    dom.mem.write(BLOCK_GPA, block(Op.BIND_ECHO, port=unbound))     # already bound: refused
    dev.pio_write(0, 4, BLOCK_GPA)
    assert dev.pio_read(0, 4) == Result.EEVTCHN & 0xFFFFFFFF


@pytest.mark.parametrize("op, port", [(Op.BIND_ECHO, 6), (Op.BIND_ECHO, 99999), (Op.NOTIFY, 99),
                                      (Op.ECHO_COUNT, 3)])
def test_bad_ports(dom, op, port):
    assert run(dom, block(op, port=port))[0] == Result.EEVTCHN
