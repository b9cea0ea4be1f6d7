"""A backend thread's view of the grant table for C claims (``struct xk_grants``, xk_grants.h).

C data paths (block requests in ``xkb_pass``, vif packets in ``xkg_copy``)
claim v1 grant entries themselves, without the domain lock: they read the
entries through the table's shared frames and find the granted page in guest
RAM.  :class:`GrantSnapshot` hands them both: guest RAM once (RAM regions never
leave while the VM lives) and the table's frame storage whenever it changed
(:meth:`sync`, before every pass: a grown table, a frame that moved or a
version change is seen at the next pass; a v2 table gives C no entries, so
every segment goes to the Python path).  The snapshot holds the frame
objects it handed over, so their storage outlives any pass that uses them.
A guest that rewrites its table under an in-flight claim can only hurt its own
pages, as with Xen's own backends.
"""
from __future__ import annotations

BACKEND_DOMID = 0        #: the domain grants name as the grantee: the VMM's backends are dom0


class GrantSnapshot:
    """One ``struct xk_grants`` of the cffi module (``ffi``, ``lib``) whose C claims from it."""

    def __init__(self, gnttab, ffi, lib):
        self.gnttab = gnttab
        self.lib = lib
        self.ptr = ffi.gc(lib.xk_grants_new(), lib.xk_grants_free)
        self._key: tuple = ()     #: (codec, frame storage pointers) last synced; holds them
        self._ram: list = []      #: the RAM pointers in ``ptr`` (held; set by the first sync)

    def _sync_ram(self) -> None:
        mem, g = self.gnttab.mem, self.ptr
        regions = mem.ram_regions()[:self.lib.XK_GNT_RAM_SLOTS]
        self._ram = [mem.cptr(r.gpa, r.size) for r in regions]
        for i, (r, base) in enumerate(zip(regions, self._ram)):
            g.ram[i].first, g.ram[i].count, g.ram[i].base = r.gpa >> 12, r.size >> 12, base
        g.nr_ram = len(regions)
        g.domid = BACKEND_DOMID

    def sync(self) -> None:
        """Before a C pass: the grant table's v1 frames, if they changed since the last one."""
        codec = self.gnttab.codec
        ptrs = [f.ptr for f in self.gnttab.physmap.shared]   # one copy: a vCPU may grow the table meanwhile
        key = (codec, *ptrs)
        if key == self._key:
            return
        if not self._ram:
            self._sync_ram()
        g = self.ptr
        g.nr_entries = 0
        if codec.version == 1 and len(ptrs) <= self.lib.XK_GNT_MAX_FRAMES:
            for i, ptr in enumerate(ptrs):
                g.frames[i] = ptr
            g.nr_entries = len(ptrs) * self.lib.XK_GNT_PER_FRAME
        self._key = key
