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

``python -m xenkvm.images linux-xen`` (``make linux-xen-image``) builds the Xen
guest's initramfs from the same kernel and busybox plus Debian's
``xenstore-utils`` (with ``libxenstore4``, ``libxentoolcore1`` and the C library
and ELF interpreter they need, found by reading each ELF's ``DT_NEEDED``) and
the kernel's ``xenfs.ko``: ``initramfs-xen.cpio.gz``, whose ``/init``
(:data:`XEN_INIT_SCRIPT`) prints what the guest sees of Xen, does a xenstore
round trip with the host, prints :data:`XEN_MARKER`, dumps ``dmesg`` between
markers and powers off.  It also writes ``guests/linux-pvh.yaml`` and
``guests/linux-hvm.yaml`` (docs/linux-xen.md).

Past ~400 lines on purpose: most of it is the two initramfs ``/init`` scripts, kept
beside the code that packs them.
"""
from __future__ import annotations

import argparse
import logging
import os
import struct
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


#: The Xen guest's marker: printed with the host's xenstore reply after the round trip.
XEN_MARKER = "XENKVM-XEN-BOOT-OK"
DMESG_BEGIN = "XENKVM-DMESG-BEGIN"
DMESG_END = "XENKVM-DMESG-END"
#: What the Xen guest's /init prints with ``xenkvm.end=balloon`` when its balloon changes.
BALLOON_LINE = "xenkvm: balloon"
#: xenstore keys of the round trip, relative to /local/domain/<domid>.
GUEST_KEY = "data/guest-hello"
HOST_KEY = "data/host-reply"
#: Debian packages of the xenstore command-line tools (the C library comes from the host).
XENSTORE_PKGS = ("xenstore-utils", "libxenstore4", "libxentoolcore1")
XENSTORE_TOOLS = ("xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm",
                  "xenstore-exists", "xenstore-watch", "xenstore-chmod")
#: Kernel modules copied into the Xen initramfs (paths below lib/modules/<abi>/kernel), in
#: load order: xenfs (/proc/xen, the classic xenstore device path) needs xen-privcmd.
XEN_MODULES = ("drivers/xen/xen-privcmd.ko", "drivers/xen/xenfs/xenfs.ko", "drivers/net/xen-netfront.ko")
XEN_APPLETS = APPLETS + ("insmod", "lsmod", "usleep", "setsid", "cttyhack", "tr", "head", "tail",
                         "timeout", "seq", "wc", "sed", "env", "stty", "dd", "rm")

#: The Xen guest's /init.  Guest time runs ~15x slower than wall time on PVM hosts
#: (docs/linux-boot.md, time dilation), so the polling sleeps are short.  With
#: ``xenkvm.shell`` on the kernel command line it ends in an interactive shell on hvc0
#: instead of powering off; ``xenkvm.end=reboot|crash|wait`` picks another ending for
#: the lifecycle tests (``wait``: stay up until the host asks through control/shutdown).
#: ``xenkvm.end=balloon`` is ``wait`` for the memory/target test: first ``xenkvm.fill=N``
#: MiB of free RAM is written and freed again (so it is resident on the host, and what the
#: balloon driver gives back shows in the VMM's RSS), then every change of the balloon
#: driver's current_kb/target_kb is printed as :data:`BALLOON_LINE`.
XEN_INIT_SCRIPT = f"""#!/bin/sh
# xenkvm Xen guest: show what the guest sees of Xen, xenstore round trip, marker, dmesg, power off.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
insmod /lib/modules/xen-privcmd.ko && insmod /lib/modules/xenfs.ko && mount -t xenfs xenfs /proc/xen
echo "xenkvm: hypervisor $(cat /sys/hypervisor/type 2>&1)"
echo "xenkvm: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>&1)"
echo "xenkvm: /dev/xen: $(ls /dev/xen 2>&1 | tr '\\n' ' ')/proc/xen: $(ls /proc/xen 2>&1 | tr '\\n' ' ')"
xenstore-write {GUEST_KEY} "hello from $(uname -r)" || echo "xenkvm: xenstore-write failed"
reply=""
i=0
while [ $i -lt 3000 ]; do
    reply=$(xenstore-read {HOST_KEY} 2>/dev/null) && break
    usleep 20000
    i=$((i+1))
done
echo "{XEN_MARKER} $reply"
echo {DMESG_BEGIN}
dmesg
echo {DMESG_END}
case "$(cat /proc/cmdline)" in
*xenkvm.shell*) exec setsid cttyhack sh ;;
*xenkvm.end=reboot*) reboot -f ;;
*xenkvm.end=crash*) echo c > /proc/sysrq-trigger ;;
*xenkvm.end=wait*) echo "xenkvm: waiting for control/shutdown"; while true; do sleep 1; done ;;
*xenkvm.end=balloon*)
    for w in $(cat /proc/cmdline); do
        case "$w" in xenkvm.fill=*) dd if=/dev/zero of=/fill bs=1M count="${{w#xenkvm.fill=}}" 2>/dev/null; rm -f /fill ;; esac
    done
    m=/sys/devices/system/xen_memory/xen_memory0
    last=""
    while true; do
        read cur < $m/info/current_kb; read tgt < $m/target_kb
        if [ "$cur $tgt" != "$last" ]; then last="$cur $tgt"; echo "{BALLOON_LINE} current_kb=$cur target_kb=$tgt"; fi
        usleep 200000
    done ;;
