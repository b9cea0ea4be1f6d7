"""The Linux test image: initramfs content (no network) and package-name resolution."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xenkvm import images

FAKE_BUSYBOX = b"\x7fELF fake busybox"


def _extract(archive: bytes, dest: Path) -> None:
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=dest, check=True)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    if shutil.which("cpio") is None:
        pytest.skip("the system cpio is not installed")
    data = images.build_initramfs(FAKE_BUSYBOX).to_bytes(compress="gzip")
    _extract(gzip.decompress(data), tmp_path)
    return tmp_path


def test_busybox_and_applet_links(tree: Path) -> None:
    bb = tree / "bin" / "busybox"
    assert bb.read_bytes() == FAKE_BUSYBOX
    assert os.access(bb, os.X_OK)
    for applet in ("sh", "mount", "poweroff", "echo"):
        link = tree / "bin" / applet
        assert link.is_symlink() and os.readlink(link) == "busybox"


def test_init_prints_marker_and_powers_off(tree: Path) -> None:
    init = tree / "init"
    assert os.access(init, os.X_OK)
    text = init.read_text()
    assert text.startswith("#!/bin/sh\n")
    lines = [ln.strip() for ln in text.splitlines()]
    assert f"echo {images.MARKER}" in lines
    assert images.MARKER == "XENKVM-LINUX-BOOT-OK"
    for fs in ("proc", "sysfs", "devtmpfs"):
        assert any(ln.startswith(f"/bin/mount -t {fs} ") for ln in lines)
    # The marker comes before the power-off, and the power-off does not wait for init scripts.
    assert lines.index(f"echo {images.MARKER}") < lines.index("/bin/poweroff -f")


def test_console_node_in_archive_listing() -> None:
    if shutil.which("cpio") is None:
        pytest.skip("the system cpio is not installed")
    raw = images.build_initramfs(FAKE_BUSYBOX).to_bytes()
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True,
                             check=True).stdout.decode()
    console = next(ln for ln in listing.splitlines() if ln.endswith(" dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console or "5, 1" in console
    for d in ("proc", "sys", "dev"):
        assert any(ln.startswith("d") and ln.endswith(f" {d}") for ln in listing.splitlines())


def test_archive_is_deterministic() -> None:
    a = images.build_initramfs(FAKE_BUSYBOX).to_bytes(compress="gzip")
    b = images.build_initramfs(FAKE_BUSYBOX).to_bytes(compress="gzip")
    assert a == b


def test_parse_kernel_dependency() -> None:
    out = ("linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
           "  Depends: something-else\n")
    assert images.parse_kernel_dependency(out) == "linux-image-6.1.0-56-cloud-amd64"
    assert images.parse_kernel_dependency(
        "  Depends: linux-image-6.1.0-9-cloud-amd64-unsigned\n") == "linux-image-6.1.0-9-cloud-amd64-unsigned"
    with pytest.raises(images.ImageError):
        images.parse_kernel_dependency("  Depends: linux-image-6.1.0-56-amd64\n")


def test_guest_yaml_paths_are_relative(tmp_path: Path) -> None:
    from xenkvm.config import load_config
    cache = tmp_path / ".cache" / "linux"
    cache.mkdir(parents=True)
    (cache / "vmlinuz").write_bytes(b"k")
    (cache / "initramfs.cpio.gz").write_bytes(b"i")
    yaml_path = images.write_guest_yaml(tmp_path / "guests" / "linux.yaml", cache / "vmlinuz",
                                        cache / "initramfs.cpio.gz")
    text = yaml_path.read_text()
    assert "kernel: ../.cache/linux/vmlinuz" in text
    assert "initrd: ../.cache/linux/initramfs.cpio.gz" in text
    cfg = load_config(yaml_path)
    assert cfg.boot.value == "linux"
    assert cfg.kernel == (cache / "vmlinuz").resolve() or cfg.kernel.resolve() == (cache / "vmlinuz").resolve()
    assert "console=ttyS0" in cfg.cmdline


# --- the Xen guest's initramfs ----------------------------------------------------------
def test_elf_dependencies_of_a_host_binary() -> None:
    ls = Path("/bin/ls").resolve()
    interp, needed = images.elf_dependencies(ls.read_bytes())
    assert interp and interp.startswith("/lib")
    assert "libc.so.6" in needed


def test_collect_libraries_resolves_transitively() -> None:
    libs = images.collect_libraries(Path("/bin/ls").resolve().read_bytes(), [Path("/")])
    assert "lib/x86_64-linux-gnu/libc.so.6" in libs
    assert any(p.startswith("lib64/") or "ld-linux" in p for p in libs)
    assert all(data[:4] == b"\x7fELF" for data in libs.values())


def test_xen_initramfs_content(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("the system cpio is not installed")
    cpio = images.build_xen_initramfs(FAKE_BUSYBOX, b"\x7fELF xenstore", {"lib/x86_64-linux-gnu/libx.so": b"L"},
                                      {"xenfs.ko": b"KO"})
    _extract(gzip.decompress(cpio.to_bytes(compress="gzip")), tmp_path)
    assert os.readlink(tmp_path / "usr/bin/xenstore-read") == "xenstore"
    assert (tmp_path / "lib/modules/xenfs.ko").read_bytes() == b"KO"
    assert "poweroff -f" in (tmp_path / "sbin/poweroff").read_text()  # the kernel's poweroff_cmd
    init = (tmp_path / "init").read_text()
    for needle in (images.XEN_MARKER, images.GUEST_KEY, images.HOST_KEY, images.DMESG_BEGIN,
                   "/sys/hypervisor/type", "poweroff -f"):
        assert needle in init


def test_xen_guest_yamls(tmp_path: Path) -> None:
    from xenkvm.config import BootMode, load_config
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    pvh = load_config(images.write_xen_guest_yaml(tmp_path / "g" / "pvh.yaml", "pvh", k, i))
    hvm = load_config(images.write_xen_guest_yaml(tmp_path / "g" / "hvm.yaml", "hvm", k, i))
    assert pvh.boot is BootMode.PVH and hvm.boot is BootMode.LINUX
    assert pvh.xen is not None and hvm.xen is not None and pvh.vcpus == 2
    assert "console=hvc0" in pvh.cmdline and "pci=off" in pvh.cmdline and "pci=off" not in hvm.cmdline
