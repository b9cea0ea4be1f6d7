"""The grant API the VMM's backends (block, net, console, xenstore) call.

A backend in the VMM plays the mapping domain (``backend``, domid 0 by
default) and names pages by the granting domain's domid and grant ref:

* ``copy_from(domid, ref, offset, length)`` -> bytes and
  ``copy_to(domid, ref, offset, data)``: one pinned access, released before
  returning (Xen's GNTTABOP_copy from the backend's side);
* ``copy_batch(domid, segments, to_guest=...)``: several (ref, offset, host
  buffer) segments in one go, e.g. the segments of a block request, copied
  between the granted pages and host memoryviews without intermediate bytes;
  every segment is checked and pinned before any byte moves, so a refused
  segment leaves all of them untouched;
* ``map(domid, ref, writable)`` -> :class:`GrantMapping` and
  ``map_refs(domid, refs, writable)`` (all or none): the entry stays pinned
  (GTF_reading, and GTF_writing when writable) until ``unmap()``; for shared
  rings and long-lived buffers.

Errors: every refusal raises :class:`GrantError` with the ``GNTST_*`` code Xen
gives: ``bad_domain`` (no such granter), ``bad_gntref`` (ref past the table),
``general_error`` (entry not granted to ``backend``, read-only, revoked while
pinning, unstable, outside a sub-page grant), ``bad_copy_arg`` (offset +
length beyond the page), ``bad_page`` (the granted frame is not guest
memory), ``no_space`` (all ``Limits.max_maptrack_entries`` mappings in use).

Locking rules:

* every call takes ``domain.lock`` (the domain's big, re-entrant lock) for
  the table work; a copy also holds it for the copy itself (at most a page a
  segment, memory to memory), never across the backend's I/O;
* do not hold ``domain.lock`` across I/O (disk, socket): map (or copy into a
  host buffer), release the lock, do the I/O on the mapping's ``view`` or the
  buffer, then copy back / unmap;
* a :class:`GrantMapping`'s ``view`` is valid from ``map()`` until
  ``unmap()``; the guest's ``gnttab_end_foreign_access`` sees the entry busy
  that long, and the page is not reused under the backend.  ``unmap()`` is
  idempotent and may be called from any thread;
* a backend tearing down (frontend closed, domain destroyed) must unmap every
  mapping it holds: a mapping left behind keeps its entry busy and uses one
  of the domain's maptrack entries until then.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from xenkvm.xen.abi import PAGE_SIZE, Gntst
from xenkvm.xen.gnttab.errors import GrantError

if TYPE_CHECKING:
    from xenkvm.xen.gnttab.pins import Pin, Pins

#: One segment of :meth:`BackendApi.copy_batch`: (ref, offset in the granted page, host buffer).
Segment = tuple[int, int, memoryview]


class GrantMapping:
    """A backend's mapping of one granted page; ``unmap()`` (or leaving ``with``) ends it."""

    def __init__(self, table: "BackendApi", ref: int, writable: bool, gfn: int, view: memoryview):
        self.table = table
        self.ref = ref
        self.writable = writable
        self.gfn = gfn
        self.view = view if writable else view.toreadonly()
        self.mapped = True

    def unmap(self) -> None:
        """Drop the pin (clears GTF_reading/GTF_writing when it was the last); safe to repeat."""
        with self.table.domain.lock:
            if not self.mapped:
                return
            self.mapped = False
            self.table.mappings -= 1
            try:
                self.view.release()
            except BufferError:   # someone still holds an export of it; it stays readable
                pass
            self.table.pins.release(self.ref, not self.writable)

    def __enter__(self) -> "GrantMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.unmap()

    def __repr__(self) -> str:
        return (f"GrantMapping(ref={self.ref}, gfn={self.gfn:#x}, {'rw' if self.writable else 'ro'}, "
                f"mapped={self.mapped})")


