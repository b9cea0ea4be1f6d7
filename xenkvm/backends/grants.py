"""The granted pages of block requests: mapped per request, or kept mapped (persistent grants).

Without ``feature-persistent`` every segment's page is mapped for one request
and unmapped when it completes (blkback's default path).  With it (io/blkif.h:
"the frontend ... will reuse the same set of grants ... the backend ... will
keep them mapped") a page is mapped once and stays mapped until the ring
disconnects: read-write if the frontend granted it so, else read-only (then
it still serves writes to disk and indirect segment lists); at most ``limit``
such pages (Linux blkback's ``max_persistent_grants`` default, 1056), beyond
which requests fall back to per-request mappings.

Kept pages are also entered in two C arrays indexed by gref: ``rw_table``
(read-write pages) and ``ro_table`` (every kept page).  block.py's C fast
path (``xkb_serve``) serves requests whose pages are all there without
Python: disk reads land in ``rw_table`` pages, disk writes and indirect
segment lists come from ``ro_table`` pages.  Entries are cleared before
their pages are unmapped.

Without persistent grants the C fast path claims each page itself for the
request's I/O (``struct xk_grants``, xk_grants.h): it reads the v1 grant
entries through the table's frames and finds the page in guest RAM, as this
mapper's :meth:`sync` last saw them (grantsnap.py; before every pass: a frame
that moved, a new frame or a version change is seen at the next).  Entries it cannot
claim (busy, not RAM, a v2 table) leave the request to the Python path.
"""
from __future__ import annotations

from xenkvm.xen.gnttab import GrantError

from ._blkif_cffi import ffi, lib
from .grantsnap import GrantSnapshot

PERSISTENT_LIMIT = 1056


class SegmentMapper:
    """Maps request pages of one frontend for one ring."""

    def __init__(self, gnttab, domid: int, persistent: bool, limit: int = PERSISTENT_LIMIT):
        self.gnttab = gnttab
        self.domid = domid
        self.persistent = persistent
        self.limit = limit
        self.kept: dict[int, object] = {}     #: gref -> GrantMapping (persistent)
        self._temp: list = []
        #: requests still in flight use the per-request pages (an NBD-served image): ``done`` does nothing until it is cleared
        self.hold = False
        #: 2 x 512 KiB with persistent grants; without, one empty slot (the C path claims instead: grants)
        self.table_size = lib.XKB_TABLE_SIZE if persistent else 1
        self.rw_table = ffi.new("char *[]", self.table_size)
        self.ro_table = ffi.new("char *[]", self.table_size)
        self._addrs: dict[int, object] = {}   #: gref -> the cffi buffer behind the table entries
        #: without persistent grants: the table and guest RAM for the C path's claims (NULL: none)
        self.snapshot = None if persistent else GrantSnapshot(gnttab, ffi, lib)

    @property
    def grants(self):
        """The ``struct xk_grants *`` C claims from (NULL with persistent grants: C claims nothing)."""
        return ffi.NULL if self.snapshot is None else self.snapshot.ptr

    def sync(self) -> None:
        """Before a C pass: the grant table's current frames for the claims (grantsnap.py)."""
        if self.snapshot is not None:
            self.snapshot.sync()

    def view(self, gref: int, writable: bool) -> memoryview:
        """The page of ``gref``; ``writable``: the backend writes it (a read from disk). GrantError."""
        m = self.kept.get(gref)
        if m is not None and (m.writable or not writable):
            return m.view
        if m is None and self.persistent and len(self.kept) < self.limit:
            m = self._keep(gref)
            if m is not None and (m.writable or not writable):
                return m.view
        m = self.gnttab.map(self.domid, gref, writable)
        self._temp.append(m)
        return m.view

    def _keep(self, gref: int):
        """Map ``gref`` for good: read-write if the grant allows, else read-only; None if neither."""
        try:
            m = self.gnttab.map(self.domid, gref, True)
        except GrantError:
            try:
                m = self.gnttab.map(self.domid, gref, False)
            except GrantError:
                return None
        self._enter(gref, m)
        return m

    def _enter(self, gref: int, m) -> None:
        """Keep mapping ``m`` of ``gref``, in the C tables too."""
        self.kept[gref] = m
        if gref < self.table_size:
            self._addrs[gref] = buf = ffi.from_buffer(m.view)
            self.ro_table[gref] = buf
            if m.writable:
                self.rw_table[gref] = buf

    def keep_again(self, gref: int, writable: bool) -> None:
        """A restored ring: map ``gref`` for good as it was kept when saved (GrantError if the
        restored grant table refuses it)."""
        self._enter(gref, self.gnttab.map(self.domid, gref, writable))

    def done(self) -> None:
        """The request completed: unmap its per-request pages (unless held for requests in flight)."""
        if self.hold:
            return
        for m in self._temp:
            m.unmap()
        self._temp.clear()

    def clear(self) -> None:
        """Disconnect: unmap everything, persistent pages included."""
        if self.grants != ffi.NULL:
            self.grants.nr_entries = 0      # the frames it held stay alive (the key) as long as the mapper
        self.done()
        for gref in self._addrs:
            self.rw_table[gref] = self.ro_table[gref] = ffi.NULL
        self._addrs.clear()
        for m in self.kept.values():
            m.unmap()
        self.kept.clear()
