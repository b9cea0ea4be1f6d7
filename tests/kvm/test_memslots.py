"""Memslots on a real /dev/kvm VM: GuestMemory and KVM stay consistent, slots are reused and bounded.

The grant table is driven as the guest drives it (XENMEM_add_to_physmap), with
a GuestMemory whose regions a real Vm backs, so every region it adds or drops
is a real KVM_SET_USER_MEMORY_REGION.
"""
from __future__ import annotations

import errno
import threading
from types import SimpleNamespace

import pytest

from xenkvm.kvm.errors import KvmError
from xenkvm.kvm.system import Kvm
from xenkvm.kvm.vm import Vm
from xenkvm.machine.memory import GuestMemory, RegionRefused
from xenkvm.xen.abi import Errno
from xenkvm.xen.errors import HypercallError
from xenkvm.xen.gnttab import INVALID_GFN, GrantTable
from xenkvm.xen.limits import MACHINE_MEMSLOTS, Limits

pytestmark = pytest.mark.kvm
HOLE = 0xF0000     #: a gfn in the MMIO hole (outside RAM)


@pytest.fixture
def vm():
    kvm = Kvm()
    vm = Vm(kvm)
    yield vm
    vm.close()
    kvm.close()


@pytest.fixture
def mem(vm):
    mem = GuestMemory(16 << 20)
    mem.on_region_added(vm.map_region, vm.unmap_region)
    return mem


def table(mem: GuestMemory, vm: Vm, limits: Limits = Limits()) -> GrantTable:
    dom = SimpleNamespace(mem=mem, lock=threading.RLock(), domid=1, params={}, limits=limits.for_vm(vm))
    return GrantTable(dom)


def test_vm_reads_its_memslot_count_and_reuses_slots(vm, mem):
    assert vm.nr_memslots >= 32 and vm.slots_used == 1     # ram-low
    a = mem.add_region(0xF000_0000, 0x1000, "a")
    b = mem.add_region(0xF000_1000, 0x1000, "b")
    assert (a.slot, b.slot, vm.slots_used) == (1, 2, 3)
    mem.remove_region(a)
    assert a.slot == -1 and vm.slots_used == 2
    c = mem.add_region(0xF000_0000, 0x1000, "c")           # KVM took the slot back: same gpa again
    assert c.slot == 1 and vm.slots_used == 3
    with pytest.raises(ValueError):
        vm.delete_memory_region(7)                          # never used


def test_no_slot_left_refuses_the_region_and_leaves_both_sides_unchanged(vm, mem):
    vm.nr_memslots = vm.slots_used + 1                      # one slot left
    mem.add_region(0xF000_0000, 0x1000, "last")
    regions = mem.regions
    with pytest.raises(RegionRefused) as e:
        mem.add_region(0xF000_1000, 0x1000, "one too many")
    assert isinstance(e.value.cause, KvmError) and e.value.cause.errno == errno.ENOSPC
    assert mem.regions == regions and not mem.contains(0xF000_1000) and vm.slots_used == vm.nr_memslots


def test_a_later_refusal_rolls_the_kvm_slot_back(vm, mem):
    """If something after the VM refuses a region, its memslot is deleted again: KVM would
    otherwise still map that gpa (a second region there is EEXIST)."""
    def refuse(region):
        if region.name == "refused":
            raise OSError(errno.ENOMEM, "no")
    mem.on_region_added(refuse)
    used = vm.slots_used
    with pytest.raises(RegionRefused):
        mem.add_region(0xF000_0000, 0x1000, "refused")
    assert vm.slots_used == used and not mem.contains(0xF000_0000)
    r = mem.add_region(0xF000_0000, 0x1000, "accepted")   # KVM has no slot at that gpa left over
    assert r.slot >= 0 and mem.contains(0xF000_0000)


def test_grant_frames_walking_hole_gfns_keep_one_slot_each(vm, mem):
    t = table(mem, vm)
    used = vm.slots_used
    for i in range(2000):                                   # each move is a real memslot change
        t.map_frame(i % 3, HOLE + i)
    assert vm.slots_used == used + 3 and len(mem.regions) == 1 + 3
    for gfn in (HOLE + 1997, HOLE + 1998, HOLE + 1999):
        assert t.unmap_gpfn(gfn)
    assert vm.slots_used == used and len(mem.regions) == 1


def test_kvm_out_of_slots_is_enomem_and_memory_stays_consistent(vm, mem):
    t = table(mem, vm)
    vm.nr_memslots = vm.slots_used + 2
    t.map_frame(0, HOLE)
    t.map_frame(1, HOLE + 1)
    regions, used = mem.regions, vm.slots_used
    with pytest.raises(HypercallError) as e:
        t.map_frame(2, HOLE + 2)
    assert e.value.errno == Errno.ENOMEM
    assert mem.regions == regions and vm.slots_used == used and t.frame_gfn(2) == INVALID_GFN
    t.map_frame(2, 0x100)                                   # a RAM gfn needs no slot
    t.map_frame(0, HOLE + 2)                                # moving frees HOLE's slot for HOLE + 2
    assert t.frame_gfn(0) == HOLE + 2 and not mem.contains(HOLE << 12) and vm.slots_used == used


def test_guest_memslot_cap_leaves_room_for_the_machine(vm):
    assert Limits().for_vm(vm).max_guest_memslots == min(128, vm.nr_memslots - MACHINE_MEMSLOTS)
    vm.nr_memslots = MACHINE_MEMSLOTS + 5
    assert Limits().for_vm(vm).max_guest_memslots == 5
    vm.nr_memslots = 8
    assert Limits().for_vm(vm).max_guest_memslots == 0