def _check_bounds(offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
        raise GrantError(Gntst.bad_copy_arg, f"{offset}+{length} beyond the page")


def _check_range(act: "Pin", offset: int, length: int, ref: int) -> None:
    """Xen (acquire_grant_for_copy users): a copy must stay inside a sub-page grant's range."""
    if offset < act.page_off or offset + length > act.page_off + act.length:
        raise GrantError(Gntst.general_error,
                         f"ref {ref}: {offset}+{length} outside the grant {act.page_off}+{act.length}")


class BackendApi:
    """The backend half of :class:`~xenkvm.xen.gnttab.table.GrantTable` (mixed into it)."""

    domain: object
    pins: "Pins"
    mappings: int
    max_mappings: int

    @property
    def domid(self) -> int:
        return self.domain.domid

    def _check_granter(self, domid: int) -> None:
        if domid != self.domid:
            raise GrantError(Gntst.bad_domain, f"no grant table for d{domid}")

    def copy_from(self, domid: int, ref: int, offset: int, length: int, *, backend: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset`` of the page domain ``domid`` granted to ``backend`` as ``ref``."""
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            _check_bounds(offset, length)
        with self.domain.lock:
            if domid != self.domain.domid:
                self._check_granter(domid)
            act = self.pins.acquire(ref, backend, True, False)
            try:
                if offset < act.page_off or offset + length > act.page_off + act.length:
                    _check_range(act, offset, length, ref)
                return bytes(act.page[offset:offset + length])
            finally:
                self.pins.release(ref, True)

    def copy_to(self, domid: int, ref: int, offset: int, data: bytes | bytearray | memoryview,
                *, backend: int = 0) -> None:
        """Write ``data`` at ``offset`` of the granted page (the grant must not be read-only)."""
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            _check_bounds(offset, len(data))
        with self.domain.lock:
            if domid != self.domain.domid:
                self._check_granter(domid)
            act = self.pins.acquire(ref, backend, False, False)
            end = offset + len(data)
            try:
                if offset < act.page_off or end > act.page_off + act.length:
                    _check_range(act, offset, len(data), ref)
                act.page[offset:end] = data
            finally:
                self.pins.release(ref, False)

    def copy_batch(self, domid: int, segments: Iterable[Segment], *, to_guest: bool,
                   backend: int = 0) -> int:
        """Copy each segment's host buffer to (``to_guest``) or from its granted page range.

        A segment is (ref, offset, buf): ``len(buf)`` bytes at ``offset`` of ref's page; ``buf``
        must be writable when reading from the guest.  All segments are checked and pinned
        first, then copied, then released: on a GrantError no byte moved.  Returns the bytes
        copied.
        """
        segs = [(ref, off, memoryview(buf).cast("B")) for ref, off, buf in segments]
        for _, off, buf in segs:
            _check_bounds(off, len(buf))
        with self.domain.lock:
            self._check_granter(domid)
            pinned: list[int] = []
            try:
                pages = []
                for ref, off, buf in segs:
                    act = self.pins.acquire(ref, backend, not to_guest, False)
                    pinned.append(ref)
                    _check_range(act, off, len(buf), ref)
                    pages.append(act.page)
                return self._move(segs, pages, to_guest)
            finally:
                for ref in reversed(pinned):
                    self.pins.release(ref, not to_guest)

    @staticmethod
    def _move(segs: list, pages: list[memoryview], to_guest: bool) -> int:
        total = 0
        for (_, off, buf), page in zip(segs, pages):
            n = len(buf)
            if to_guest:
                page[off:off + n] = buf
            else:
                buf[:] = page[off:off + n]
            total += n
        return total

    def map(self, domid: int, ref: int, writable: bool, *, backend: int = 0) -> GrantMapping:
        """Map the whole granted page; the entry stays pinned (flags set) until ``unmap()``.

        At most ``max_mappings`` live at once (Xen's maptrack limit of the mapping
        domain: past it, map_grant_ref reports GNTST_no_space).
        """
        with self.domain.lock:
            if domid != self.domain.domid:
                self._check_granter(domid)
            if self.mappings >= self.max_mappings:
                raise GrantError(Gntst.no_space, f"all {self.max_mappings} maptrack entries in use")
            act = self.pins.acquire(ref, backend, not writable, True)
            self.mappings += 1
            return GrantMapping(self, ref, writable, act.gfn, act.page[:])

    def map_refs(self, domid: int, refs: list[int], writable: bool, *, backend: int = 0) -> list[GrantMapping]:
        """Map several refs (multi-page rings): all or none."""
        done: list[GrantMapping] = []
        try:
            for ref in refs:
                done.append(self.map(domid, ref, writable, backend=backend))
        except GrantError:
            for m in done:
                m.unmap()
            raise
        return done
