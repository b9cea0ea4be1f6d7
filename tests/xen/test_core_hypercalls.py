"""The dispatcher and the core hypercalls, called as a guest would (real domain, real RAM)."""
from __future__ import annotations

import dataclasses
import struct
import time

import pytest

from xenkvm.machine.machine import ExitStatus
from xenkvm.xen.abi import Errno, EvtchnOp, HvmOp, HvmParam, Hypercall, MemOp, SchedOp, VcpuOp, XenVer, ffi, lib
from xenkvm.xen.shinfo import MSR_IA32_TSC, PVCLOCK_TSC_STABLE, TscScale, host_tsc_stable

pytestmark = pytest.mark.kvm
BUF = 0x10_0000        # scratch guest memory for hypercall arguments
SHINFO_PFN = 0x200     # guest page the tests map shared_info at


def test_version_and_features(hcall, xen_machine):
    assert hcall(Hypercall.xen_version, XenVer.version, 0) == 4 << 16 | 17
    mem = xen_machine.mem
    assert hcall(Hypercall.xen_version, XenVer.extraversion, BUF) == 0
    assert mem.read_cstr(BUF, 16).startswith(b".")
    mem.write(BUF, struct.pack("<II", 0, 0))
    assert hcall(Hypercall.xen_version, XenVer.get_features, BUF) == 0
    submap = struct.unpack_from("<I", mem.read(BUF + 4, 4))[0]
    for bit in (lib.XENFEAT_auto_translated_physmap, lib.XENFEAT_hvm_callback_vector, lib.XENFEAT_hvm_safe_pvclock):
        assert submap >> bit & 1
    mem.write(BUF, struct.pack("<II", 7, 0xFFFF))
    hcall(Hypercall.xen_version, XenVer.get_features, BUF)
    assert mem.read_u32(BUF + 4) == 0  # submaps beyond the first are empty


def test_pv_time_off_hides_safe_pvclock_only(hcall, xen_machine):
    """xen.pv_time: false keeps Linux on its native timers: only hvm_safe_pvclock goes."""
    mem = xen_machine.mem
    mem.write(BUF, struct.pack("<II", 0, 0))
    hcall(Hypercall.xen_version, XenVer.get_features, BUF)
    with_pv_time = mem.read_u32(BUF + 4)
    xen_machine.xen.cfg = dataclasses.replace(xen_machine.xen.cfg, pv_time=False)
    mem.write(BUF, struct.pack("<II", 0, 0))
    hcall(Hypercall.xen_version, XenVer.get_features, BUF)
    assert mem.read_u32(BUF + 4) == with_pv_time & ~(1 << lib.XENFEAT_hvm_safe_pvclock)
    assert with_pv_time >> lib.XENFEAT_hvm_safe_pvclock & 1


def test_errors_are_the_abi_ones(hcall):
    assert hcall(63) == -Errno.ENOSYS                       # unknown hypercall
    assert hcall(Hypercall.xen_version, 999, 0) == -Errno.ENOSYS  # unknown sub-op
    assert hcall(Hypercall.xen_version, XenVer.extraversion, 1 << 50) == -Errno.EFAULT
    assert hcall(Hypercall.xen_version, XenVer.extraversion, 0x7FF_FFFF_F000) == -Errno.EFAULT
    assert hcall(Hypercall.xen_version, XenVer.extraversion, 0x8000_0000_0000) == -Errno.EFAULT  # non-canonical
    assert hcall(Hypercall.sysctl, 0, 0) == -Errno.EPERM
    assert hcall(Hypercall.hvm_op, HvmOp.pagetable_dying, BUF) == -Errno.ENOSYS


def test_dispatcher_survives_handler_bugs(xen_machine, hcall):
    def broken(call):
        raise RuntimeError("bug")
    xen_machine.xen.dispatcher.register(60, broken)
    assert hcall(60) == -Errno.EINVAL
    assert hcall(Hypercall.xen_version, XenVer.version, 0) > 0


