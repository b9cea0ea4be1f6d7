"""xen/limits.py: the named caps and the memslot share a VM can give a guest."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from xenkvm.xen.limits import MACHINE_MEMSLOTS, Limits, of


def test_defaults_are_xens_for_a_domu():
    lim = Limits()
    assert (lim.max_grant_frames, lim.max_maptrack_frames, lim.max_evtchn_port) == (64, 1024, 1023)
    assert lim.max_maptrack_entries == 1024 * 256


@pytest.mark.parametrize("field", ["max_grant_frames", "max_maptrack_frames", "max_evtchn_port"])
def test_nonsense_limits_are_refused(field):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})
    with pytest.raises(ValueError):
        Limits(max_guest_memslots=-1)


def test_memslot_share_is_what_the_vm_has_left():
    vm = SimpleNamespace(nr_memslots=509, slots_used=3)
    assert Limits().for_vm(vm).max_guest_memslots == 128
    vm.nr_memslots = MACHINE_MEMSLOTS + 40
    assert Limits().for_vm(vm).max_guest_memslots == 40
    vm.slots_used = MACHINE_MEMSLOTS + 10          # a machine using more than the reserve
    assert Limits().for_vm(vm).max_guest_memslots == 30
    assert Limits(max_guest_memslots=5).for_vm(vm).max_guest_memslots == 5


def test_of_gives_defaults_to_domains_without_limits():
    assert of(SimpleNamespace()) == Limits()
    own = Limits(max_evtchn_port=7)
    assert of(SimpleNamespace(limits=own)) is own
