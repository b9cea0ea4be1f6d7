"""Who is calling: the caller's privilege level.

Xen serves hypercalls from the guest kernel only.  For an HVM/PVH guest,
``hvm_hypercall()`` (xen/arch/x86/hvm/hypercall.c) answers any call made in
protected or long mode at CPL > 0, and any call from virtual-8086 mode, with
``-EPERM`` and does nothing else; real mode (CPL 0) is served.  The traps
(traps.py) apply that rule in their one shared dispatch path, using
:func:`caller_cpl` on the state KVM saved at the exit.

A hardware execute breakpoint fires *before* the instruction is fetched, so
a breakpoint on a kernel hypercall site also fires when an outer ring jumps
there, although the CPU would have raised an instruction-fetch #PF instead
(a supervisor page at CPL 3, a page not present, NX).  The trap walks the
guest's page tables for that fetch (machine/pagewalk.py) and injects the #PF
the guest would have seen without the breakpoint.
"""
from __future__ import annotations

from xenkvm.machine.pagewalk import Cr0

PF_VECTOR = 14
RFLAGS_VM = 1 << 17
_CR0_PE = int(Cr0.PE)  # plain ints: caller_cpl runs on every hypercall


def caller_cpl(sregs, rflags: int) -> int:
    """The CPL at the exit: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL.

    SS.DPL is the architectural CPL (SDM vol. 3, 5.5); KVM reports it that
    way on VMX (vmx_get_cpl reads SS's access rights) and SVM (SS.DPL is the
    VMCB's CPL), also for a null SS in 64-bit mode.  Ordered so that the
    kernel's own calls (SS.DPL 0, no VM flag) cost two field reads.
    """
    dpl = sregs.ss.dpl & 3
    if rflags & RFLAGS_VM:
        return 3 if sregs.cr0 & _CR0_PE else 0
    if not dpl or not sregs.cr0 & _CR0_PE:
        return 0
    return dpl
