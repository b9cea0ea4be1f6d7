"""How much a guest can make the VMM allocate: grant frames, maptrack, event channels, memslots.

Every resource a hypercall creates costs host memory, and memslots are a
per-VM kernel resource (``KVM_CAP_NR_MEMSLOTS``).  Each one has an explicit
limit here, with Xen's defaults for a domU, so that a guest asking for more
gets the error Xen gives in the same case and the VMM keeps running:

* grant table frames: ``max_grant_frames`` (Xen's ``gnttab_max_frames`` and
  libxl's default, 64).  ``GNTTABOP_setup_table`` past it reports
  ``GNTST_general_error`` (Xen: the grow fails, "Expand grant table ...
  failed"); ``XENMEM_add_to_physmap`` of a frame index past it is -EINVAL.
* maptrack entries: ``max_maptrack_frames`` (Xen's default, 1024) pages of
  16-byte ``struct grant_mapping``, 256 a page.  The VMM's backends are the
  mapping domain here; a map past the limit is ``GNTST_no_space``.
* event channel ports: ``max_evtchn_port`` (libxl's ``event_channels``
  default, 1023).  Xen's ``get_free_port`` returns -ENOSPC past it.
* memslots for grant frames placed outside RAM: ``max_guest_memslots``, at
  most what the VM has left once the machine's own regions are in
  (``KVM_CAP_NR_MEMSLOTS`` minus ``MACHINE_MEMSLOTS``).  Adding one more is
  -ENOMEM, what Xen returns when it cannot allocate the p2m entry.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_MAX_GRANT_FRAMES = 64
DEFAULT_MAX_MAPTRACK_FRAMES = 1024
MAPTRACK_PER_FRAME = 4096 // 16       #: Xen: PAGE_SIZE / sizeof(struct grant_mapping)
DEFAULT_MAX_EVTCHN_PORT = 1023
#: Memslots a guest may make us add at run time by default: every v1/v2 grant
#: frame (64 + 8 status frames) in its own slot, with room to spare.
DEFAULT_GUEST_MEMSLOTS = 128
#: Memslots kept for the machine itself (RAM low/high, special pages, devices).
MACHINE_MEMSLOTS = 16


@dataclass(frozen=True)
class Limits:
    """Per-domain caps on what hypercalls may allocate (defaults: Xen's for a domU)."""

    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES
    max_evtchn_port: int = DEFAULT_MAX_EVTCHN_PORT
    max_guest_memslots: int = DEFAULT_GUEST_MEMSLOTS

    def __post_init__(self) -> None:
        for name in ("max_grant_frames", "max_maptrack_frames", "max_evtchn_port"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.max_guest_memslots < 0:
            raise ValueError("limit max_guest_memslots must not be negative")

    @property
    def max_maptrack_entries(self) -> int:
        return self.max_maptrack_frames * MAPTRACK_PER_FRAME

    def for_vm(self, vm) -> "Limits":
        """These limits with the memslot cap lowered to what ``vm`` (a kvm.vm.Vm) can still give."""
        spare = max(0, vm.nr_memslots - max(vm.slots_used, MACHINE_MEMSLOTS))
        return replace(self, max_guest_memslots=min(self.max_guest_memslots, spare))


def of(domain) -> Limits:
    """The domain's limits (``domain.limits``; test doubles without one get the defaults)."""
    limits = getattr(domain, "limits", None)
    return limits if isinstance(limits, Limits) else Limits()
