"""xen_version: the version numbers, strings and feature bits the guest is told."""
from __future__ import annotations

from xenkvm.xen.abi import XenStruct, XenVer, lib
from xenkvm.xen.dispatch import Call
from xenkvm.xen.abi import Errno
from xenkvm.xen.errors import HypercallError


FEATURE_INFO = XenStruct("struct xen_feature_info")
EXTRAVERSION = b".0-xenkvm"
CAPABILITIES = b"hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"
#: What an HVM/PVH guest needs (linux.md 3.3): auto-translated physmap, the vector
#: callback, safe pvclock; and the memory_op vnode support Linux probes for.
FEATURES = ((1 << lib.XENFEAT_auto_translated_physmap) | (1 << lib.XENFEAT_hvm_callback_vector)
            | (1 << lib.XENFEAT_hvm_safe_pvclock) | (1 << lib.XENFEAT_writable_page_tables)
            | (1 << lib.XENFEAT_supervisor_mode_kernel) | (1 << lib.XENFEAT_memory_op_vnode_supported))


def _fixed_string(call: Call, gva: int, value: bytes, size: int) -> int:
    call.guest.write(gva, value[:size - 1].ljust(size, b"\0"))
    return 0


def version(call: Call, arg: int) -> int:
    major, minor = call.domain.cfg.version
    return major << 16 | minor


def extraversion(call: Call, arg: int) -> int:
    return _fixed_string(call, arg, EXTRAVERSION, 16)


def capabilities(call: Call, arg: int) -> int:
    return _fixed_string(call, arg, CAPABILITIES, 1024)


def changeset(call: Call, arg: int) -> int:
    return _fixed_string(call, arg, b"xenkvm", 64)


def compile_info(call: Call, arg: int) -> int:
    # struct xen_compile_info: compiler[64], compile_by[16], compile_domain[32], compile_date[32]
    return _fixed_string(call, arg, b"xenkvm", 144)


#: Without it Linux HVM/PVH keeps its native clocksource and clockevent (linux.md 3.3).
PV_TIME = 1 << lib.XENFEAT_hvm_safe_pvclock


def features(pv_time: bool) -> int:
    """Submap 0 of the feature bits (``xen.pv_time`` false: without hvm_safe_pvclock)."""
    return FEATURES if pv_time else FEATURES & ~PV_TIME


def get_features(call: Call, arg: int) -> int:
    info = call.guest.read_struct(FEATURE_INFO, arg)
    if info.submap_idx != 0:        # XENFEAT_NR_SUBMAPS is 1: every other submap is all zero
        info.submap = 0
    else:
        info.submap = features(call.domain.cfg.pv_time)
    call.guest.write_struct(FEATURE_INFO, arg, info)
    return 0


def pagesize(call: Call, arg: int) -> int:
    return 4096


def platform_parameters(call: Call, arg: int) -> int:
    call.guest.write_u64(arg, 0xFFFF_8000_0000_0000)  # virt_start: HVM guests own all of it
    return 0


def guest_handle(call: Call, arg: int) -> int:
    call.guest.write(arg, bytes(16))  # the domain handle (a UUID): all zero
    return 0


def commandline(call: Call, arg: int) -> int:
    raise HypercallError(Errno.EPERM, "the hypervisor command line is for the privileged")


SUBOPS = {XenVer.version: version, XenVer.extraversion: extraversion, XenVer.capabilities: capabilities,
          XenVer.changeset: changeset, XenVer.compile_info: compile_info, XenVer.get_features: get_features,
          XenVer.pagesize: pagesize, XenVer.platform_parameters: platform_parameters,
          XenVer.guest_handle: guest_handle, XenVer.commandline: commandline}
