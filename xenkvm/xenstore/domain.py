"""Domain bookkeeping: which domains are introduced, their event channel,
shutdown state and SET_TARGET relation.

Without a hypervisor to ask, a domain "exists" once it has been introduced
(XS_INTRODUCE, or the VMM attaching its ring) and until it is released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .protocol import XenstoreError, XsError

if TYPE_CHECKING:
    from .connection import Connection

DOMID_SELF = 0x7FF0


@dataclass(slots=True, eq=False)
class Domain:
    """One introduced domain."""

    domid: int
    gfn: int = 0
    port: int = 0
    shutdown: bool = False
    target: int | None = None
    conn: Connection | None = None
    # Watches loaded from a state file, re-armed when the ring is attached.
    saved_watches: list[tuple[str, str, bool]] = field(default_factory=list)


class DomainTable:
    """All introduced domains, by domid."""

    def __init__(self) -> None:
        self._domains: dict[int, Domain] = {}

    def __iter__(self):
        return iter(list(self._domains.values()))

    def __len__(self) -> int:
        return len(self._domains)

    def get(self, domid: int) -> Domain | None:
        """The domain, or None if not introduced."""
        return self._domains.get(domid)

    def is_introduced(self, domid: int) -> bool:
        """IS_DOMAIN_INTRODUCED: "DOMID_SELF always gives T"; so does dom0, whose
        daemon this is (C introduces it at start-up)."""
        return domid in (0, DOMID_SELF) or domid in self._domains

    def introduce(self, domid: int, gfn: int = 0, port: int = 0) -> tuple[Domain, bool]:
        """Add or refresh a domain; returns (domain, newly_introduced)."""
        dom = self._domains.get(domid)
        if dom is not None:
            dom.gfn, dom.port = gfn or dom.gfn, port or dom.port
            return dom, False
        dom = Domain(domid, gfn, port)
        self._domains[domid] = dom
        return dom, True

    def connected(self, domid: int) -> Domain:
        """A domain argument of RELEASE/RESUME/SET_TARGET: ENOENT if not introduced."""
        if domid == 0:
            raise XenstoreError(XsError.EINVAL, "domid 0")
        dom = self._domains.get(domid)
        if dom is None:
            raise XenstoreError(XsError.ENOENT, f"domain {domid} not introduced")
        return dom

    def remove(self, domid: int) -> Domain | None:
        """Forget a domain (RELEASE)."""
        return self._domains.pop(domid, None)