def map_shinfo(hcall, mem) -> int:
    req = ffi.new("struct xen_add_to_physmap *")
    req.domid, req.space, req.idx, req.gpfn = lib.DOMID_SELF, lib.XENMAPSPACE_shared_info, 0, SHINFO_PFN
    mem.write(BUF, bytes(ffi.buffer(req)))
    return hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF)


def test_shared_info_and_pvclock(hcall, xen_machine):
    mem = xen_machine.mem
    assert map_shinfo(hcall, mem) == 0
    base = SHINFO_PFN << 12
    t = base + ffi.offsetof("struct vcpu_info", "time")
    version, = struct.unpack_from("<I", mem.read(t, 4))
    mul, shift, flags = struct.unpack_from("<Ibb", mem.read(t + ffi.offsetof("struct vcpu_time_info", "tsc_to_system_mul"), 6))
    assert version % 2 == 0 and mul != 0 and flags & 1
    scale = TscScale(mul, shift)
    khz = xen_machine.xen.shinfo.tsc_khz
    assert abs(scale.ns(khz * 1000) - 1_000_000_000) < 1_000_000  # one second of ticks
    wc_sec = mem.read_u32(base + ffi.offsetof("struct shared_info", "wc_sec"))
    boot = time.time() - xen_machine.xen.now_ns() / 1e9
    assert abs(wc_sec - boot) < 2
    # the same clock the guest computes from its TSC
    st = xen_machine.xen.shinfo
    tsc_ts, sys_time = struct.unpack_from("<QQ", mem.read(t + 8, 16))
    now = sys_time + scale.ns(st.guest_tsc() - tsc_ts)
    assert abs(now - xen_machine.xen.now_ns()) < 5_000_000


def test_host_tsc_stable_reads_the_clocksource(tmp_path):
    src = tmp_path / "current_clocksource"
    src.write_text("tsc\n")
    assert host_tsc_stable(src)
    for other in ("hpet\n", "kvm-clock\n", "acpi_pm\n"):
        src.write_text(other)
        assert not host_tsc_stable(src)
    assert not host_tsc_stable(tmp_path / "missing")


def test_pvclock_stable_bit_follows_the_host(hcall, xen_machine):
    """XEN_PVCLOCK_TSC_STABLE_BIT only when the host's clocksource is the TSC (in the rig's
    2-vCPU L1 it is the HPET, and KVM moves the guest TSC offset behind our back)."""
    st = xen_machine.xen.shinfo
    assert st.tsc_stable == host_tsc_stable()
    t = (SHINFO_PFN << 12) + ffi.offsetof("struct vcpu_info", "time")
    flags_at = t + ffi.offsetof("struct vcpu_time_info", "flags")
    for stable in (False, True):
        st.tsc_stable = stable
        assert map_shinfo(hcall, xen_machine.mem) == 0      # (re)publishes every vCPU's time info
        assert xen_machine.mem.read(flags_at, 1)[0] & PVCLOCK_TSC_STABLE == stable


def test_shared_info_refuses_bad_frames(hcall, xen_machine):
    req = ffi.new("struct xen_add_to_physmap *")
    req.domid, req.space, req.idx, req.gpfn = lib.DOMID_SELF, lib.XENMAPSPACE_shared_info, 0, 0xFFFFFF
    xen_machine.mem.write(BUF, bytes(ffi.buffer(req)))
    assert hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF) == -Errno.EINVAL
    req.domid, req.gpfn = 7, SHINFO_PFN
    xen_machine.mem.write(BUF, bytes(ffi.buffer(req)))
    assert hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF) == -Errno.ESRCH
    req.domid, req.space = lib.DOMID_SELF, 99
    xen_machine.mem.write(BUF, bytes(ffi.buffer(req)))
    assert hcall(Hypercall.memory_op, MemOp.add_to_physmap, BUF) == -Errno.EOPNOTSUPP


