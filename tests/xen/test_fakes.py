"""The shared fake domain stays what the real one is: both satisfy ``XenServiceDomain``."""
from __future__ import annotations

from typing import get_type_hints

from evtchnfakes import FakeDomain, XenServiceDomain
from xenkvm.xen.console import PrimaryConsole
from xenkvm.xen.evtchn import EventChannels
from xenkvm.xen.gnttab import GrantTable
from xenkvm.xen.store import StoreService
from xenkvm.xen.timers import VcpuTimers


def protocol_members() -> set[str]:
    hints = set(get_type_hints(XenServiceDomain))
    methods = {n for n, v in vars(XenServiceDomain).items() if callable(v) and not n.startswith("_")}
    return hints | methods


def test_the_protocol_names_what_the_services_use():
    assert {"mem", "lock", "io", "evtchn", "params", "now_ns", "monotonic_at", "special_pfn"} <= protocol_members()


def test_real_domain_satisfies_the_protocol(xen_machine):
    domain = xen_machine.xen
    assert {m for m in protocol_members() if not hasattr(domain, m)} == set()
    assert isinstance(domain, XenServiceDomain)


def test_fake_domain_satisfies_the_protocol():
    d = FakeDomain(gnttab=True, console=True, store=True)
    try:
        assert {m for m in protocol_members() if not hasattr(d, m)} == set()
        assert isinstance(d, XenServiceDomain)
        # The services are the real ones, not imitations.
        for attr, cls in (("evtchn", EventChannels), ("timers", VcpuTimers), ("gnttab", GrantTable),
                          ("console", PrimaryConsole), ("store", StoreService)):
            assert type(getattr(d, attr)) is cls, attr
    finally:
        d.close()
