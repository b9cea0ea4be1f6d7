"""What a Machine offers the personalities attached to it (the Xen ABI is one).

The machine is a plain x86 PC under KVM and knows nothing of Xen.  A
personality is a :class:`MachineExtension` handed to ``Machine.attach`` before
the run (``xenkvm.build.build_machine`` attaches a ``XenDomain`` when the
guest's config has a ``xen:`` section).  The machine calls it at fixed points:

========================  ====================================================
``cpuid_leaves(id)``      building each vCPU's CPUID (hypervisor leaves)
``needs_kernel_elf``      loading: boot a bzImage as its extracted vmlinux
``kernel_params()``       loading a Linux kernel: parameters added before the user's
``install(entry)``        the guest is loaded, no vCPU has run yet
``start()``               ``run``: the I/O thread runs, the vCPU threads not yet
``stop()``                the run is ending (any thread; must not block)
``close()``               ``Machine.close``, in reverse order of attaching
``input_sink()``          each host keystroke: the console that takes it
``snapshot_begin/_end()`` around a snapshot's capture and writes, every vCPU parked
                          (begin: last attached first; end: the reverse)
``save_state()``          a snapshot, every vCPU parked: the extension's state
``restore_state(st)``     a restored machine, before it runs (instead of ``install``)
========================  ====================================================

Exits and ports an extension handles are registered on the machine
(``register_exit``, ``register_port_hook``, ``register_ports``): the one
table the vCPU run loop reads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from xenkvm.machine.cpu import CpuidEntry

if TYPE_CHECKING:
    from xenkvm.machine.loader import Entry


class InputSink(Protocol):
    """A guest console that takes host keystrokes."""

    def push_input(self, data: bytes) -> int:
        """Queue ``data`` for the guest; how many bytes were taken (the rest is dropped)."""


class MachineExtension:
    """Base of a machine personality; each hook does nothing unless overridden."""

    #: Whether the loader must boot a bzImage as its extracted vmlinux (ELF, loaded at its
    #: physical addresses, 64-bit protocol), so ``install`` can patch instructions in the
    #: image the guest really runs (Xen hypercall sites: xen/traps.py).
    needs_kernel_elf: bool = False

    def cpuid_leaves(self, vcpu_id: int) -> list[CpuidEntry] | None:
        """Hypervisor CPUID leaves for one vCPU, replacing KVM's own (None: keep KVM's)."""
        return None

    def kernel_params(self) -> tuple[str, ...]:
        """Linux parameters this personality needs, put after the host's and before the user's
        (so the user's own setting of the same parameter wins); only Linux kernels get them."""
        return ()

    def install(self, entry: "Entry") -> None:
        """The guest is loaded (``entry``: boot mode, image); register exits and devices now."""

    def start(self) -> None:
        """The run begins: the I/O thread is up, no vCPU thread yet (start sockets, threads)."""

    def stop(self) -> None:
        """The run is ending: release anything that holds a vCPU thread (called once, any thread)."""

    def close(self) -> None:
        """The machine is being closed: release host resources (sockets, files, threads)."""

    def save_state(self) -> dict | None:
        """Snapshots: this extension's state as JSON-able data, read while every vCPU is parked
        (Machine.snapshot); raise machine.snapshot.format.SnapshotError if it cannot be saved."""
        return None

    def snapshot_begin(self) -> None:
        """Snapshots: every vCPU is parked; hold this extension's other threads still (timers,
        service threads) until :meth:`snapshot_end`, so its state and guest RAM agree."""

    def snapshot_end(self) -> None:
        """Snapshots: the files are written (or the snapshot failed); let those threads go."""

    def restore_state(self, state: dict | None) -> None:
        """Snapshots: load what :meth:`save_state` returned, on a machine built from the same
        config and not yet run; it replaces ``install`` for a restored machine."""

    def keeps_saved_regions(self) -> bool:
        """Snapshots: after :meth:`restore_state`, whether the saved regions outside RAM are copied
        into the restored machine's (False: this extension started them afresh)."""
        return True

    def input_sink(self) -> InputSink | None:
        """The console host keystrokes go to now, or None for the machine's UART."""
        return None
