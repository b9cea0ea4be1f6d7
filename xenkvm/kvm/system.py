"""The /dev/kvm system fd: API version, capabilities, supported CPUID and MSRs."""
from __future__ import annotations

import logging
import os
from functools import cached_property

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.errors import KvmError, check, new_varstruct

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"


class Kvm:
    """An open /dev/kvm.  Create VMs from it; close it when done."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open({path})", e.errno or 0) from None
        version = check("KVM_GET_API_VERSION", lib.xk_ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0))
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", 0, f"version {version}, need {lib.KVM_API_VERSION}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent, else cap-specific."""
        return check("KVM_CHECK_EXTENSION", lib.xk_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    @cached_property
    def vcpu_mmap_size(self) -> int:
        return check("KVM_GET_VCPU_MMAP_SIZE", lib.xk_ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0))

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """Entries of KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx)."""
        n = 128
        while True:
            _owner, buf = new_varstruct("struct kvm_cpuid2", "entries", n)
            buf.nent = n
            ret = lib.xk_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == -7:  # E2BIG: grow and retry
                n *= 2
                continue
            check("KVM_GET_SUPPORTED_CPUID", ret)
            return [
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (buf.entries[i] for i in range(buf.nent))
            ]

    def msr_index_list(self) -> list[int]:
        _o1, probe = new_varstruct("struct kvm_msr_list", "indices", 0)
        ret = lib.xk_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, probe)
        if ret not in (0, -7):
            check("KVM_GET_MSR_INDEX_LIST", ret)
        _o2, buf = new_varstruct("struct kvm_msr_list", "indices", probe.nmsrs)
        buf.nmsrs = probe.nmsrs
        check("KVM_GET_MSR_INDEX_LIST", lib.xk_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf))
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> int:
        """Return a new VM fd (wrap it in :class:`xenkvm.kvm.vm.Vm`)."""
        for _ in range(8):  # KVM_CREATE_VM can fail with EINTR
            ret = lib.xk_ioctl_val(self.fd, lib.KVM_CREATE_VM, 0)
            if ret != -4:
                return check("KVM_CREATE_VM", ret)
        return check("KVM_CREATE_VM", ret)

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
