"""Guest images built from Debian packages: the Linux boot test's kernel and initramfs.

``python -m xenkvm.images linux --cache .cache/linux`` (what ``make linux-image``
runs) fetches Debian bookworm's cloud kernel (``linux-image-<abi>-cloud-amd64``,
resolved from the metapackage ``linux-image-cloud-amd64``) and ``busybox-static``
with ``apt-get download``, unpacks them with ``dpkg-deb -x`` and writes into the
cache:

* ``vmlinuz``: the kernel's bzImage, unmodified;
* ``initramfs.cpio.gz``: a newc archive (our own writer) holding busybox, its
  applet links, ``/dev/console`` and an ``/init`` that mounts proc/sys/devtmpfs,
  prints :data:`MARKER` and powers off at once;

and ``guests/linux.yaml`` pointing at them.  Everything already in the cache is
reused; ``apt-get update`` runs only when a download fails for want of lists.
"""
from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from xenkvm.machine.boot.initramfs import Cpio

log = logging.getLogger("xenkvm.images")

MARKER = "XENKVM-LINUX-BOOT-OK"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Applets linked into /bin (the init script needs sh, mount, echo, poweroff; the rest help debugging).
APPLETS = ("sh", "ash", "mount", "umount", "echo", "cat", "ls", "mkdir", "poweroff", "reboot",
           "halt", "dmesg", "uname", "sleep", "true", "false", "ps", "grep", "sync")

INIT_SCRIPT = f"""#!/bin/sh
# xenkvm Linux boot test: mount the basics, print the marker, power off at once.
/bin/mount -t proc proc /proc
/bin/mount -t sysfs sysfs /sys
/bin/mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo {MARKER}
/bin/poweroff -f
"""

#: Kernel parameters of the test guest (the host-specific ones are added by the VMM, see
#: ``xenkvm.machine.host``).  Each is explained in docs/linux-boot.md.
CMDLINE = ("console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 nokaslr mitigations=off pci=off "
           "nowatchdog nmi_watchdog=0 no_timer_check cryptomgr.notests random.trust_cpu=on "
           "printk.devkmsg=off")

GUEST_YAML = """\
# Written by `make linux-image` (python -m xenkvm.images linux): Debian bookworm's
# cloud kernel booting to a busybox /init that prints {marker} and powers off.
name: debian-linux
kernel: {kernel}
initrd: {initrd}
boot: linux
memory: {memory}
vcpus: 1
console: stdio
cmdline: "{cmdline}"
"""


class ImageError(RuntimeError):
    """A package that cannot be resolved, fetched or unpacked."""


@dataclass(frozen=True)
class LinuxImage:
    vmlinuz: Path
    initramfs: Path
    guest_yaml: Path | None


# --- Debian packages ----------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def parse_kernel_dependency(depends_output: str, meta: str = KERNEL_META) -> str:
    """The versioned kernel package from ``apt-cache depends <meta>`` output."""
    flavour = meta.removeprefix("linux-image-")
    pat = re.compile(rf"Depends:\s*(linux-image-[0-9][\w.+-]*-{re.escape(flavour)}(?:-unsigned)?)\s*$")
    for line in depends_output.splitlines():
        m = pat.search(line.strip())
        if m:
            return m.group(1)
    raise ImageError(f"no versioned kernel package among the dependencies of {meta}")


def resolve_kernel_package(meta: str = KERNEL_META) -> str:
    res = _run(["apt-cache", "depends", meta])
    if res.returncode != 0 or "Depends:" not in res.stdout:
        _apt_update()
        res = _run(["apt-cache", "depends", meta])
    if res.returncode != 0:
        raise ImageError(f"apt-cache depends {meta}: {res.stderr.strip()}")
    return parse_kernel_dependency(res.stdout, meta)


def _apt_update() -> None:
    res = _run(["apt-get", "update", "-qq"])
    if res.returncode != 0:
        raise ImageError(f"apt-get update failed: {res.stderr.strip()[-400:]}")


def cached_deb(cache: Path, package: str) -> Path | None:
    hits = sorted((cache / "debs").glob(f"{package}_*.deb"))
    return hits[-1] if hits else None


