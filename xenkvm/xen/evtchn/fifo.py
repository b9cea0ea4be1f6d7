"""FIFO event delivery (EVTCHNOP_init_control / expand_array / set_priority).

Guest-visible state lives in guest pages the guest hands over:

* one *control block* per vCPU (``struct evtchn_fifo_control_block``:
  ``ready`` bitmap of non-empty queues, ``head[16]`` one per priority);
* the *event array*: pages of 32-bit event words, one per port, with
  PENDING(31) MASKED(30) LINKED(29) BUSY(28) and a 17-bit LINK.

Xen's rules (``common/event_fifo.c``), kept here: each vCPU has one queue
per priority (0 highest .. 15 lowest).  The guest consumes from ``head``; the
hypervisor appends at the tail, which it tracks privately.  Appending links
the old tail's word to the new port with a compare-and-swap that succeeds
only while the tail is still LINKED (the guest may unlink it concurrently);
if the tail was already consumed the queue is empty and ``head`` is written
instead, then the queue's READY bit, then the upcall.  The guest may flip
MASKED and clear PENDING/LINKED on a linked word behind our back, so the CAS
retries; setting BUSY on the tail stops the guest unmasking it (Linux's
unmask spins while BUSY), bounding the retries.  A port whose word is still
LINKED is not handed out again (its old queue entry may still be consumed).

Every event word and READY is changed only here, atomically: on the send
path by the C helpers (``lib.xk_evtchn_fifo_*``: PENDING/LINKED, the tail's
LINK) on pointers to the pages taken when the guest hands them over, elsewhere
with GuestMemory's atomics (plain 32-bit stores for ``head``, which only Xen's
side writes while the queue is empty).  Frames must be whole guest RAM pages
(not the special pages, not MMIO), and RAM never leaves, so those pointers stay
valid.  All methods run under the domain's big lock.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from xenkvm.machine.memory import GuestMemoryError
from xenkvm.xen.abi import Errno, ffi, lib
from xenkvm.xen.errors import HypercallError

if TYPE_CHECKING:
    from xenkvm.xen.evtchn.delivery import Signal
    from xenkvm.xen.evtchn.ports import Port, PortTable

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
CB_READY = ffi.offsetof("struct evtchn_fifo_control_block", "ready")
CB_HEAD_INDEX = ffi.offsetof("struct evtchn_fifo_control_block", "head") // 4   # head[] as u32 index
CB_READY_INDEX = CB_READY // 4
LINK_RETRIES = 4            #: CAS retries on a tail the guest keeps changing (BUSY set meanwhile)

_fifo_set_pending = lib.xk_evtchn_fifo_set_pending
_set_link = lib.xk_evtchn_fifo_set_link
_or32_at = lib.xk_or32_at
_WAS_PENDING = lib.XK_FIFO_WAS_PENDING
_QUEUE = lib.XK_FIFO_QUEUE


class Fifo:
    """FIFO delivery of one domain; made by the first successful EVTCHNOP_init_control."""

    name = "fifo"
    nr_channels = NR_CHANNELS
    PRIORITY_DEFAULT = PRIORITY_DEFAULT

    def __init__(self, domain, table: "PortTable", signal: "Signal"):
        self.mem = domain.mem
        self.nr_vcpus = len(domain.vcpus)
        self.table = table
        self.signal = signal
        self.array_gfns: list[int] = []
        self.pages: list[memoryview] = []                        # u32 view per array page
        self.ptrs: list = []                                      # C pointer per array page
        #: (gpa, u32 view, C pointer to its page, offset of READY in that page) of each vCPU's control block
        self.control: list[tuple[int, memoryview, object, int] | None] = [None] * self.nr_vcpus
        self.control_loc: list[tuple[int, int] | None] = [None] * self.nr_vcpus      # (gfn, offset)
        #: tail port of each (vcpu, priority) queue; 0 = empty.
        self.tails: list[list[int]] = [[0] * NR_PRIORITIES for _ in range(self.nr_vcpus)]

    def _ram_page(self, gfn: int, what: str) -> tuple[memoryview, object]:
        """A u32 view and a C pointer of guest frame ``gfn`` if it is a whole page of RAM, else -EINVAL."""
        if 0 <= gfn < 1 << 52 and self.mem.is_ram(gfn << 12):
            try:
                return self.mem.page(gfn).cast("I"), self.mem.cptr(gfn << 12, PAGE)
            except GuestMemoryError:
                pass
        raise HypercallError(Errno.EINVAL, f"{what} gfn {gfn:#x} is not guest RAM")

    def _add_page(self, gfn: int) -> None:
        """Append guest RAM frame ``gfn`` to the event array (-EINVAL if it is not RAM)."""
        page, ptr = self._ram_page(gfn, "event array")
        self.pages.append(page)
        self.ptrs.append(ptr)
        self.array_gfns.append(gfn)

    # -- words -----------------------------------------------------------------------
    @property
    def num_words(self) -> int:
        return len(self.pages) * WORDS_PER_PAGE

    def word(self, port: int) -> int | None:
        """The event word of ``port``, or None when its page is not there yet."""
        page = port >> 10
        if 0 <= page < len(self.pages):
            return self.pages[page][port & (WORDS_PER_PAGE - 1)]
        return None

    def _gpa(self, port: int) -> int:
        return self.array_gfns[port >> 10] << 12 | (port & (WORDS_PER_PAGE - 1)) << 2

    def is_pending(self, port: int) -> bool:
        w = self.word(port)
        return w is not None and bool(w & PENDING)

    def is_masked(self, port: int) -> bool:
        w = self.word(port)
        return w is None or bool(w & MASKED)

    def is_busy(self, port: int) -> bool:
        w = self.word(port)
        return w is not None and bool(w & LINKED)

    # -- setup -------------------------------------------------------------------------
    def map_control(self, vcpu: int, gfn: int, offset: int) -> None:
        if self.control[vcpu] is not None:
            raise HypercallError(Errno.EINVAL, f"vcpu{vcpu} already has a FIFO control block")
        page, ptr = self._ram_page(gfn, "control block")
        self.control[vcpu] = ((gfn << 12) + offset, page[offset // 4:(offset + CB_SIZE) // 4], ptr, offset + CB_READY)
        self.control_loc[vcpu] = (gfn, offset)

    def init_control(self, vcpu: int, gfn: int, offset: int) -> "Fifo":
        """Another vCPU's control block: queue what is already pending for it."""
        self.map_control(vcpu, gfn, offset)
        if self.requeue(vcpu):
            self.signal.upcall(vcpu)
        return self

    def expand_array(self, gfn: int) -> None:
        if len(self.pages) >= MAX_ARRAY_PAGES:
            raise HypercallError(Errno.ENOSPC, "event array is full")
        first = self.num_words
        self._add_page(gfn)
        # Raise events that became pending while their word did not exist.
        for port in range(first, self.num_words):
            p = self.table.get(port)
            if p is not None and p.saved_pending:
                p.saved_pending = False
                self.set_pending(p)

    def set_priority(self, p: "Port | None", priority: int) -> None:
        if priority >= NR_PRIORITIES:
            raise HypercallError(Errno.EINVAL, f"priority {priority}")
        if p is not None:
            p.priority = priority      # takes effect the next time it is queued

    # -- the Delivery interface ---------------------------------------------------------
    def set_pending(self, p: "Port") -> bool:
        """Mark ``p`` pending and queue it (evtchn_fifo_set_pending); True if newly pending."""
        port = p.port
        if port >> 10 >= len(self.pages):
            p.saved_pending = True
            return True
        v = p.vcpu
        control = self.control[v]
        # PENDING, then (with a control block) LINKED unless MASKED, in C.  No control
        # block on that vCPU yet: the port stays PENDING and is queued when the
        # vCPU's control block arrives (resend).
        code = _fifo_set_pending(self.ptrs[port >> 10], port & (WORDS_PER_PAGE - 1), control is not None)
        if code & _QUEUE:
            self._enqueue(p, v, control)
        return not code & _WAS_PENDING

    def _enqueue(self, p: "Port", v: int, control: tuple[int, memoryview, object, int]) -> None:
        """Append the (now LINKED) ``p`` to its queue; READY and the upcall if it was empty."""
        prio = p.priority
        old_v, old_prio = p.last_vcpu, p.last_prio
        if old_v < len(self.tails) and self.tails[old_v][old_prio] == p.port:
            # It was the tail of its old queue, which the guest has since
            # consumed: that queue is empty now.
            self.tails[old_v][old_prio] = 0
        p.last_vcpu, p.last_prio = v, prio
        tails = self.tails[v]
        linked = bool(tails[prio]) and self.word(tails[prio]) is not None and self._link(tails[prio], p.port)
        tails[prio] = p.port
        if linked:
            return
        _, cb, page_ptr, ready_off = control
        cb[CB_HEAD_INDEX + prio] = p.port
        bit = 1 << prio
        if not _or32_at(page_ptr, ready_off, bit) & bit:
            self.signal.upcall(v)

    def _link(self, tail: int, port: int) -> bool:
        """Point ``tail``'s word at ``port`` iff it is still LINKED (False: the queue was empty).

        The compare-and-swap, BUSY fencing and bounded retries are the C helper's.
        """
        code = _set_link(self.ptrs[tail >> 10], tail & (WORDS_PER_PAGE - 1), port, LINK_RETRIES)
        if code == lib.XK_FIFO_GAVE_UP:
            log.warning("FIFO: could not link port %d after the tail (guest keeps changing it)", port)
        return code != lib.XK_FIFO_EMPTY

    def clear_pending(self, p: "Port") -> None:
        p.saved_pending = False
        if self.word(p.port) is not None:
            self.mem.atomic_and32(self._gpa(p.port), ~PENDING & U32)

    def unmask(self, port: int, p: "Port | None") -> None:
        if self.word(port) is None:
            return
        self.mem.atomic_and32(self._gpa(port), ~MASKED & U32)
        if p is not None and self.word(port) & PENDING:
            self.set_pending(p)

    def rebind(self, p: "Port") -> None:
        """Nothing to move: the port is queued on its new vCPU the next time it is raised."""

    def requeue(self, vcpu: int) -> bool:
        """Queue pending, unmasked, unlinked ports bound to ``vcpu``; True if its READY is non-zero."""
        control = self.control[vcpu]
        if control is None:
            return False
        for p in self.table:
            if p.vcpu != vcpu or self.word(p.port) is None:
                continue
            if p.saved_pending:
                p.saved_pending = False
                self.mem.atomic_or32(self._gpa(p.port), PENDING)
            word = self.word(p.port)
            if word & PENDING and not word & (MASKED | LINKED):
                self.set_pending(p)
        return control[1][CB_READY_INDEX] != 0

    resend = requeue

    def guest_frames(self) -> set[int]:
        return {loc[0] for loc in self.control_loc if loc is not None} | set(self.array_gfns)

    def describe(self, p: "Port", out: dict) -> None:
        out["priority"] = p.priority

    # -- save/restore ------------------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "array_gfns": list(self.array_gfns),
            "control": [list(loc) if loc else None for loc in self.control_loc],
            "tails": [list(t) for t in self.tails],
        }

    @classmethod
    def from_state(cls, domain, table: "PortTable", signal: "Signal", state: dict) -> "Fifo":
        f = cls(domain, table, signal)
        for v, loc in enumerate(state.get("control", [])[:f.nr_vcpus]):
            if loc:
                f.map_control(v, int(loc[0]), int(loc[1]))
        for gfn in state.get("array_gfns", []):
            try:
                f._add_page(int(gfn))
            except HypercallError:
                raise ValueError(f"saved FIFO event array gfn {gfn:#x} is not RAM") from None
        for v, t in enumerate(state.get("tails", [])[:f.nr_vcpus]):
            t = [int(x) for x in t[:NR_PRIORITIES]]
            f.tails[v] = t + [0] * (NR_PRIORITIES - len(t))
        return f