esac
poweroff -f
"""

#: /sbin/poweroff and /sbin/reboot: what the kernel runs for an orderly power-off or reboot
#: (``poweroff_cmd``/``reboot_cmd``), e.g. when the host writes control/shutdown.  busybox's own
#: applets would signal init, which is our script, so these do it at once.
SBIN_SCRIPTS = {
    "sbin/poweroff": "#!/bin/sh\nsync\nexec /bin/busybox poweroff -f\n",
    "sbin/reboot": "#!/bin/sh\nsync\nexec /bin/busybox reboot -f\n",
    "sbin/halt": "#!/bin/sh\nsync\nexec /bin/busybox poweroff -f\n",
}

#: Kernel parameters of the Xen guests (the host-specific ones are added by the VMM).
#: docs/linux-xen.md explains each; pci=off only for PVH (HVM needs the platform device).
XEN_CMDLINE = ("console=hvc0 earlyprintk=xen rdinit=/init panic=-1 quiet loglevel=4 nokaslr "
               "mitigations=off nowatchdog nmi_watchdog=0 no_timer_check cryptomgr.notests "
               "random.trust_cpu=on printk.devkmsg=off xen_blkfront.max_indirect_segments=256")

XEN_GUEST_YAML = """\
# Written by `make linux-xen-image` (python -m xenkvm.images linux-xen): Debian bookworm's
# cloud kernel as a Xen {mode_upper} guest; its /init does a xenstore round trip with the host,
# prints {marker} and powers off (docs/linux-xen.md).
name: debian-xen-{mode}
kernel: {kernel}
initrd: {initrd}
boot: {boot}
memory: {memory}
vcpus: {vcpus}
console: stdio
cmdline: "{cmdline}"
xen:
  version: "4.17"
  domid: 1
  hypercall_trap: auto
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