def test_memory_map(hcall, xen_machine):
    mem = xen_machine.mem
    mem.write(BUF, struct.pack("<IIQ", 1, 0, BUF + 0x100))  # room for one entry: too small
    assert hcall(Hypercall.memory_op, MemOp.memory_map, BUF) == -Errno.ENOBUFS
    mem.write(BUF, struct.pack("<IIQ", 16, 0, BUF + 0x100))
    assert hcall(Hypercall.memory_op, MemOp.memory_map, BUF) == 0
    n = mem.read_u32(BUF)
    entries = [struct.unpack_from("<QQI", mem.read(BUF + 0x100 + 20 * i, 20)) for i in range(n)]
    assert sum(size for _, size, kind in entries if kind == 1) <= 32 << 20
    assert any(addr == 0x100000 and kind == 1 for addr, _, kind in entries)


def hvm_param(mem, index: int, value: int = 0) -> None:
    mem.write(BUF, struct.pack("<HxxIQ", lib.DOMID_SELF, index, value))


def test_hvm_params(hcall, xen_machine):
    mem = xen_machine.mem
    hvm_param(mem, HvmParam.STORE_PFN)
    assert hcall(Hypercall.hvm_op, HvmOp.get_param, BUF) == 0
    assert mem.read_u64(BUF + 8) == 0xFEB00
    hvm_param(mem, HvmParam.STORE_PFN, 5)
    assert hcall(Hypercall.hvm_op, HvmOp.set_param, BUF) == -Errno.EPERM
    hvm_param(mem, 4096)
    assert hcall(Hypercall.hvm_op, HvmOp.get_param, BUF) == -Errno.EINVAL
    hvm_param(mem, HvmParam.CALLBACK_IRQ, (2 << 56) | 0xF3)
    assert hcall(Hypercall.hvm_op, HvmOp.set_param, BUF) == 0
    hvm_param(mem, HvmParam.CALLBACK_IRQ, (9 << 56) | 0xF3)
    assert hcall(Hypercall.hvm_op, HvmOp.set_param, BUF) == -Errno.EINVAL
    mem.write(BUF, struct.pack("<IB", 1, 0xF3))
    assert hcall(Hypercall.hvm_op, HvmOp.set_evtchn_upcall_vector, BUF) == 0
    assert xen_machine.xen.vcpu_state(1).upcall_vector == 0xF3
    mem.write(BUF, struct.pack("<IB", 5, 0xF3))
    assert hcall(Hypercall.hvm_op, HvmOp.set_evtchn_upcall_vector, BUF) == -Errno.ENOENT
    mem.write(BUF, struct.pack("<IB", 0, 0x05))
    assert hcall(Hypercall.hvm_op, HvmOp.set_evtchn_upcall_vector, BUF) == -Errno.EINVAL


def test_vcpu_registrations(hcall, xen_machine):
    mem = xen_machine.mem
    mem.write(BUF, struct.pack("<QII", 0x300, 0x40, 0))
    assert hcall(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 1, BUF) == 0
    assert xen_machine.xen.vcpu_info_gpa(1) == 0x300040
    assert hcall(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 1, BUF) == -Errno.EINVAL  # only once
    mem.write(BUF, struct.pack("<QII", 0x300, 0xFF0, 0))  # crosses the page
    assert hcall(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 0, BUF) == -Errno.EINVAL
    assert hcall(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 9, BUF) == -Errno.ENOENT
    mem.write(BUF, struct.pack("<Q", 0x301000))
    assert hcall(Hypercall.vcpu_op, VcpuOp.register_runstate_memory_area, 0, BUF) == 0
    assert xen_machine.xen.vcpu_state(0).runstate_gpa == 0x301000
    assert hcall(Hypercall.vcpu_op, VcpuOp.is_up, 0) == 1
    assert hcall(Hypercall.vcpu_op, VcpuOp.initialise, 1, BUF) == -Errno.EINVAL


