"""Hypercall handlers, one module per family; ``register_all`` wires them to the dispatcher.

Event channels, timers and grant tables register their own handlers (their
modules own that state); these modules cover the rest.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from xenkvm.xen.hypercalls import console, hvm, memory, misc, sched, vcpu, version

if TYPE_CHECKING:
    from xenkvm.xen.domain import XenDomain


def register_all(domain: "XenDomain") -> None:
    for module in (version, memory, hvm, vcpu, sched, console, misc):
        module.register(domain)
