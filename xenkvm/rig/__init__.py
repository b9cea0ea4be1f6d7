"""The hardware-KVM test rig: a nested AMD SVM machine under QEMU TCG, on any host.

Our own hosts are PVM; users run xenkvm on hardware KVM (VT-x/SVM).  QEMU's TCG
emulates an AMD CPU with SVM and nested paging (``-cpu max``), and Debian's
generic kernel loads ``kvm_amd`` on it, so inside that L1 machine ``/dev/kvm``
is hardware-flavoured KVM and xenkvm takes its hardware code path.  L1 sees the
host's root over 9p (read-only, with a tmpfs overlay) and runs a command, by
default the ``hw`` pytest selection, on the repository unchanged.  See
docs/hw-rig.md; ``python -m xenkvm.rig --help``.
"""