def test_vcpu_down_holds_the_vcpu_until_up(hcall, xen_machine):
    """VCPUOP_down/up/is_up as Linux's resume path uses them on its other vCPUs (Xen answers 0).
    Down holds the vCPU out of KVM_RUN (vcpu_loop.Hold, tests/unit/test_vcpu_hold.py) rather
    than queueing a blocking work item, which would keep pause and snapshot parking waiting."""
    xen = xen_machine.xen
    runner = xen_machine.runners[1]
    assert hcall(Hypercall.vcpu_op, VcpuOp.is_up, 1) == 0              # an AP before its INIT/SIPI
    assert hcall(Hypercall.vcpu_op, VcpuOp.down, 1) == 0                # down already
    assert hcall(Hypercall.vcpu_op, VcpuOp.up, 1) == -Errno.EINVAL      # nothing to run
    assert not runner.held and not xen.vcpu_state(1).down
    xen.vcpu_state(1).up = True                                         # as if it had started
    assert hcall(Hypercall.vcpu_op, VcpuOp.is_up, 1) == 1
    assert hcall(Hypercall.vcpu_op, VcpuOp.down, 1) == 0
    assert hcall(Hypercall.vcpu_op, VcpuOp.is_up, 1) == 0
    assert hcall(Hypercall.vcpu_op, VcpuOp.down, 1) == 0                # once is enough
    assert runner.held and not runner.work                              # held; its queue stays free
    assert hcall(Hypercall.vcpu_op, VcpuOp.up, 1) == 0
    assert not runner.held
    assert hcall(Hypercall.vcpu_op, VcpuOp.is_up, 1) == 1
    assert hcall(Hypercall.vcpu_op, VcpuOp.up, 1) == 0                  # up already
    assert not xen_machine.runners[0].held
    assert hcall(Hypercall.vcpu_op, VcpuOp.down, 9) == -Errno.ENOENT
    assert hcall(Hypercall.vcpu_op, VcpuOp.up, 0xFFFFFFFF) == -Errno.ENOENT


@pytest.mark.parametrize("vcpu1, why", [({"up": False, "down": True}, "down but never started"),
                                         ({"up": True, "down": "yes"}, "not booleans"),
                                         ({"up": 1, "down": False}, "not booleans")])
def test_a_snapshot_with_impossible_vcpu_online_state_is_refused(xen_machine, vcpu1, why):
    """A snapshot file is user input: a vCPU saved down must have been started, and both flags
    are booleans (the restored machine holds a vCPU saved down: vcpu_loop.Hold)."""
    from xenkvm.machine.snapshot.format import SnapshotError
    from xenkvm.xen import snapshot as xensnap
    xen = xen_machine.xen
    st = xensnap.save(xen)
    st["vcpus"][1].update(vcpu1)
    with pytest.raises(SnapshotError, match=why):
        xen.restore_state(st)
    assert not xen_machine.runners[1].held


def test_a_guest_resumed_as_a_new_domain_gets_host_input_on_its_console(xen_machine):
    """After a cooperative save the restored (new) domain's guest resumes with its console
    driver set up (Linux: xen_console_resume re-binds the same ring), so host keystrokes go to
    the ring at once, not to the UART until the guest next writes: Debian's shell lost the
    first line typed after ``xenkvm restore`` (tests/linux/test_linux_snapshot.py)."""
    from xenkvm.xen import snapshot as xensnap
    xen = xen_machine.xen
    xen.console.on_guest_notify()           # the guest has used its ring before the save
    assert xen.input_sink() is xen.console
    st = xensnap.save(xen)
    st["suspended_vcpu"] = 0                # saved in SHUTDOWN_suspend
    xen.console.connected = False           # as a new domain's console starts
    xen.restore_state(st)
    assert xen.resumed_new and xen.input_sink() is xen.console