def download(cache: Path, package: str) -> Path:
    """``apt-get download`` ``package`` into ``cache/debs`` unless it is there already."""
    hit = cached_deb(cache, package)
    if hit is not None:
        return hit
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    res = _run(["apt-get", "download", package], cwd=debs)
    if res.returncode != 0:  # most often: no package lists yet
        _apt_update()
        res = _run(["apt-get", "download", package], cwd=debs)
    hit = cached_deb(cache, package)
    if res.returncode != 0 or hit is None:
        raise ImageError(f"apt-get download {package} failed: {res.stderr.strip()[-400:]}")
    return hit


def unpack(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` into ``dest`` (once: a stamp file records the .deb unpacked)."""
    stamp = dest / ".unpacked"
    if stamp.is_file() and stamp.read_text() == deb.name:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    res = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if res.returncode != 0:
        raise ImageError(f"dpkg-deb -x {deb.name}: {res.stderr.strip()}")
    stamp.write_text(deb.name)
    return dest


def find_vmlinuz(root: Path) -> Path:
    hits = sorted((root / "boot").glob("vmlinuz-*"))
    if not hits:
        raise ImageError(f"no boot/vmlinuz-* in {root}")
    return hits[-1]


# --- the initramfs ------------------------------------------------------------------
def build_initramfs(busybox: bytes, init: str = INIT_SCRIPT, applets: tuple[str, ...] = APPLETS) -> Cpio:
    """The busybox initramfs as a :class:`Cpio` (not yet serialised)."""
    cpio = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"):
        cpio.add_dir(d)
    cpio.add_device("dev/console", "c", 5, 1, mode=0o600)
    cpio.add_device("dev/null", "c", 1, 3, mode=0o666)
    cpio.add_device("dev/ttyS0", "c", 4, 64, mode=0o600)
    cpio.add_file("bin/busybox", busybox, mode=0o755)
    for applet in applets:
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_file("init", init, mode=0o755)
    return cpio


def write_guest_yaml(path: Path, vmlinuz: Path, initramfs: Path, *, memory: str = "256M",
                     cmdline: str = CMDLINE) -> Path:
    """``guests/linux.yaml`` with paths relative to the YAML's directory."""
    import os
    base = path.resolve().parent
    rel = lambda p: os.path.relpath(p.resolve(), base)  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GUEST_YAML.format(marker=MARKER, kernel=rel(vmlinuz), initrd=rel(initramfs),
                                      memory=memory, cmdline=cmdline))
    return path


def build_linux(cache: Path, guest_yaml: Path | None) -> LinuxImage:
    cache.mkdir(parents=True, exist_ok=True)
    kernel_pkg = resolve_kernel_package()
    kroot = unpack(download(cache, kernel_pkg), cache / "kernel")
    broot = unpack(download(cache, BUSYBOX), cache / "busybox")
    vmlinuz = cache / "vmlinuz"
    src = find_vmlinuz(kroot).read_bytes()
    if not vmlinuz.is_file() or vmlinuz.read_bytes() != src:
        vmlinuz.write_bytes(src)
    busybox = (broot / "bin" / "busybox").read_bytes()
    initramfs = cache / "initramfs.cpio.gz"
    data = build_initramfs(busybox).to_bytes(compress="gzip")
    if not initramfs.is_file() or initramfs.read_bytes() != data:
        initramfs.write_bytes(data)
    if guest_yaml is not None:
        write_guest_yaml(guest_yaml, vmlinuz, initramfs)
    return LinuxImage(vmlinuz, initramfs, guest_yaml)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenkvm.images", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="image", required=True)
    lx = sub.add_parser("linux", help="Debian's cloud kernel + a busybox initramfs")
    lx.add_argument("--cache", default=".cache/linux", help="download/unpack directory")
    lx.add_argument("--guest", default=str(REPO_ROOT / "guests" / "linux.yaml"),
                    help="guest definition to write ('' for none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="images: %(message)s")
    try:
        img = build_linux(Path(args.cache), Path(args.guest) if args.guest else None)
    except ImageError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    print(f"kernel    {img.vmlinuz}\ninitramfs {img.initramfs}\nguest     {img.guest_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
