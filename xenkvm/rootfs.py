"""A Debian root filesystem on a PV disk: an ext4 image made with ``mke2fs -d``, and the
initramfs that mounts it from ``xvda``.

``python -m xenkvm.images rootfs --cache .cache/linux`` (``make rootfs-image``)
reuses the kernel and ``busybox-static`` that ``images.py`` fetches with
``apt-get download`` and writes into the cache:

* ``rootfs.ext4``: an ext4 image (``mke2fs -t ext4 -d TREE``, so no loop
  mount and no root needed) holding busybox with every applet linked,
  ``/sbin/init`` (:data:`ROOTFS_INIT`) and the ``/sbin/poweroff`` helpers;
* ``initramfs-disk.cpio.gz``: busybox plus the kernel's ``xen-blkfront.ko``
  (the cloud kernel builds ext4 in, blkfront as a module); its ``/init``
  (:data:`DISK_INIT`) loads blkfront, waits for ``/dev/xvda``, mounts it and
  ``switch_root``s into it.

The rootfs ``/sbin/init`` mounts the pseudo file systems, prints
:data:`ROOTFS_MARKER` and runs ``/xenkvm/run`` when the image holds one (tests put
their script there in their copy of the image with ``debugfs -w``, see
:func:`install_script`), then ``sync``s and powers off; without it, a shell on
``hvc0``.  Nothing is fetched at run time: the packages come from the registry at
build time and are cached under ``.cache/linux/debs``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xenkvm.images import (BUSYBOX, SBIN_SCRIPTS, XEN_APPLETS, ImageError, build_initramfs, build_linux,
                           download, unpack)

log = logging.getLogger("xenkvm.rootfs")

ROOTFS_MARKER = "XENKVM-ROOTFS-UP"
ROOTFS_ERROR = "XENKVM-ROOTFS-ERROR"
#: Size of the ext4 image (sparse: only what is written takes host disk); room for the
#: tests' 64 MiB files.
ROOTFS_SIZE_MIB = 256
#: The inode tables and the journal are initialised now rather than by the guest kernel's
#: ext4lazyinit thread in the background of every boot.
MKE2FS_ARGS = ("-q", "-F", "-t", "ext4", "-N", "8192", "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0")
BLKFRONT = "drivers/block/xen-blkfront.ko"
#: For the same image under QEMU virtio-blk (``xenkvm.root=/dev/vda``, the disk benchmark's
#: baseline): the cloud kernel builds virtio as modules; in load order, below lib/modules/<abi>/kernel.
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                  "virtio_blk")
VIRTIO_PATHS = {"virtio_blk": "drivers/block/virtio_blk.ko"}
RUN_SCRIPT = "/xenkvm/run"
NETFRONT = "drivers/net/xen-netfront.ko"
#: Where the root file system keeps xen-netfront.ko: its /sbin/init loads it when the kernel
#: command line asks for an address (``xenkvm.ip=ADDR/PREFIX``, ``make run``'s guest).
NETFRONT_PATH = "lib/modules/xen-netfront.ko"
#: Lines the inits print on the console at each step of a disk boot; ``make run``'s progress
#: display (xenkvm/bootprogress.py) reads its boot phases from them and from the kernel's log.
INITRAMFS_STEP = "xenkvm-initramfs:"
NET_UP = "XENKVM-NET-UP"
SHELL_BANNER = "XENKVM-SHELL"

#: kmod's modprobe passes a module the ``module.param=value`` words of the kernel command line
#: (``xen_blkfront.max_indirect_segments=256``); busybox's insmod does not, so the inits do
#: (``$(modopts xen_blkfront)``).
MODOPTS = ("modopts() { for w in $(cat /proc/cmdline); do "
           "case \"$w\" in \"$1\".*=*) echo \"${w#\"$1\".}\" ;; esac; done; }")

#: The initramfs of a disk boot: blkfront in, /dev/xvda mounted, switch_root to its /sbin/init
#: (``xenkvm.root=/dev/vda`` on the command line: virtio-blk instead, for the QEMU baseline).
DISK_INIT = f"""#!/bin/sh
export PATH=/bin
fail() {{ echo "{ROOTFS_ERROR}: $*"; dmesg | tail -20; poweroff -f; }}
{MODOPTS}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
root=/dev/xvda
for w in $(cat /proc/cmdline); do case "$w" in xenkvm.root=/dev/*) root="${{w#xenkvm.root=}}" ;; esac; done
echo "{INITRAMFS_STEP} waiting for $root"
case "$root" in
/dev/vd*) for m in {" ".join(VIRTIO_MODULES)}; do insmod /lib/modules/$m.ko $(modopts $m) || fail "insmod $m.ko"; done ;;
*) insmod /lib/modules/xen-blkfront.ko $(modopts xen_blkfront) || fail "insmod xen-blkfront.ko" ;;
esac
i=0
while [ ! -b $root ] && [ $i -lt 600 ]; do usleep 50000; i=$((i+1)); done
[ -b $root ] || fail "no $root after 30 s"
mkdir -p /newroot
mount -t ext4 -o rw $root /newroot || fail "mount $root"
echo "{INITRAMFS_STEP} $root mounted, switching root"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"""

#: The root file system's init: eth0 up when the command line says ``xenkvm.ip=ADDR/PREFIX``
#: (``xenkvm.gw=HOST`` names the host's side for the banner), then /xenkvm/run if there is one,
#: else a shell on hvc0.
ROOTFS_INIT = f"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
{MODOPTS}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "{ROOTFS_MARKER} $(uname -r) root=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3)"
hostname -F /etc/hostname
ip=; gw=
for w in $(cat /proc/cmdline); do
    case "$w" in xenkvm.ip=*) ip="${{w#xenkvm.ip=}}" ;; xenkvm.gw=*) gw="${{w#xenkvm.gw=}}" ;; esac
done
if [ -n "$ip" ]; then
    [ -e /sys/module/xen_netfront ] || insmod /{NETFRONT_PATH} $(modopts xen_netfront) || echo "xenkvm: insmod xen-netfront.ko failed"
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
    ip link set lo up
    if [ -e /sys/class/net/eth0 ] && ip addr add "$ip" dev eth0 && ip link set eth0 up; then
        echo "{NET_UP} eth0 $ip${{gw:+, host $gw}}"
    else
        echo "xenkvm: no network: eth0 did not come up (does the domain have a vif?)"
    fi
fi
if [ -f {RUN_SCRIPT} ]; then
    sh {RUN_SCRIPT}
    echo "xenkvm: {RUN_SCRIPT} exited with status $?"
    sync
    poweroff -f
fi
echo "{SHELL_BANNER}: a shell on hvc0 (busybox; poweroff -f or the host's xenkvm shutdown stops it)"
exec setsid cttyhack sh
"""


@dataclass(frozen=True)
class RootfsImage:
    vmlinuz: Path
    initramfs: Path
    image: Path


def mke2fs() -> str:
    """The ``mke2fs`` binary (e2fsprogs; ``make rootfs-image`` installs it when missing)."""
    for cand in (shutil.which("mke2fs"), "/usr/sbin/mke2fs", "/sbin/mke2fs"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ImageError("mke2fs not found: install e2fsprogs (apt-get install e2fsprogs)")


def busybox_applets(busybox: Path) -> list[str]:
    """Every applet of ``busybox`` with its install path (``bin/ls``, ``sbin/switch_root``)."""
    res = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        raise ImageError(f"{busybox} --list-full failed: {res.stderr.strip()}")
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def stage_tree(tree: Path, busybox: Path, netfront: bytes | None = None) -> None:
    """The root file system's contents in ``tree`` (emptied first); ``netfront``: the kernel's
    xen-netfront.ko, kept at :data:`NETFRONT_PATH` for the init's ``xenkvm.ip=``."""
    if tree.exists():
        shutil.rmtree(tree)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root",
              "mnt", "data", "xenkvm"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    own = {"sbin/init", *SBIN_SCRIPTS}
    for path in busybox_applets(busybox):
        if path in own or path == "bin/busybox":
            continue
        link = tree / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath("/bin/busybox", "/" + str(Path(path).parent)))
    for path, text in {"sbin/init": ROOTFS_INIT, **SBIN_SCRIPTS}.items():
        (tree / path).write_text(text)
        (tree / path).chmod(0o755)
    (tree / "etc" / "hostname").write_text("xenkvm-guest\n")
    (tree / "tmp").chmod(0o1777)
    if netfront is not None:
        (tree / NETFRONT_PATH).parent.mkdir(parents=True, exist_ok=True)
        (tree / NETFRONT_PATH).write_bytes(netfront)


def make_ext4(tree: Path, image: Path, size_mib: int = ROOTFS_SIZE_MIB, label: str = "xenkvm-root") -> Path:
    """``mke2fs -t ext4 -d tree`` into a fresh sparse ``image`` (written beside it, then renamed)."""
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size_mib << 20)
    res = subprocess.run([mke2fs(), *MKE2FS_ARGS, "-L", label, "-d", str(tree), str(tmp)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"mke2fs -d {tree} failed: {res.stderr.strip()[-400:]}")
    os.replace(tmp, image)
    return image


def kernel_module(kroot: Path, rel: str) -> bytes:
    moddirs = sorted((kroot / "lib" / "modules").iterdir())
    src = moddirs[-1] / "kernel" / rel if moddirs else None
    if src is None or not src.is_file():
        raise ImageError(f"kernel module {rel} missing from {kroot}/lib/modules")
    return src.read_bytes()


def build_disk_initramfs(busybox: bytes, blkfront: bytes, virtio: dict[str, bytes]) -> bytes:
    """The disk boot's initramfs, gzip-compressed newc (``virtio``: module name -> .ko)."""
    cpio = build_initramfs(busybox, DISK_INIT, XEN_APPLETS + ("switch_root", "mknod"))
    cpio.add_device("dev/hvc0", "c", 229, 0, mode=0o600)
    cpio.add_dir("newroot")
    cpio.add_dir("lib")
    cpio.add_dir("lib/modules")
    cpio.add_file("lib/modules/xen-blkfront.ko", blkfront)
    for name, data in virtio.items():
        cpio.add_file(f"lib/modules/{name}.ko", data)
    return cpio.to_bytes(compress="gzip")


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def build_rootfs(cache: Path) -> RootfsImage:
    """The kernel, the disk initramfs and the ext4 root image, in ``cache``."""
    img = build_linux(cache, None)
    broot = unpack(download(cache, BUSYBOX), cache / "busybox")
    busybox = broot / "bin" / "busybox"
    initramfs = cache / "initramfs-disk.cpio.gz"
    kroot = cache / "kernel"
    virtio = {m: kernel_module(kroot, VIRTIO_PATHS.get(m, f"drivers/virtio/{m}.ko")) for m in VIRTIO_MODULES}
    _write_if_changed(initramfs, build_disk_initramfs(busybox.read_bytes(), kernel_module(kroot, BLKFRONT), virtio))
    image = cache / "rootfs.ext4"
    stamp = cache / "rootfs.stamp"
    netfront = kernel_module(kroot, NETFRONT)
    inputs = busybox.read_bytes() + netfront + ROOTFS_INIT.encode() + f"{ROOTFS_SIZE_MIB} {MKE2FS_ARGS}".encode()
    want = hashlib.sha256(inputs).hexdigest()
    if not image.is_file() or not stamp.is_file() or stamp.read_text() != want:
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache) as tmp:
            stage_tree(Path(tmp) / "tree", busybox, netfront)
            make_ext4(Path(tmp) / "tree", image)
        stamp.write_text(want)
    return RootfsImage(img.vmlinuz, initramfs, image)


def install_script(image: Path, script: str, dest: str = RUN_SCRIPT) -> None:
    """Write ``script`` as ``dest`` into the (unmounted) ext4 ``image`` with ``debugfs -w``."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        install_binary(image, Path(f.name), dest)


def install_binary(image: Path, src: Path, dest: str) -> None:
    """Copy the host file ``src`` into the (unmounted) ext4 ``image`` as the executable ``dest``."""
    parent, name = os.path.split(dest)
    cmds = f"cd {parent}\nrm {name}\nwrite {src} {name}\nsif {name} mode 0100755\n"
    res = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=cmds, capture_output=True, text=True)
    if res.returncode != 0 or "Allocated inode" not in res.stdout + res.stderr:
        raise ImageError(f"debugfs write {dest} into {image}: {(res.stderr or res.stdout).strip()[-400:]}")


def read_file(image: Path, path: str) -> bytes:
    """A file's contents from the (unmounted) ext4 ``image`` (``debugfs -R 'cat PATH'``)."""
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    if res.returncode != 0 or b"File not found" in res.stderr:
        raise ImageError(f"debugfs cat {path} in {image}: {res.stderr.decode(errors='replace').strip()[-400:]}")
    return res.stdout