def test_a_new_domain_after_a_cooperative_save_starts_with_every_2level_port_masked(hcall, xen_machine):
    """libxc's restore hands the new domain a shared_info with every port masked and none
    pending; Linux 6.1's resume re-binds its VIRQs and IPIs without masking them and unmasks
    only the IRQs it enables again.  With the ports left unmasked, a restored Debian guest on
    2-level channels hit ``kernel BUG at arch/x86/xen/spinlock.c:62`` (the PV spinlock
    kicker's IPI, disabled for good, fired).  A booted domain's page is cleared, as Xen's."""
    from xenkvm.xen import snapshot as xensnap
    mem, xen = xen_machine.mem, xen_machine.xen
    base = SHINFO_PFN << 12
    pending = base + ffi.offsetof("struct shared_info", "evtchn_pending")
    mask = base + ffi.offsetof("struct shared_info", "evtchn_mask")
    assert map_shinfo(hcall, mem) == 0
    assert mem.read(mask, 512) == bytes(512)            # the guest masks what it wants (Linux at boot)
    mem.write(pending, b"\x5a" * 512)                    # what the guest left in the page
    st = xensnap.save(xen)
    st["suspended_vcpu"] = 0                            # saved in SHUTDOWN_suspend
    xen.restore_state(st)
    assert map_shinfo(hcall, mem) == 0                  # xen_hvm_post_suspend maps it again
    assert mem.read(mask, 512) == b"\xff" * 512 and mem.read(pending, 512) == bytes(512)

    def evtchn(cmd, ctype, **fields):
        obj = ffi.new(f"struct {ctype} *", fields)
        mem.write(BUF, bytes(ffi.buffer(obj)))
        assert hcall(Hypercall.event_channel_op, cmd, BUF) == 0
        return ffi.cast(f"struct {ctype} *", ffi.from_buffer(mem.read(BUF, ffi.sizeof(obj[0]))))

    port = evtchn(EvtchnOp.bind_ipi, "evtchn_bind_ipi", vcpu=0).port
    evtchn(EvtchnOp.send, "evtchn_send", port=port)
    upcall_pending = base + ffi.offsetof("struct vcpu_info", "evtchn_upcall_pending")
    assert mem.read(pending + port // 8, 1)[0] >> (port % 8) & 1     # pending ...
    assert mem.read(upcall_pending, 1) == b"\0"                       # ... but masked: no upcall
    evtchn(EvtchnOp.unmask, "evtchn_unmask", port=port)
    assert mem.read(upcall_pending, 1) == b"\1"                       # the guest said it is live


def test_vm_assist_and_console_io(hcall, xen_machine):
    assert hcall(Hypercall.vm_assist, lib.VMASST_CMD_enable, lib.VMASST_TYPE_runstate_update_flag) == 0
    assert hcall(Hypercall.vm_assist, lib.VMASST_CMD_enable, lib.VMASST_TYPE_writable_pagetables) == -Errno.EINVAL
    xen_machine.mem.write(BUF, b"hello hvc\n")
    assert hcall(Hypercall.console_io, lib.CONSOLEIO_write, 10, BUF) == 0
    # Xen's own console: the hypervisor log, never the guest console
    assert xen_machine.xen.console_io.log.sink.tail() == b"hello hvc\n"
    assert xen_machine.sink.tail() == b""
    assert hcall(Hypercall.console_io, lib.CONSOLEIO_write, 1 << 30, BUF) == -Errno.EINVAL
    assert not xen_machine.xen.console_io.reading
    xen_machine.xen.console_input.push(b"ab")
    assert hcall(Hypercall.console_io, lib.CONSOLEIO_read, 16, BUF) == 2
    assert xen_machine.mem.read(BUF, 2) == b"ab"
    assert xen_machine.xen.console_io.reading      # host keystrokes now come here


@pytest.mark.parametrize("reason,status", [(0, ExitStatus.POWEROFF), (1, ExitStatus.RESET),
                                           (3, ExitStatus.GUEST_CRASH)])
def test_shutdown_reasons(hcall, xen_machine, reason, status):
    xen_machine.mem.write_u32(BUF, reason)
    assert hcall(Hypercall.sched_op, SchedOp.shutdown, BUF) == 0
    assert xen_machine.result.status is status


def test_bad_shutdown_reason(hcall, xen_machine):
    xen_machine.mem.write_u32(BUF, 77)
    assert hcall(Hypercall.sched_op, SchedOp.shutdown, BUF) == -Errno.EINVAL
    assert xen_machine.result is None


def test_stats_count_calls(hcall, xen_machine):
    for _ in range(3):
        hcall(Hypercall.xen_version, XenVer.version, 0)
    assert xen_machine.xen.dispatcher.stats[Hypercall.xen_version].count >= 3


def test_ops_count_calls_by_sub_op(hcall, xen_machine):
    """``dispatcher.ops``: sub-op hypercalls counted per (number, cmd), the others per number."""
    ops = xen_machine.xen.dispatcher.ops
    before = dict(ops)
    for _ in range(2):
        hcall(Hypercall.xen_version, XenVer.version, 0)
    xen_machine.mem.write_u32(BUF, 77)
    hcall(Hypercall.sched_op, SchedOp.shutdown, BUF)          # refused (-EINVAL): still a call
    grown = {k: v - before.get(k, 0) for k, v in ops.items() if v != before.get(k, 0)}
    assert grown == {(int(Hypercall.xen_version), int(XenVer.version)): 2,
                     (int(Hypercall.sched_op), int(SchedOp.shutdown)): 1}


def _pvclock_error_ns(xen_machine, vcpu_id: int) -> int:
    """How far vCPU ``vcpu_id``'s pvclock, applied to its real guest TSC, is outside the Xen system
    times read just before and just after that TSC (0 inside: a loaded host may take milliseconds
    between the two reads, which is not an error of the clock)."""
    t = (SHINFO_PFN << 12) + vcpu_id * ffi.sizeof("struct vcpu_info") + ffi.offsetof("struct vcpu_info", "time")
    tsc_ts, sys_time, mul, shift = struct.unpack_from("<QQIb", xen_machine.mem.read(t + 8, 21))
    before = xen_machine.xen.now_ns()
    guest_tsc = xen_machine.vcpus[vcpu_id].get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    after = xen_machine.xen.now_ns()
    pv = sys_time + TscScale(mul, shift).ns(guest_tsc - tsc_ts)
    return pv - after if pv > after else min(0, pv - before)


def test_pvclock_follows_a_vcpu_whose_tsc_moved(hcall, xen_machine):
    """On a host whose TSC is unstable KVM moves a vCPU's TSC offset when it loads the vCPU
    (its catch-up), so the offset the pvclock was published with goes stale.  Arming a
    timer re-measures that vCPU's offset and republishes its pvclock.  (KVM takes a
    userspace TSC write to a vCPU that never ran as a sync, so the stale offset is made
    here by moving the published one instead.)"""
    st = xen_machine.xen.shinfo
    st.tsc_stable = False
    assert map_shinfo(hcall, xen_machine.mem) == 0
    st.tsc_offsets[1] += 100 * xen_machine.tsc_khz * 1000        # 100 s of ticks off (ahead: a host TSC of a few seconds, as in the rig, minus 100 s would be negative)
    st.update_time(1)
    assert abs(_pvclock_error_ns(xen_machine, 1)) > 5_000_000_000
    xen_machine.mem.write(BUF, struct.pack("<QI", xen_machine.xen.now_ns() + 10**9, 0))
    assert hcall(Hypercall.vcpu_op, VcpuOp.set_singleshot_timer, 1, BUF, vcpu=1) == 0
    assert abs(_pvclock_error_ns(xen_machine, 1)) < 5_000_000
    st.tsc_offsets[0] += 100 * xen_machine.tsc_khz * 1000
    st.update_time(0)
    assert hcall(Hypercall.set_timer_op, xen_machine.xen.now_ns() + 10**9, vcpu=0) == 0
    assert abs(_pvclock_error_ns(xen_machine, 0)) < 5_000_000


def test_stable_tsc_host_keeps_the_one_offset(hcall, xen_machine):
    """With a stable host TSC the offset measured at start holds: arming a timer reads no MSR."""
    st = xen_machine.xen.shinfo
    st.tsc_stable = True
    st.tsc_offsets[1] -= 1000
    before = list(st.tsc_offsets)
    xen_machine.mem.write(BUF, struct.pack("<QI", xen_machine.xen.now_ns() + 10**9, 0))
    assert hcall(Hypercall.vcpu_op, VcpuOp.set_singleshot_timer, 1, BUF, vcpu=1) == 0
    assert st.tsc_offsets == before