# --- ELF dependencies -----------------------------------------------------------------
def elf_dependencies(elf: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP path or None, DT_NEEDED sonames) of an ELF64 executable or library."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageError("not an ELF64 file")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    interp, dynamic, loads = None, None, []
    for i in range(phnum):
        p_type, _, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            interp = elf[off:off + filesz].split(b"\0")[0].decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (off, filesz)
        elif p_type == 1:
            loads.append((vaddr, off, filesz))
    if dynamic is None:
        return interp, []
    entries, strtab = [], None
    off, size = dynamic
    for i in range(size // 16):
        tag, val = struct.unpack_from("<qQ", elf, off + i * 16)
        if tag == 0:
            break
        if tag == 1:
            entries.append(val)
        elif tag == 5:
            strtab = val
    if strtab is None:
        raise ImageError("ELF has DT_NEEDED entries but no DT_STRTAB")
    for vaddr, foff, filesz in loads:  # DT_STRTAB is a virtual address
        if vaddr <= strtab < vaddr + filesz:
            strtab = strtab - vaddr + foff
            break
    names = [elf[strtab + o:elf.index(b"\0", strtab + o)].decode() for o in entries]
    return interp, names


#: Where libraries are looked for: the unpacked packages first, then the host.
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


def find_library(soname: str, roots: list[Path]) -> Path:
    for root in roots:
        for d in LIB_DIRS:
            cand = root / d / soname
            if cand.exists():
                return cand
    raise ImageError(f"library {soname} not found in {', '.join(map(str, roots))}")


def collect_libraries(binary: bytes, roots: list[Path]) -> dict[str, bytes]:
    """Archive path -> contents of the ELF interpreter and every library ``binary`` needs
    (transitively), symlinks resolved; libraries go to lib/x86_64-linux-gnu/<soname>."""
    out: dict[str, bytes] = {}
    interp, todo = elf_dependencies(binary)
    if interp:
        path = Path(interp)
        src = next((r / path.relative_to("/") for r in roots if (r / path.relative_to("/")).exists()), None)
        if src is None:
            raise ImageError(f"ELF interpreter {interp} not found")
        out[interp.lstrip("/")] = src.resolve().read_bytes()
    seen: set[str] = set()
    while todo:
        soname = todo.pop()
        if soname in seen:
            continue
        seen.add(soname)
        data = find_library(soname, roots).resolve().read_bytes()
        out[f"lib/x86_64-linux-gnu/{soname}"] = data
        todo.extend(elf_dependencies(data)[1])
    return out


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


def build_xen_initramfs(busybox: bytes, xenstore: bytes, libs: dict[str, bytes],
                        modules: dict[str, bytes], init: str = XEN_INIT_SCRIPT) -> Cpio:
    """The Xen guest's initramfs: busybox, the xenstore tools and their libraries, modules."""
    cpio = build_initramfs(busybox, init, XEN_APPLETS)
    cpio.add_device("dev/hvc0", "c", 229, 0, mode=0o600)
    cpio.add_file("usr/bin/xenstore", xenstore, mode=0o755)
    for tool in XENSTORE_TOOLS:
        cpio.add_symlink(f"usr/bin/{tool}", "xenstore")
    for path, data in sorted(libs.items()):
        cpio.add_file(path, data, mode=0o755)
    for name, data in sorted(modules.items()):
        cpio.add_file(f"lib/modules/{name}", data)
    for path, script in SBIN_SCRIPTS.items():
        cpio.add_file(path, script, mode=0o755)
    return cpio


def write_xen_guest_yaml(path: Path, mode: str, vmlinuz: Path, initramfs: Path, *,
                         vcpus: int = 2, memory: str = "256M") -> Path:
    base = path.resolve().parent
    rel = lambda p: os.path.relpath(p.resolve(), base)  # noqa: E731
    cmdline = XEN_CMDLINE + (" pci=off" if mode == "pvh" else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(XEN_GUEST_YAML.format(
        mode=mode, mode_upper=mode.upper(), marker=XEN_MARKER, kernel=rel(vmlinuz), initrd=rel(initramfs),
        boot="pvh" if mode == "pvh" else "linux", memory=memory, vcpus=vcpus, cmdline=cmdline))
    return path


def build_linux_xen(cache: Path, guest_dir: Path | None) -> LinuxImage:
    """The Xen guest's initramfs (and guests/linux-pvh.yaml, linux-hvm.yaml)."""
    img = build_linux(cache, None)
    kroot = cache / "kernel"
    broot = cache / "busybox"
    xroots = [unpack(download(cache, pkg), cache / pkg) for pkg in XENSTORE_PKGS]
    xenstore = (xroots[0] / "usr" / "bin" / "xenstore").read_bytes()
    libs = collect_libraries(xenstore, [*xroots, Path("/")])
    moddirs = sorted((kroot / "lib" / "modules").iterdir())
    if not moddirs:
        raise ImageError(f"no lib/modules in {kroot}")
    modules = {}
    for rel in XEN_MODULES:
        src = moddirs[-1] / "kernel" / rel
        if not src.is_file():
            raise ImageError(f"kernel module {rel} missing from {moddirs[-1]}")
        modules[src.name] = src.read_bytes()
    busybox = (broot / "bin" / "busybox").read_bytes()
    data = build_xen_initramfs(busybox, xenstore, libs, modules).to_bytes(compress="gzip")
    initramfs = cache / "initramfs-xen.cpio.gz"
    if not initramfs.is_file() or initramfs.read_bytes() != data:
        initramfs.write_bytes(data)
    if guest_dir is not None:
        for mode in ("pvh", "hvm"):
            write_xen_guest_yaml(guest_dir / f"linux-{mode}.yaml", mode, img.vmlinuz, initramfs)
    return LinuxImage(img.vmlinuz, initramfs, guest_dir / "linux-pvh.yaml" if guest_dir else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenkvm.images", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="image", required=True)
    lx = sub.add_parser("linux", help="Debian's cloud kernel + a busybox initramfs")
    lx.add_argument("--cache", default=".cache/linux", help="download/unpack directory")
    lx.add_argument("--guest", default=str(REPO_ROOT / "guests" / "linux.yaml"),
                    help="guest definition to write ('' for none)")
    xx = sub.add_parser("linux-xen", help="the same kernel as a Xen guest: initramfs with xenstore-utils")
    xx.add_argument("--cache", default=".cache/linux", help="download/unpack directory")
    xx.add_argument("--guests", default=str(REPO_ROOT / "guests"),
                    help="where to write linux-pvh.yaml and linux-hvm.yaml ('' for none)")
    rf = sub.add_parser("rootfs", help="an ext4 root image on xvda (mke2fs -d) and the initramfs that mounts it")
    rf.add_argument("--cache", default=".cache/linux", help="download/unpack directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="images: %(message)s")
    try:
        if args.image == "rootfs":
            from xenkvm.rootfs import build_rootfs
            rimg = build_rootfs(Path(args.cache))
            print(f"kernel    {rimg.vmlinuz}\ninitramfs {rimg.initramfs}\nrootfs    {rimg.image}")
            return 0
        if args.image == "linux-xen":
            img = build_linux_xen(Path(args.cache), Path(args.guests) if args.guests else None)
        else:
            img = build_linux(Path(args.cache), Path(args.guest) if args.guest else None)
    except ImageError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    print(f"kernel    {img.vmlinuz}\ninitramfs {img.initramfs}\nguest     {img.guest_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
