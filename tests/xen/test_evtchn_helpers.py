"""The C delivery helpers (xen/_abi_build.py HELPERS_SRC) on real guest memory, rule by rule.

The guest tests (test_evtchn*.py, test_xen_guests.py, test_upcall_*.py) run them
end to end; here each outcome code of each rule is checked directly, including
the paths the Python side reaches rarely (a vcpu_info passed to the 2-level
helper, a tail the guest unlinked, a guest that keeps changing the tail).
"""
from __future__ import annotations

import pytest

from xenkvm.machine.memory import GuestMemory
from xenkvm.xen.abi import ffi, lib

SH = 0x10000
VI = 0x20040
PAGE = 0x30000
PENDING_OFF = ffi.offsetof("struct shared_info", "evtchn_pending")
MASK_OFF = ffi.offsetof("struct shared_info", "evtchn_mask")
SEL_OFF = ffi.offsetof("struct vcpu_info", "evtchn_pending_sel")
UP_OFF = ffi.offsetof("struct vcpu_info", "evtchn_upcall_pending")
PENDING, MASKED, LINKED, BUSY = (1 << lib.EVTCHN_FIFO_PENDING, 1 << lib.EVTCHN_FIFO_MASKED,
                                 1 << lib.EVTCHN_FIFO_LINKED, 1 << lib.EVTCHN_FIFO_BUSY)


@pytest.fixture
def m():
    return GuestMemory(4 << 20)


def test_2l_set_pending_walks_xens_rule(m):
    sh, vi = m.cptr(SH, ffi.sizeof("struct shared_info")), m.cptr(VI, ffi.sizeof("struct vcpu_info"))
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 70) == lib.XK_UPCALL
    assert m.read_u64(SH + PENDING_OFF + 8) == 1 << 6 and m.read_u64(VI + SEL_OFF) == 1 << 1
    assert m.read(VI + UP_OFF, 1) == b"\x01"
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 70) == lib.XK_2L_WAS_PENDING
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 71) == lib.XK_2L_SEL_WAS_SET     # same selector word
    m.write_u64(VI + SEL_OFF, 0)
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 72) == lib.XK_UPCALL_WAS_PENDING
    m.write_u64(SH + MASK_OFF, 1 << 3)
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 3) == lib.XK_2L_MASKED
    assert lib.xk_evtchn_2l_set_pending(sh, ffi.NULL, 4) == lib.XK_2L_NO_VCPU_INFO
    assert lib.xk_evtchn_2l_set_pending(sh, vi, 4096) == lib.XK_2L_WAS_PENDING   # no such port
    assert lib.xk_evtchn_2l_set_sel(vi, 64) == lib.XK_2L_SEL_WAS_SET             # no such word


def test_fifo_set_pending_links_unless_masked_or_linked(m):
    page = m.cptr(PAGE, 4096)
    assert lib.xk_evtchn_fifo_set_pending(page, 5, 0) == 0 and m.read_u32(PAGE + 20) == PENDING
    assert lib.xk_evtchn_fifo_set_pending(page, 5, 1) == lib.XK_FIFO_WAS_PENDING | lib.XK_FIFO_QUEUE
    assert m.read_u32(PAGE + 20) == PENDING | LINKED
    assert lib.xk_evtchn_fifo_set_pending(page, 5, 1) == lib.XK_FIFO_WAS_PENDING   # already LINKED
    m.write_u32(PAGE + 24, MASKED)
    assert lib.xk_evtchn_fifo_set_pending(page, 6, 1) == 0 and m.read_u32(PAGE + 24) == MASKED | PENDING


def test_fifo_set_link_only_on_a_linked_tail(m):
    page = m.cptr(PAGE, 4096)
    m.write_u32(PAGE + 8, PENDING | LINKED | BUSY | 7)
    assert lib.xk_evtchn_fifo_set_link(page, 2, 9, 4) == lib.XK_FIFO_LINKED
    assert m.read_u32(PAGE + 8) == PENDING | LINKED | 9                 # LINK replaced, BUSY clear
    m.write_u32(PAGE + 8, PENDING)                                      # the guest consumed it
    assert lib.xk_evtchn_fifo_set_link(page, 2, 11, 4) == lib.XK_FIFO_EMPTY
    assert m.read_u32(PAGE + 8) == PENDING


def test_word_helpers_return_old_values(m):
    p = m.cptr(PAGE, 4096)
    assert lib.xk_or32_at(p, 12, 6) == 0 and lib.xk_and32_at(p, 12, 4) == 6 and m.read_u32(PAGE + 12) == 4
    assert lib.xk_cmpxchg32_at(p, 12, 5, 9) == 4 and m.read_u32(PAGE + 12) == 4
    assert lib.xk_cmpxchg32_at(p, 12, 4, 9) == 1 << 32 | 4 and m.read_u32(PAGE + 12) == 9
