"""The root file system image (xenkvm/rootfs.py): an ext4 image made with mke2fs -d and read back
with debugfs (no mount, no network), and the disk initramfs's content."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xenkvm import rootfs
from xenkvm.images import ImageError

HOST_BUSYBOX = shutil.which("busybox")
needs_e2fs = pytest.mark.skipif(shutil.which("debugfs") is None and not os.path.exists("/usr/sbin/debugfs"),
                                reason="e2fsprogs is not installed")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if HOST_BUSYBOX is None:
        pytest.skip("no busybox on this host")
    tree = tmp_path / "tree"
    rootfs.stage_tree(tree, Path(HOST_BUSYBOX))
    return rootfs.make_ext4(tree, tmp_path / "root.ext4", size_mib=16)


def debugfs(image: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(image)], capture_output=True, text=True).stdout


@needs_e2fs
def test_image_holds_init_busybox_and_applets(image: Path) -> None:
    assert rootfs.read_file(image, "/sbin/init").decode() == rootfs.ROOTFS_INIT
    assert rootfs.read_file(image, "/bin/busybox") == Path(HOST_BUSYBOX).read_bytes()
    assert "Type: symlink" in debugfs(image, "stat /bin/sh")
    assert "Type: symlink" in debugfs(image, "stat /sbin/switch_root")
    assert "poweroff -f" in rootfs.read_file(image, "/sbin/poweroff").decode()
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    assert image.stat().st_size == 16 << 20


@needs_e2fs
def test_script_installed_and_replaced(image: Path) -> None:
    rootfs.install_script(image, "echo one\n")
    rootfs.install_script(image, "echo two\n")
    assert rootfs.read_file(image, rootfs.RUN_SCRIPT) == b"echo two\n"
    assert "Mode:  0755" in debugfs(image, f"stat {rootfs.RUN_SCRIPT}")


@needs_e2fs
def test_missing_file_is_an_error(image: Path) -> None:
    with pytest.raises(ImageError, match="/nope"):
        rootfs.read_file(image, "/nope")


def test_disk_initramfs_content(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("the system cpio is not installed")
    data = rootfs.build_disk_initramfs(b"\x7fELF busybox", b"BLKFRONT", {m: m.encode() for m in rootfs.VIRTIO_MODULES})
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=gzip.decompress(data),
                   cwd=tmp_path, check=True)
    assert (tmp_path / "lib/modules/xen-blkfront.ko").read_bytes() == b"BLKFRONT"
    assert (tmp_path / "lib/modules/virtio_blk.ko").read_bytes() == b"virtio_blk"
    assert os.readlink(tmp_path / "bin/switch_root") == "busybox"
    init = (tmp_path / "init").read_text()
    assert "exec switch_root /newroot /sbin/init" in init and "insmod /lib/modules/xen-blkfront.ko" in init
    assert (tmp_path / "newroot").is_dir()


def test_modopts_picks_one_modules_words_of_the_command_line() -> None:
    """The inits' ``modopts``, run by the host's sh over a given command line (``cat`` stands in
    for /proc/cmdline): only ``NAME.param=value`` words of that module, without the prefix."""
    cmdline = ("ro xen_blkfront.max_indirect_segments=256 xenkvm.root=/dev/xvda "
               "xen_blkfront.feature_persistent=0 xen_blkfrontx.a=1 xen_blkfront.flag")
    script = f"{rootfs.MODOPTS}\ncat() {{ echo '{cmdline}'; }}\nmodopts xen_blkfront; modopts virtio_blk"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["max_indirect_segments=256", "feature_persistent=0"]
    for init in (rootfs.DISK_INIT, rootfs.ROOTFS_INIT):
        assert rootfs.MODOPTS in init
    assert "insmod /lib/modules/xen-blkfront.ko $(modopts xen_blkfront)" in rootfs.DISK_INIT
