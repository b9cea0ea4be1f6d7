"""Guest-ring transport: the ``xenstore_domain_interface`` page.

KVM-agnostic: the VMM hands over one writable 4096-byte page (memoryview,
bytearray or numpy uint8 array) and a ``notify()`` callable that raises the
domain's event channel; it calls :meth:`RingConnection.kick` whenever the
guest signals.  Indices are free-running u32s; everything the guest controls is
treated as hostile: every access is masked into the page, and impossible
indices ("prod - cons > ring size") break the ring for that domain only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..sharedwords import Words
from .protocol import (RING_PAGE_SIZE, RING_SIZE, SERVER_FEATURE_ERROR,
                       SERVER_FEATURE_RECONNECTION, XENSTORE_CONNECTED, XENSTORE_RECONNECT,
                       FrameDecoder, ProtocolError, RingError)

if TYPE_CHECKING:
    from .connection import Connection
    from .dispatch import Xenstored

log = logging.getLogger(__name__)

# Offsets in struct xenstore_domain_interface (xs_wire.h; checked against the
# C header by tests/xenstore/test_ring.py).
REQ_OFFSET = 0
RSP_OFFSET = 1024
REQ_CONS = 2048
REQ_PROD = 2052
RSP_CONS = 2056
RSP_PROD = 2060
SERVER_FEATURES = 2064
CONNECTION = 2068
ERROR = 2072

_MASK = 0xFFFFFFFF
_RING_MASK = RING_SIZE - 1
FEATURES = SERVER_FEATURE_RECONNECTION | SERVER_FEATURE_ERROR


def as_page(page: object) -> memoryview:
    """A flat, writable, byte-format view of exactly one 4096-byte page."""
    view = memoryview(page)
    if view.readonly:
        raise ValueError("ring page must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes != RING_PAGE_SIZE:
        raise ValueError(f"ring page must be {RING_PAGE_SIZE} bytes, got {view.nbytes}")
    return view


class RingConnection:
    """A domain's xenstore connection over its shared ring page."""

    def __init__(self, core: Xenstored, conn: Connection, page: object,
                 notify: Callable[[], None]) -> None:
        self.core = core
        self.conn = conn
        self.domid = conn.domid
        self.page = as_page(page)
        #: the index words, each read and written whole (sharedwords.py: why not struct)
        self.words = Words(self.page)
        self.notify = notify
        self.broken: RingError | None = None
        self._decoder = FrameDecoder()
        self._batch = False          # inside process(): notify once at the end
        self._notify_pending = False
        #: the req_cons we last wrote: only the store moves it, so a page that disagrees was written
        #: by someone else (a guest bug or attack, or a lost page); logged once, for the diagnosis
        self._req_cons: int | None = None
        self._cons_warned = False
        #: while set (a snapshot is saving guest RAM: xenstore/domstate.py) the page is not touched
        self.held = False
        conn.transport = self
        # "guarantee to advertise the feature before producing or consuming any data"
        self.words.set(SERVER_FEATURES, self.words.get(SERVER_FEATURES) | FEATURES)

    def __repr__(self) -> str:
        return f"<RingConnection dom{self.domid}{' broken' if self.broken else ''}>"

    # ------------------------------------------------------------ VMM entry points
    def kick(self) -> None:
        """The guest signalled the event channel: process requests, push replies."""
        with self.core.lock:
            self.process()

    def process(self) -> None:
        """Consume complete requests, dispatch them and write replies (lock held)."""
        if self.conn.closed or self.held:
            return          # released (the page is no longer ours to touch) or held
        self._batch = True
        try:
            if self.words.get(CONNECTION) == XENSTORE_RECONNECT:
                self._reconnect()
            while self.broken is None and not self.conn.closed:
                consumed = self._read_requests()
                self.core.flush()
                # Replies may have been held back by a full ring; freeing them
                # can also lift the outstanding-requests throttle.
                written = self._write_responses()
                if written:
                    self._signal()
                if not consumed and not written:
                    break
        finally:
            self._batch = False
        if self._notify_pending:
            self._notify_pending = False
            self.notify()

    def flush(self) -> None:
        """Transport API: copy queued output into the response ring."""
        if self.broken is not None or self.conn.closed or self.held:
            return
        if self._write_responses():
            self._signal()

    def reset(self) -> None:
        """Forget connection state and empty both queues (re-INTRODUCE)."""
        with self.core.lock:
            self.core.reset_connection(self.conn)
            self._decoder.reset()
            self._zero_indexes()
            self.broken, self._req_cons = None, 0

    def pending_input(self) -> bytes:
        """Request bytes taken from the ring that are not yet a whole message (snapshots)."""
        return self._decoder.pending()

    def feed_input(self, data: bytes) -> None:
        """Give back :meth:`pending_input` of a saved connection (a restored domain's ring)."""
        self._decoder.feed(data)

    # ------------------------------------------------------------ input
    def _read_requests(self) -> bool:
        """Dispatch requests until the ring is empty or the domain is throttled."""
        core, conn, decoder = self.core, self.conn, self._decoder
        limit = None if conn.privileged else core.quotas.outstanding
        progress = False
        while self.broken is None and not conn.closed:
            # Outstanding-requests quota: stop reading while replies pile up.
            if limit is not None and conn.out.replies >= limit:
                break
            try:
                msg = decoder.next()
                if msg is None:
                    want = decoder.need()
            except ProtocolError as exc:
                self._fail(RingError.PROTO, str(exc))
                break
            if msg is not None:
                core.handle(conn, msg)
                progress = True
            elif not self._pull(want):
                break
            else:
                progress = True
        return progress

    def _pull(self, want: int) -> int:
        """Move up to ``want`` request bytes from the ring into the decoder."""
        page, words = self.page, self.words
        cons, prod = words.get(REQ_CONS), words.get(REQ_PROD)
        if self._req_cons is not None and cons != self._req_cons and not self._cons_warned:
            self._cons_warned = True
            log.warning("dom%d: xenstore req_cons is %d in the page, the store wrote %d (req_prod %d)",
                        self.domid, cons, self._req_cons, prod)
        avail = (prod - cons) & _MASK
        if avail > RING_SIZE:
            self._fail(RingError.RINGIDX, f"req cons={cons} prod={prod}")
            return 0
        count = min(avail, want)
        if not count:
            return 0
        start = cons & _RING_MASK
        first = min(count, RING_SIZE - start)
        self._decoder.feed(page[REQ_OFFSET + start:REQ_OFFSET + start + first])
        if count > first:
            self._decoder.feed(page[REQ_OFFSET:REQ_OFFSET + count - first])
        self._req_cons = (cons + count) & _MASK
        words.set(REQ_CONS, self._req_cons)
        self._signal()
        return count

    # ------------------------------------------------------------ output
    def _write_responses(self) -> int:
        """Copy as much queued output as fits; returns bytes written."""
        page, words, out = self.page, self.words, self.conn.out
        written = 0
        while out:
            cons, prod = words.get(RSP_CONS), words.get(RSP_PROD)
            used = (prod - cons) & _MASK
            if used > RING_SIZE:
                self._fail(RingError.RINGIDX, f"rsp cons={cons} prod={prod}")
                return written
            data = out.chunk(RING_SIZE - used)
            if not data:
                break
            start = prod & _RING_MASK
            first = min(len(data), RING_SIZE - start)
            page[RSP_OFFSET + start:RSP_OFFSET + start + first] = data[:first]
            if len(data) > first:
                page[RSP_OFFSET:RSP_OFFSET + len(data) - first] = data[first:]
            # Data before index: the guest reads rsp_prod, then the bytes.
            words.set(RSP_PROD, prod + len(data))
            out.advance(len(data))
            written += len(data)
        return written

    def _signal(self) -> None:
        if self._batch:
            self._notify_pending = True
        else:
            self.notify()

    # ------------------------------------------------------------ errors
    def _fail(self, error: RingError, detail: str) -> None:
        """Stop talking to this ring: record the error in the page, drop state."""
        log.error("dom%d: xenstore ring broken (%s): %s", self.domid, error.name, detail)
        self.broken = error
        self.words.set(ERROR, error)
        self.core.reset_connection(self.conn)
        self._decoder.reset()

    def _zero_indexes(self) -> None:
        """Both rings empty, no error: what a fresh or reconnected ring starts from."""
        for off in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
            self.words.set(off, 0)
        self.words.set(ERROR, RingError.NONE)

    def _reconnect(self) -> None:
        """Ring reconnection: discard packets, queues, watches and transactions,
        empty both queues, "set the Connection state to 0" and signal."""
        log.info("dom%d: xenstore ring reconnect", self.domid)
        self.core.reset_connection(self.conn)
        self._decoder.reset()
        self._zero_indexes()
        self.broken, self._req_cons = None, 0
        self.words.set(CONNECTION, XENSTORE_CONNECTED)
        self._notify_pending = True
