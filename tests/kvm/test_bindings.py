"""The /dev/kvm bindings against the real kernel: exits, registers, debug traps, MSR exits."""
from __future__ import annotations

import errno
import os

import pytest

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.errors import KvmError
from xenkvm.kvm.system import Kvm
from xenkvm.kvm.vcpu import Vcpu
from xenkvm.kvm.vm import MsrRange, Vm
from xenkvm.machine.host import Flavour, _detect_flavour
from xenkvm.machine.memory import GuestMemory

pytestmark = pytest.mark.kvm
CODE = 0x1000


@pytest.fixture
def vm():
    kvm = Kvm()
    vm = Vm(kvm)
    yield vm
    vm.close()
    kvm.close()


def real_mode_vcpu(vm: Vm, code: bytes) -> tuple[Vcpu, GuestMemory]:
    mem = GuestMemory(4 << 20)
    mem.on_region_added(lambda r: vm.set_memory_region(r.gpa, r.size, r.host_addr))
    mem.write(CODE, code)
    vcpu = Vcpu(vm, 0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = CODE, 2
    vcpu.set_regs(regs)
    vcpu._mem = mem  # keep the backing alive as long as the vCPU
    return vcpu, mem


def test_system_answers():
    with Kvm() as kvm:
        assert kvm.vcpu_mmap_size >= 4096
        assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY)
        assert any(e[0] == 0 for e in kvm.supported_cpuid())
        assert len(kvm.msr_index_list()) > 10


def test_errors_name_ioctl_and_errno(vm):
    with pytest.raises(KvmError) as info:
        vm.set_memory_region(0x123, 4096, 0x1000)  # unaligned GPA
    assert info.value.errno == errno.EINVAL
    assert "KVM_SET_USER_MEMORY_REGION" in str(info.value) and "EINVAL" in str(info.value)


def test_port_io_exits_carry_data(vm):
    # mov al,'K'; out 0xe9,al; mov ax,0x1234; out 0x80,ax; in al,0x71
    vcpu, _ = real_mode_vcpu(vm, b"\xb0K\xe6\xe9\xb8\x34\x12\xe7\x80\xe4\x71\xeb\xfe")
    assert vcpu.run() == lib.KVM_EXIT_IO
    io = vcpu.exit_io
    assert (io.direction, io.port, io.size, bytes(vcpu.io_data())) == (lib.KVM_EXIT_IO_OUT, 0xE9, 1, b"K")
    assert vcpu.run() == lib.KVM_EXIT_IO
    assert (vcpu.exit_io.port, bytes(vcpu.io_data())) == (0x80, b"\x34\x12")
    assert vcpu.run() == lib.KVM_EXIT_IO
    assert vcpu.exit_io.direction == lib.KVM_EXIT_IO_IN and vcpu.exit_io.port == 0x71
    vcpu.io_data()[0] = 0x5A
    vcpu.set_immediate_exit(True)
    assert vcpu.run() == lib.KVM_EXIT_INTR  # completes the IN, then stops at once
    vcpu.set_immediate_exit(False)
    assert vcpu.get_regs().rax & 0xFF == 0x5A


def test_port_eventfd_matches_inside_kvm(vm):
    """KVM_IOEVENTFD (the send stub's kicks, xen/sendstub.py): a 4-byte ``out`` of the matched
    value signals the eventfd with no exit; another value exits as usual; binding twice is
    refused, and once removed the value exits again."""
    # mov eax,5; out 0xeb,eax; mov eax,6; out 0xeb,eax; mov eax,5; out 0xeb,eax; jmp $
    code = (b"\x66\xb8\x05\x00\x00\x00\x66\xe7\xeb" b"\x66\xb8\x06\x00\x00\x00\x66\xe7\xeb"
            b"\x66\xb8\x05\x00\x00\x00\x66\xe7\xeb\xeb\xfe")
    vcpu, _ = real_mode_vcpu(vm, code)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.port_eventfd(0xEB, 4, 5, fd)
        with pytest.raises(KvmError) as info:
            vm.port_eventfd(0xEB, 4, 5, fd)
        assert info.value.errno == errno.EEXIST
        assert vcpu.run() == lib.KVM_EXIT_IO                        # the 6: not matched
        assert (vcpu.exit_io.port, bytes(vcpu.io_data())) == (0xEB, b"\x06\x00\x00\x00")
        assert os.eventfd_read(fd) == 1                             # the first 5, inside KVM
        vm.port_eventfd(0xEB, 4, 5, fd, assign=False)
        assert vcpu.run() == lib.KVM_EXIT_IO                        # the second 5 exits now
        assert bytes(vcpu.io_data()) == b"\x05\x00\x00\x00"
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


