"""The granted pages of block requests: mapped per request, or kept mapped (persistent grants).

Without ``feature-persistent`` every segment's page is mapped for one request
and unmapped when it completes (blkback's default path).  With it (io/blkif.h:
"the frontend ... will reuse the same set of grants ... the backend ... will
keep them mapped") a page is mapped once, read-write, and stays mapped until
the ring disconnects; at most ``limit`` such pages (Linux blkback's
``max_persistent_grants`` default, 1056), beyond which requests fall back to
per-request mappings.  A grant the frontend made read-only cannot be kept
read-write: it is mapped for the request alone.
"""
from __future__ import annotations

from xenkvm.xen.gnttab import GrantError

PERSISTENT_LIMIT = 1056


class SegmentMapper:
    """Maps request pages of one frontend for one ring."""

    def __init__(self, gnttab, domid: int, persistent: bool, limit: int = PERSISTENT_LIMIT):
        self.gnttab = gnttab
        self.domid = domid
        self.persistent = persistent
        self.limit = limit
        self.kept: dict[int, object] = {}     #: gref -> GrantMapping (read-write, persistent)
        self._temp: list = []

    def view(self, gref: int, writable: bool) -> memoryview:
        """The page of ``gref``; ``writable``: the backend writes it (a read from disk). GrantError."""
        m = self.kept.get(gref)
        if m is not None:
            return m.view
        if self.persistent and len(self.kept) < self.limit:
            try:
                m = self.gnttab.map(self.domid, gref, True)
            except GrantError:
                if writable:
                    raise
            else:
                self.kept[gref] = m
                return m.view
        m = self.gnttab.map(self.domid, gref, writable)
        self._temp.append(m)
        return m.view

    def done(self) -> None:
        """The request completed: unmap its per-request pages."""
        for m in self._temp:
            m.unmap()
        self._temp.clear()

    def clear(self) -> None:
        """Disconnect: unmap everything, persistent pages included."""
        self.done()
        for m in self.kept.values():
            m.unmap()
        self.kept.clear()
