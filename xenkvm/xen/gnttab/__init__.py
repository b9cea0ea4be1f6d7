"""Grant tables, versions 1 and 2: the guest's GNTTABOP_* calls and the VMM backends' API.

A domain's grant table lists the pages it lets other domains (here: the VMM's
backends, playing domain 0) read or write.  The package, layer by layer:

* :mod:`.frames`: grant frames and status frames, in VMM memory or placed in
  the guest physmap (XENMAPSPACE_grant_table), one memslot per frame outside RAM;
* :mod:`.entries`: the v1 and v2 entry codecs (layout from the compiled
  headers, busy bits GTF_reading/GTF_writing set atomically);
* :mod:`.pins`: active entries, acquire/release with Xen's GTF rules;
* :mod:`.backend`: ``map``/``map_refs``/``copy_from``/``copy_to``/
  ``copy_batch`` and :class:`GrantMapping`, with the locking rules backends follow;
* :mod:`.ops`: GNTTABOP_* decoding (guest structs in, GNTST/errno out) and the
  sub-op -> handler table;
* :mod:`.table`: :class:`GrantTable`, the facade XenDomain owns as ``domain.gnttab``.
"""
from xenkvm.xen.gnttab.backend import GrantMapping
from xenkvm.xen.gnttab.errors import GrantError
from xenkvm.xen.gnttab.frames import INVALID_GFN
from xenkvm.xen.gnttab.ops import SETUP_LIST, STATUS_LIST
from xenkvm.xen.gnttab.table import RESERVED_ENTRIES, STATUS_IDX, GrantTable

__all__ = ["GrantError", "GrantMapping", "GrantTable", "INVALID_GFN", "RESERVED_ENTRIES", "SETUP_LIST",
           "STATUS_IDX", "STATUS_LIST"]