def test_sync_regs_fixup_without_extra_ioctls(vm):
    # out 0xe9,al twice: between the exits we change AL through kvm_run only
    vcpu, _ = real_mode_vcpu(vm, b"\xe6\xe9\xe6\xe9\xeb\xfe")
    if not vcpu.has_sync_regs:
        pytest.skip("host has no KVM_CAP_SYNC_REGS")
    assert vcpu.run() == lib.KVM_EXIT_IO
    regs = vcpu.sync_regs()
    # PVM exits with RIP past the OUT; hardware KVM leaves RIP on it and skips it when the next
    # KVM_RUN completes the I/O (Linux x86.c, complete_fast_pio_out), as long as RIP is unchanged.
    assert regs.rip == (CODE + 2 if _detect_flavour() is Flavour.PVM else CODE)
    regs.rax = 0x77
    vcpu.mark_regs_dirty(regs)
    assert vcpu.run() == lib.KVM_EXIT_IO
    assert bytes(vcpu.io_data()) == b"\x77"


@pytest.mark.breakpoint
def test_hardware_breakpoint_exits_before_instruction(vm):
    vcpu, _ = real_mode_vcpu(vm, b"\x90\x90\x90\xe6\xe9\xeb\xfe")
    vcpu.set_guest_debug([CODE + 2])
    assert vcpu.run() == lib.KVM_EXIT_DEBUG
    assert vcpu.exit_debug.pc == CODE + 2
    vcpu.set_guest_debug([])
    assert vcpu.run() == lib.KVM_EXIT_IO


def test_user_space_msr_exit(vm):
    # mov ecx,0x40000000; xor eax,eax; xor edx,edx; mov al,0x42; wrmsr
    code = b"\x66\xb9\x00\x00\x00\x40\x66\x31\xc0\x66\x31\xd2\xb0\x42\x0f\x30\xe6\xe9\xeb\xfe"
    if not vm.kvm.check_extension(lib.KVM_CAP_X86_USER_SPACE_MSR):
        pytest.skip("no KVM_CAP_X86_USER_SPACE_MSR")
    vm.enable_user_space_msr(lib.KVM_MSR_EXIT_REASON_UNKNOWN | lib.KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter([MsrRange(0x4000_0000, 1, read=False)])
    vcpu, _ = real_mode_vcpu(vm, code)
    assert vcpu.run() == lib.KVM_EXIT_X86_WRMSR
    assert vcpu.exit_msr.index == 0x4000_0000 and vcpu.exit_msr.data == 0x42
    vcpu.exit_msr.error = 0
    assert vcpu.run() == lib.KVM_EXIT_IO  # the wrmsr completed, execution went on


def test_translate_and_state_roundtrips(vm):
    vcpu, _ = real_mode_vcpu(vm, b"\xeb\xfe")
    assert vcpu.translate(0x1234) == 0x1234  # no paging
    vcpu.set_cpuid([(0, 0, 0, 1, 2, 3, 4)])
    assert (0, 0, 0, 1, 2, 3, 4) in vcpu.get_cpuid()
    vcpu.set_msrs({0x2FF: 0xC06})
    assert vcpu.get_msrs([0x2FF])[0x2FF] == 0xC06
    assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE


def test_in_kernel_irqchip_and_msi(vm):
    vm.create_irqchip()
    vm.create_pit2()
    vcpu, _ = real_mode_vcpu(vm, b"\xeb\xfe")
    assert len(vcpu.get_lapic()) == 1024
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    assert vm.signal_lapic_vector(0, 0x40) >= 0
