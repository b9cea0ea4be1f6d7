"""The per-vCPU run loop: KVM_RUN, then one dispatch-table lookup per exit.

Exit handlers are plain callables ``handler(vcpu) -> None`` registered by exit
reason; the Xen layer adds its own (debug traps, MSR exits) to the same table.
``--trace`` wraps every handler so each exit prints one line; without it the
hot path has no tracing cost.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable

from xenkvm.kvm._kvm_cffi import lib
from xenkvm.kvm.vcpu import Vcpu

log = logging.getLogger(__name__)
trace_log = logging.getLogger("xenkvm.trace")

ExitHandler = Callable[[Vcpu], None]

EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
              if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT", "KVM_EXIT_XEN_HCALL")}


def describe_exit(vcpu: Vcpu, reason: int) -> str:
    """One line for --trace: the exit class and its salient fields."""
    name = EXIT_NAMES.get(reason, str(reason))
    if reason == lib.KVM_EXIT_IO:
        io = vcpu.exit_io
        d = "out" if io.direction == lib.KVM_EXIT_IO_OUT else "in"
        return f"vcpu{vcpu.id} IO {d} port={io.port:#x} size={io.size} count={io.count}"
    if reason == lib.KVM_EXIT_MMIO:
        m = vcpu.exit_mmio
        return f"vcpu{vcpu.id} MMIO {'write' if m.is_write else 'read'} gpa={m.phys_addr:#x} len={m.len}"
    if reason == lib.KVM_EXIT_DEBUG:
        return f"vcpu{vcpu.id} DEBUG pc={vcpu.exit_debug.pc:#x} exception={vcpu.exit_debug.exception}"
    if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
        m = vcpu.exit_msr
        return f"vcpu{vcpu.id} {name} msr={m.index:#x} data={m.data:#x}"
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        return f"vcpu{vcpu.id} INTERNAL_ERROR suberror={vcpu.exit_internal.suberror}"
    return f"vcpu{vcpu.id} {name}"


def traced(handler: ExitHandler, reason: int) -> ExitHandler:
    def wrapper(vcpu: Vcpu) -> None:
        trace_log.info("%s", describe_exit(vcpu, reason))
        handler(vcpu)
    return wrapper


def run_vcpu(vcpu: Vcpu, handlers: dict[int, ExitHandler], stopping: Callable[[], bool],
             on_unhandled: Callable[[Vcpu, int], None], work: collections.deque,
             before_run: Callable[[Vcpu], None] | None = None) -> None:
    """Run ``vcpu`` until ``stopping()`` (handlers end a run by asking the machine to stop).

    ``work`` holds callables other threads queued for this vCPU.  They kick it
    with ``immediate_exit`` set before the signal (Machine.run_on_vcpu), so a
    kick that lands while this thread is outside KVM_RUN is not lost: the next
    KVM_RUN returns at once.  After such a return the flag is cleared *before*
    the queue is drained; work queued after the drain sets it again, so a
    halted guest can never sleep on a non-empty queue.  ``before_run`` (tests
    only) runs just before each KVM_RUN, after the drain: the worst moment for
    a kick to arrive.
    """
    run = vcpu.run
    get = handlers.get
    intr = lib.KVM_EXIT_INTR
    while not stopping():
        if before_run is not None:
            before_run(vcpu)
        reason = run()
        if reason == intr:
            vcpu.set_immediate_exit(False)  # a stop() re-checks stopping() at the loop head
        while work:
            work.popleft()(vcpu)
        if reason == intr:
            continue
        handler = get(reason)
        if handler is None:
            on_unhandled(vcpu, reason)
            return
        handler(vcpu)
