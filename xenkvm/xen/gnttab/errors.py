"""GrantError: a grant access refused, with the GNTST_* code Xen gives in the same case."""
from __future__ import annotations

from xenkvm.xen.abi import Gntst


class GrantError(Exception):
    """A grant access refused; ``status`` is the GNTST_* code (negative)."""

    def __init__(self, status: int, why: str = ""):
        self.status = int(status)
        super().__init__(f"{Gntst(self.status).name}: {why}" if why else Gntst(self.status).name)
