"""The dmesg check of tests/linux/xenboot.py: what it flags, and the one rig-only warning it lets by."""
from __future__ import annotations

from tests.linux.xenboot import XenBoot
from xenkvm.images import DMESG_BEGIN, DMESG_END

HEALTHY = ("Hypervisor detected: Xen HVM\nGrant table initialized\ninstalling Xen timer for CPU 0\n"
           "clocksource: Switched to clocksource xen\n")
XSAVE = ("XSAVE consistency problem: size 2696 != kernel_size 576\n"
         "WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 fpu__init_system_xstate+0x85a/0xb19\n")


def _boot(dmesg: str) -> XenBoot:
    return XenBoot(0, 1.0, 1.0, f"{DMESG_BEGIN}\n{dmesg}{DMESG_END}\n", "")


def test_healthy_dmesg_has_no_problems() -> None:
    assert _boot(HEALTHY).dmesg_problems(in_rig=False) == []


def test_xsave_warning_is_tolerated_only_in_the_rig() -> None:
    assert _boot(HEALTHY + XSAVE).dmesg_problems(in_rig=True) == []
    problems = _boot(HEALTHY + XSAVE).dmesg_problems(in_rig=False)
    assert len(problems) == 1 and "xstate.c" in problems[0]


def test_other_warnings_are_flagged_in_the_rig() -> None:
    lone = XSAVE.splitlines()[1] + "\n"  # the same WARNING without its XSAVE line
    other = "WARNING: CPU: 1 PID: 7 at kernel/time/timer.c:1 foo+0x1/0x2\n"
    for extra in (lone, other, "BUG: kernel NULL pointer dereference\n"):
        assert _boot(HEALTHY + extra).dmesg_problems(in_rig=True), extra
