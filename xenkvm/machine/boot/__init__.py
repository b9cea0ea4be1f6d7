"""Loading guest kernels: ELF (Xen PVH entry), Linux bzImage, initramfs, start-of-day data.

Everything here reads images a user handed us and writes guest memory, so every
offset and size taken from an image is bounds-checked first; a bad image raises
:class:`BootError` with a message that says what is wrong.

Submodules: :mod:`.elf` (ELF parsing/loading), :mod:`.pvh` (hvm_start_info),
:mod:`.bzimage` (Linux x86 boot protocol), :mod:`.extract` (vmlinux from a
bzImage), :mod:`.initramfs` (newc cpio writer).
"""
from __future__ import annotations


class BootError(ValueError):
    """A kernel image, initrd or boot parameter that cannot be loaded as given."""


__all__ = ["BootError"]
