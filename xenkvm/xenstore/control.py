"""XS_CONTROL subcommands (privileged only): what a toolstack uses to inspect
the daemon, its quotas and per-domain usage (``xenstore-control <cmd>``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .protocol import XenstoreError, XsError, c_strtoul0

if TYPE_CHECKING:
    from .dispatch import Xenstored

log = logging.getLogger(__name__)
OK = b"OK\0"


def _text(reply: str) -> bytes:
    """Control replies are NUL-terminated text."""
    return reply.encode() + b"\0"


def _help(core: Xenstored, args: list[str]) -> bytes:
    """List the supported commands."""
    return _text("Supported commands:\n" + "".join(
        f"{name} {usage}\n" for name, (_, usage) in COMMANDS.items()))


def _check(core: Xenstored, args: list[str]) -> bytes:
    """Verify the tree: every child exists, every node is reachable."""
    problems = core.store.check()
    for problem in problems:
        log.error("store check: %s", problem)
    return OK if not problems else _text("\n".join(problems))


def _log(core: Xenstored, args: list[str]) -> bytes:
    """``log on|off``: debug logging of requests."""
    if len(args) != 1 or args[0] not in ("on", "off"):
        raise XenstoreError(XsError.EINVAL, "log on|off")
    logging.getLogger("xenkvm.xenstore").setLevel(
        logging.DEBUG if args[0] == "on" else logging.NOTSET)
    return OK


def _print(core: Xenstored, args: list[str]) -> bytes:
    """``print <string>``: write a line to the daemon log."""
    if len(args) != 1:
        raise XenstoreError(XsError.EINVAL, "print <string>")
    log.info("control: %s", args[0])
    return OK


def _memreport(core: Xenstored, args: list[str]) -> bytes:
    """Object counts instead of talloc's report."""
    store = core.store
    size = sum(n.record_size() for n in store.nodes.values())
    return _text(f"nodes: {len(store.nodes)}\nbytes: {size}\n"
                 f"connections: {len(core.connections)}\nwatches: {len(core.watches)}\n"
                 f"domains: {len(core.domains)}\n")


def _quota(core: Xenstored, args: list[str]) -> bytes:
    """``quota``: show limits; ``quota <domid>``: a domain's usage;
    ``quota <name> <value>``: change a limit."""
    if not args:
        return _text(core.quotas.report())
    if len(args) == 1:
        domid = c_strtoul0(args[0])
        if domid is None:
            raise XenstoreError(XsError.EINVAL, "quota <domid>")
        return _text(_domain_usage(core, domid))
    if len(args) == 2:
        value = c_strtoul0(args[1])
        try:
            if value is None:
                raise ValueError(args[1])
            core.quotas.set(args[0], value)
        except (KeyError, ValueError) as exc:
            raise XenstoreError(XsError.EINVAL, f"quota {args[0]}") from exc
        return OK
    raise XenstoreError(XsError.EINVAL, "quota [<domid>|<name> <value>]")


def _quota_soft(core: Xenstored, args: list[str]) -> bytes:
    """Soft quotas (warnings only) are not implemented: report none."""
    if args:
        raise XenstoreError(XsError.EINVAL, "no soft quotas")
    return _text("Soft quota settings:\n")


def _domain_usage(core: Xenstored, domid: int) -> str:
    """Per-domain accounting as ``quota <domid>`` reports it."""
    dom = core.domains.get(domid)
    if dom is None and domid != 0:
        raise XenstoreError(XsError.ENOENT, f"domain {domid}")
    conn = dom.conn if dom is not None else None
    rows = {
        "nodes": core.store.owned(domid),
        "watches": len(conn.watches) if conn else 0,
        "transactions": len(conn.transactions) if conn else 0,
        "outstanding": conn.out.replies if conn else 0,
    }
    return f"Domain {domid}:\n" + "".join(f"{k:<17}: {v:8d}\n" for k, v in rows.items())


COMMANDS: dict[str, tuple[Callable[[Xenstored, list[str]], bytes], str]] = {
    "check": (_check, ""),
    "help": (_help, ""),
    "log": (_log, "on|off"),
    "memreport": (_memreport, ""),
    "print": (_print, "<string>"),
    "quota": (_quota, "[<domid>|<quota> <value>]"),
    "quota-soft": (_quota_soft, ""),
}


def run_control(core: Xenstored, cmd: str, args: list[str]) -> bytes:
    """Dispatch one CONTROL command; unknown commands give EINVAL."""
    entry = COMMANDS.get(cmd)
    if entry is None:
        raise XenstoreError(XsError.EINVAL, f"unknown control command {cmd!r}")
    return entry[0](core, args)
