"""Per-domain quotas with C xenstored 4.17's defaults.

Quotas bind unprivileged domains only: dom0 and socket connections are exempt
(``domain_is_unprivileged`` in C).  Names follow ``xenstore-control quota``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Quotas:
    """Limits for unprivileged domains (defaults: xenstored_core.c:105-116, 4.17)."""

    nodes: int = 1000              # -E: nodes owned per domain -> ENOSPC
    node_size: int = 2048          # -S: record size (hdr+perms+data+children) -> ENOSPC
    watches: int = 128             # -W: watches per domain -> E2BIG (4.17)
    transactions: int = 10         # -t: open transactions per connection -> ENOSPC
    node_permissions: int = 5      # -A: entries per SET_PERMS -> ENOSPC
    transaction_nodes: int = 1024  # -Q transaction-nodes: nodes touched per tx -> ENOSPC
    path_max: int = 2048           # -M: path length below /local/domain/<id>/ -> EINVAL
    outstanding: int = 20          # -Q outstanding: unread replies before the ring is paused
    watch_events: int = 1024       # queued events per connection (oxenstored maxwatchevents)

    DESCRIPTIONS = {
        "nodes": "Nodes per domain",
        "node_size": "Max. size of a node",
        "watches": "Watches per domain",
        "transactions": "Transactions per domain",
        "node_permissions": "Max. number of permissions per node",
        "transaction_nodes": "Max. number of accessed nodes per transaction",
        "path_max": "Max. length of a node path",
        "outstanding": "Max. number of outstanding requests",
        "watch_events": "Max. number of queued watch events",
    }

    @staticmethod
    def names() -> list[str]:
        """Quota names in their wire spelling (``node-size`` ...)."""
        return [f.name.replace("_", "-") for f in fields(Quotas)]

    def get(self, name: str) -> int:
        """Value of a quota by wire name; KeyError if unknown."""
        return getattr(self, self._attr(name))

    def set(self, name: str, value: int) -> None:
        """Change a quota by wire name; KeyError if unknown, ValueError if negative."""
        if value < 0:
            raise ValueError("quota must be >= 0")
        setattr(self, self._attr(name), value)

    def report(self) -> str:
        """The ``quota`` CONTROL reply text."""
        lines = ["Quota settings:"]
        for name in self.names():
            attr = self._attr(name)
            lines.append(f"{name:<17}: {getattr(self, attr):8d} {self.DESCRIPTIONS[attr]}")
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, int]:
        """Plain mapping for the state file."""
        return {name: self.get(name) for name in self.names()}

    @staticmethod
    def _attr(name: str) -> str:
        attr = name.replace("-", "_")
        if attr not in Quotas.DESCRIPTIONS:
            raise KeyError(name)
        return attr
