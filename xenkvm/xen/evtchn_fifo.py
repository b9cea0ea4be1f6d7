"""The FIFO event-channel ABI (EVTCHNOP_init_control / expand_array / set_priority).

Guest-visible state lives in guest pages the guest hands over:

* one *control block* per vCPU (``struct evtchn_fifo_control_block``:
  ``ready`` bitmap of non-empty queues, ``head[16]`` one per priority);
* the *event array*: pages of 32-bit event words, one per port, with
  PENDING(31) MASKED(30) LINKED(29) BUSY(28) and a 17-bit LINK.

Each vCPU has one queue per priority (0 highest .. 15 lowest).  The guest
consumes from ``head``; the hypervisor appends at the tail, which it tracks
privately (``tails``).  Appending links the old tail's word to the new port
with a compare-and-swap that succeeds only while the tail is still LINKED
(the guest may unlink it concurrently); if the tail was already consumed the
queue is empty and ``head`` is written instead, followed by the queue's READY
bit and an upcall.  The guest is allowed to flip MASKED and clear
PENDING/LINKED on a linked word behind our back, so the CAS retries; setting
BUSY on the tail stops the guest unmasking it (Linux's unmask spins while
BUSY), bounding the retries.

Every guest word is touched with the atomic C helpers; guest frames are
checked to be whole RAM pages (not the special pages, not MMIO) before use.
All methods run under the domain's big lock.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.kvm._kvm_cffi import ffi as kffi
from xenkvm.kvm._kvm_cffi import lib as klib
from xenkvm.xen.abi import Errno, ffi, lib
from xenkvm.xen.errors import HypercallError

if TYPE_CHECKING:
    from xenkvm.xen.evtchn import EventChannels, Port

log = logging.getLogger(__name__)

PAGE = 4096
WORDS_PER_PAGE = PAGE // 4
NR_CHANNELS = lib.EVTCHN_FIFO_NR_CHANNELS                   # 1 << 17
MAX_ARRAY_PAGES = NR_CHANNELS // WORDS_PER_PAGE              # 128 (Xen's EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES)
NR_PRIORITIES = lib.EVTCHN_FIFO_PRIORITY_MIN + 1             # 16
PRIORITY_DEFAULT = lib.EVTCHN_FIFO_PRIORITY_DEFAULT          # 7
LINK_BITS = lib.EVTCHN_FIFO_LINK_BITS                        # 17

PENDING = 1 << lib.EVTCHN_FIFO_PENDING
MASKED = 1 << lib.EVTCHN_FIFO_MASKED
LINKED = 1 << lib.EVTCHN_FIFO_LINKED
BUSY = 1 << lib.EVTCHN_FIFO_BUSY
LINK_MASK = lib.EVTCHN_FIFO_LINK_MASK
U32 = 0xFFFFFFFF

CB_SIZE = ffi.sizeof("struct evtchn_fifo_control_block")
CB_HEAD_INDEX = ffi.offsetof("struct evtchn_fifo_control_block", "head") // 4  # head[] as u32 index
CB_READY_INDEX = ffi.offsetof("struct evtchn_fifo_control_block", "ready") // 4


def ram_page(mem, gfn: int):
    """A ``uint32_t *`` to guest frame ``gfn`` if it is a whole page of RAM, else None."""
    if not 0 <= gfn < (1 << 52):
        return None
    gpa = gfn << 12
    for r in mem.regions:
        if r.ram and r.gpa <= gpa and gpa + PAGE <= r.end:
            return kffi.cast("uint32_t *", r.host_addr + (gpa - r.gpa))
    return None


class FifoEvents:
    """FIFO state of one domain; created by the first successful EVTCHNOP_init_control."""

    def __init__(self, channels: "EventChannels", nr_vcpus: int):
        self.ch = channels
        self.mem = channels.mem
        self.array_gfns: list[int] = []
        self.pages: list = []                                   # uint32_t * per array page
        self.control: list = [None] * nr_vcpus                  # uint32_t * at each control block
        self.control_loc: list[tuple[int, int] | None] = [None] * nr_vcpus  # (gfn, offset)
        #: tail port of each (vcpu, priority) queue; 0 = empty.
        self.tails: list[list[int]] = [[0] * NR_PRIORITIES for _ in range(nr_vcpus)]
        self._expected = kffi.new("uint32_t *")

    # -- words -----------------------------------------------------------
    @property
    def num_words(self) -> int:
        return len(self.pages) * WORDS_PER_PAGE

    def word(self, port: int):
        """``uint32_t *`` to the event word of ``port``, or None when its page is not there yet."""
        page = port >> 10
        if 0 <= page < len(self.pages):
            return self.pages[page] + (port & (WORDS_PER_PAGE - 1))
        return None

    def is_pending(self, port: int) -> bool:
        w = self.word(port)
        return w is not None and bool(w[0] & PENDING)

    def is_masked(self, port: int) -> bool:
        w = self.word(port)
        return w is None or bool(w[0] & MASKED)

    def is_busy(self, port: int) -> bool:
        """A LINKED word may still be on a queue: its port must not be reused yet."""
        w = self.word(port)
        return w is not None and bool(w[0] & LINKED)

    # -- hypercalls --------------------------------------------------------
    def map_control(self, vcpu: int, gfn: int, offset: int) -> None:
        if self.control[vcpu] is not None:
            raise HypercallError(Errno.EINVAL, f"vcpu{vcpu} already has a FIFO control block")
        page = ram_page(self.mem, gfn)
        if page is None:
            raise HypercallError(Errno.EINVAL, f"control block gfn {gfn:#x} is not guest RAM")
        self.control[vcpu] = page + offset // 4
        self.control_loc[vcpu] = (gfn, offset)

    def add_array_page(self, gfn: int) -> None:
        if len(self.pages) >= MAX_ARRAY_PAGES:
            raise HypercallError(Errno.ENOSPC, "event array is full")
        page = ram_page(self.mem, gfn)
        if page is None:
            raise HypercallError(Errno.EINVAL, f"event array gfn {gfn:#x} is not guest RAM")
        first = self.num_words
        self.pages.append(page)
        self.array_gfns.append(gfn)
        # Raise events that became pending while their word did not exist.
        for port in range(first, self.num_words):
            p = self.ch.ports.get(port)
            if p is not None and p.saved_pending:
                p.saved_pending = False
                self.set_pending(p)

    # -- port operations -------------------------------------------------------
    def set_pending(self, p: "Port") -> bool:
        """Mark ``p`` pending and queue it; returns True if it was not pending before."""
        w = self.word(p.port)
        if w is None:
            p.saved_pending = True
            return True
        was = klib.xk_fetch_or32(w, PENDING) & PENDING
        v = p.vcpu
        cb = self.control[v]
        if cb is None:
            # No control block on that vCPU yet: leave it PENDING; it is
            # queued when the vCPU's control block arrives (resend).
            return not was
        if w[0] & MASKED or klib.xk_fetch_or32(w, LINKED) & LINKED:
            return not was
        prio = p.priority
        old_v, old_prio = p.last_vcpu, p.last_prio
        if old_v < len(self.tails) and self.tails[old_v][old_prio] == p.port:
            # It was the tail of its old queue, which the guest has since
            # consumed: that queue is empty now.
            self.tails[old_v][old_prio] = 0
        p.last_vcpu, p.last_prio = v, prio
        tails = self.tails[v]
        linked = False
        if tails[prio]:
            tw = self.word(tails[prio])
            if tw is not None:
                linked = self._link(tw, p.port)
        if not linked:
            cb[CB_HEAD_INDEX + prio] = p.port
        tails[prio] = p.port
        if not linked:
            bit = 1 << prio
            if not klib.xk_fetch_or32(cb + CB_READY_INDEX, bit) & bit:
                self.ch._mark_upcall(v)
        return not was

    def _link(self, tw, port: int) -> bool:
        """Point the tail word at ``port`` iff it is still LINKED (False: the queue was empty)."""
        exp = self._expected
        exp[0] = tw[0]
        if not exp[0] & LINKED:
            return False
        if klib.xk_cmpxchg32(tw, exp, (exp[0] & ~(BUSY | LINK_MASK) & U32) | port):
            return True
        # The guest changed the word under us: fence off unmasking with BUSY and retry.
        klib.xk_fetch_or32(tw, BUSY)
        exp[0] = tw[0]
        for _ in range(4):
            if not exp[0] & LINKED:
                klib.xk_fetch_and32(tw, ~BUSY & U32)
                return False
            if klib.xk_cmpxchg32(tw, exp, (exp[0] & ~(BUSY | LINK_MASK) & U32) | port):
                return True     # the new value has BUSY clear
        log.warning("FIFO: could not link port %d after the tail (guest keeps changing it)", port)
        klib.xk_fetch_and32(tw, ~BUSY & U32)
        return True

    def clear_pending(self, p: "Port") -> None:
        p.saved_pending = False
        w = self.word(p.port)
        if w is not None:
            klib.xk_fetch_and32(w, ~PENDING & U32)

    def unmask(self, p: "Port") -> None:
        w = self.word(p.port)
        if w is None:
            return
        klib.xk_fetch_and32(w, ~MASKED & U32)
        if w[0] & PENDING:
            self.set_pending(p)

    def requeue(self, vcpu: int) -> bool:
        """Queue pending, unmasked, unlinked ports bound to ``vcpu``; True if its READY is non-zero."""
        cb = self.control[vcpu]
        if cb is None:
            return False
        for p in list(self.ch.ports.values()):
            if p.vcpu != vcpu:
                continue
            w = self.word(p.port)
            if w is None:
                continue
            if p.saved_pending:
                p.saved_pending = False
                klib.xk_fetch_or32(w, PENDING)
            word = w[0]
            if word & PENDING and not word & (MASKED | LINKED):
                self.set_pending(p)
        return cb[CB_READY_INDEX] != 0

    # -- save/restore --------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "array_gfns": list(self.array_gfns),
            "control": [list(loc) if loc else None for loc in self.control_loc],
            "tails": [list(t) for t in self.tails],
        }

    @classmethod
    def from_state(cls, channels: "EventChannels", nr_vcpus: int, state: dict) -> "FifoEvents":
        f = cls(channels, nr_vcpus)
        for v, loc in enumerate(state.get("control", [])[:nr_vcpus]):
            if loc:
                f.map_control(v, int(loc[0]), int(loc[1]))
        for gfn in state.get("array_gfns", []):
            page = ram_page(f.mem, int(gfn))
            if page is None:
                raise ValueError(f"saved FIFO event array gfn {gfn:#x} is not RAM")
            f.pages.append(page)
            f.array_gfns.append(int(gfn))
        for v, t in enumerate(state.get("tails", [])[:nr_vcpus]):
            f.tails[v] = [int(x) for x in t[:NR_PRIORITIES]] + [0] * (NR_PRIORITIES - len(t[:NR_PRIORITIES]))
        return f
