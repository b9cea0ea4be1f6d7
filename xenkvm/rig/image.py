"""The rig's L1 system: Debian's generic kernel and a busybox initramfs that loads kvm_amd.

The kernel is bookworm's generic ``linux-image-<abi>-amd64``, the same ABI as the
cloud kernel ``xenkvm.images`` boots as the test guest (the cloud flavour has no
9p).  The initramfs (our newc writer) holds busybox, the modules below with
their dependencies (:mod:`xenkvm.rig.kmod`), the load order and :data:`INIT_SCRIPT`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from xenkvm import images
from xenkvm.machine.boot.initramfs import Cpio
from xenkvm.rig.kmod import ModuleTree

log = logging.getLogger("xenkvm.rig")

#: What L1 needs: virtio-pci and 9p for the host's root and the results share, overlayfs
#: for a writable root over the read-only share, kvm_amd for /dev/kvm, tun for the vifs'
#: taps (devtmpfs makes /dev/net/tun when it loads; the init script checks it), bridge
#: for a vif's ``bridge=`` (test_netfront_guest.py) and vhost_net for QEMU's virtio-net,
#: the comparison row of benchmarks/bench_rig_net.py (/dev/vhost-net, as a KVM user has it).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd", "tun", "bridge", "vhost_net")

#: Console lines of the init script, parsed by the runner.
READY = "XENKVM-RIG-READY"
ERROR = "XENKVM-RIG-ERROR:"
DONE = "XENKVM-RIG-DONE"

#: Mount tags of the two 9p shares and where the results share appears inside the chroot.
HOST_TAG = "host"
OUT_TAG = "out"
CHROOT_OUT = "/run/xenkvm-rig"

L1_APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "cat", "cut", "grep", "echo", "poweroff",
              "chroot", "sync", "dmesg", "tail", "sleep", "ls", "uname", "true")

#: /init of L1.  Every failure prints one ERROR line (with the kernel's last words) and
#: powers off, so the runner can report it instead of waiting for its timeout.
INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {{
    echo "{ERROR} $*"
    dmesg | tail -n 15
    poweroff -f
}}
up() {{ cut -d' ' -f1 /proc/uptime; }}
grep -qw svm /proc/cpuinfo || fail "the emulated CPU has no svm flag (QEMU's -cpu max without AMD SVM)"
grep -qw npt /proc/cpuinfo || fail "the emulated CPU has svm but no npt (nested paging)"
while read -r m; do
    insmod "/lib/modules/$m" || fail "insmod $m failed"
done < /lib/modules/load-order
[ -c /dev/kvm ] || fail "kvm_amd loaded but there is no /dev/kvm"
[ -c /dev/net/tun ] || fail "tun loaded but there is no /dev/net/tun"
mkdir -p /host /upper /root /out
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {HOST_TAG} /host \\
    || fail "cannot mount the host's root over 9p"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {OUT_TAG} /out || fail "cannot mount the results share"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w /root \\
    || fail "cannot mount the overlay root"
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
mount -t devtmpfs devtmpfs /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs tmpfs /root/dev/shm
mount -t tmpfs tmpfs /root/tmp
mount -t tmpfs tmpfs /root/run
mkdir -p /root{CHROOT_OUT}
mount -o bind /out /root{CHROOT_OUT}
echo "{READY} $(up) $(uname -r)"
chroot /root /bin/sh {CHROOT_OUT}/command.sh
echo "{DONE} $(up)"
sync
umount /root{CHROOT_OUT}
umount /out
poweroff -f
"""


class RigImageError(RuntimeError):
    """The L1 kernel or initramfs cannot be fetched or built."""


@dataclass(frozen=True)
class L1Image:
    kernel: Path
    initramfs: Path
    abi: str
    modules: tuple[str, ...]


def generic_kernel_package(cloud_package: str) -> str:
    """``linux-image-6.1.0-57-cloud-amd64`` -> ``linux-image-6.1.0-57-amd64`` (same ABI)."""
    stem = cloud_package.removesuffix("-unsigned")
    if not stem.endswith("-cloud-amd64"):
        raise RigImageError(f"{cloud_package} is not a cloud-amd64 kernel package")
    return stem.removesuffix("-cloud-amd64") + "-amd64"


def build_initramfs(busybox: bytes, tree: ModuleTree) -> tuple[Cpio, tuple[str, ...]]:
    """The L1 initramfs and the names of the modules it loads, in load order."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        cpio.add_dir(d)
    cpio.add_device("dev/console", "c", 5, 1, mode=0o600)
    cpio.add_device("dev/null", "c", 1, 3, mode=0o666)
    cpio.add_file("bin/busybox", busybox, mode=0o755)
    for applet in L1_APPLETS:
        cpio.add_symlink(f"bin/{applet}", "busybox")
    order = tree.load_order(list(WANTED_MODULES))
    for m in order:
        cpio.add_file(f"lib/modules/{m.name}.ko", m.elf)
    cpio.add_file("lib/modules/load-order", "".join(f"{m.name}.ko\n" for m in order))
    cpio.add_file("init", INIT_SCRIPT, mode=0o755)
    return cpio, tuple(m.name for m in order)


def build(cache: Path) -> L1Image:
    """Fetch (once) and build the L1 kernel and initramfs under ``cache``."""
    try:
        package = generic_kernel_package(images.resolve_kernel_package())
        kroot = images.unpack(images.download(cache, package), cache / "kernel")
        broot = images.unpack(images.download(cache, images.BUSYBOX), cache / "busybox")
        vmlinuz = images.find_vmlinuz(kroot)
    except images.ImageError as e:
        raise RigImageError(str(e)) from None
    moddirs = sorted((kroot / "lib" / "modules").iterdir())
    if not moddirs:
        raise RigImageError(f"no lib/modules in {kroot}")
    cpio, modules = build_initramfs((broot / "bin" / "busybox").read_bytes(), ModuleTree(moddirs[-1]))
    data = cpio.to_bytes(compress="gzip")
    initramfs = cache / "l1-initramfs.cpio.gz"
    if not initramfs.is_file() or initramfs.read_bytes() != data:
        initramfs.write_bytes(data)
    log.info("L1: %s, modules %s", vmlinuz.name, " ".join(modules))
    return L1Image(vmlinuz, initramfs, moddirs[-1].name, modules)
