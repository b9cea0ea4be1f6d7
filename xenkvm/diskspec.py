"""xl.cfg(5) ``disk`` specifications (docs/misc/xl-disk-configuration.txt), parsed and checked.

Both spellings users already have are accepted::

    format=raw, vdev=xvda, access=rw, target=root.img     # key=value; target= comes last
    root.img,raw,xvda,rw                                  # positional: target, format, vdev, access
    phy:/dev/vg/root,xvda,w                               # legacy positional: target, vdev, access

Supported: ``format`` raw (served directly with preadv/pwritev) and qcow,
qcow2, vhd, vmdk, qed, vdi (served by qemu-storage-daemon over NBD:
backends/imagedisk.py); ``access`` r/ro/w/rw; ``devtype`` disk/cdrom;
``backendtype`` phy/qdisk/tap (all served by the same in-VMM backend);
``discard``/``no-discard``; ``persistent``/``no-persistent`` (ours, like Linux blkback's
``feature_persistent``: whether the vbd offers ``feature-persistent``; off by default for raw,
whose C path claims each page for its request, so the guest copies nothing, on for the
NBD-served formats, whose Python path keeps the mappings: docs/pv-backends.md);
``backing``/``no-backing`` (ours: xl.cfg has no such key; whether
the backing file an image's header names is opened, for the formats that have one; off unless given,
since an image from elsewhere could name any host file); vdevs ``xvdX``, ``hdX``, ``sdX`` (with partition
numbers) or a bare number.  Every problem is a ConfigError naming the key.
Relative targets are relative to the guest definition's directory.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from xenkvm.config import ConfigError

KEYS = ("target", "format", "vdev", "access", "devtype", "backendtype", "discard", "no-discard",
        "direct-io-safe", "backing", "no-backing", "persistent", "no-persistent")
#: keys given as a bare word
FLAGS = ("discard", "no-discard", "direct-io-safe", "backing", "no-backing", "persistent", "no-persistent")
FORMATS = ("raw", "qcow", "qcow2", "vhd", "vmdk", "qed", "vdi")
BACKING_FORMATS = ("qcow", "qcow2", "vmdk", "qed")   #: the formats whose header may name a backing file
_VDEV = re.compile(r"^(xvd|hd|sd)([a-z]+)(\d*)$")


@dataclass(frozen=True)
class DiskSpec:
    """One disk of the guest definition."""

    target: Path
    vdev: str
    devid: int                #: xenstore device id (``virtual-device``): xvda = 51712
    readonly: bool = False
    cdrom: bool = False
    discard: bool = True
    format: str = "raw"
    #: open the backing file the image's header names (``backing``); off by default: the header is the
    #: image's, and an image from elsewhere could name any file the VMM can read
    backing: bool = False
    #: offer ``feature-persistent`` (``persistent``/``no-persistent``; parse_disk's default: not for raw)
    persistent: bool = False


def _disk_index(letters: str) -> int:
    """'a' -> 0, 'z' -> 25, 'aa' -> 26 (libxl ``decode_disk_letters``)."""
    n = 0
    for c in letters:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def vdev_to_devid(vdev: str) -> int:
    """Xen's VBD numbering (docs/misc/vbd-interface.txt); ValueError if not a disk name."""
    if vdev.isdigit():
        return int(vdev)
    m = _VDEV.match(vdev)
    if not m:
        raise ValueError(vdev)
    kind, disk, part = m.group(1), _disk_index(m.group(2)), int(m.group(3) or 0)
    if kind == "xvd":
        if disk < 16 and part < 16:
            return (202 << 8) | (disk << 4) | part
        if disk < (1 << 20) and part < 256:
            return (1 << 28) | (disk << 8) | part
    elif kind == "hd" and disk < 4 and part < 64:
        return ((3, 22)[disk >> 1] << 8) | ((disk & 1) << 6) | part
    elif kind == "sd" and disk < 16 and part < 16:
        return (8 << 8) | (disk << 4) | part
    raise ValueError(vdev)


def _split(text: str) -> tuple[dict[str, str], list[str]]:
    """Key=value pairs and positional items; ``target=`` swallows the rest (it may hold commas)."""
    keys: dict[str, str] = {}
    positional: list[str] = []
    rest = text
    while rest:
        item, sep, tail = rest.partition(",")
        item = item.strip()
        if item.startswith("target="):
            keys["target"] = rest.strip()[len("target="):].strip()
            break
        rest = tail if sep else ""
        if not item:
            continue
        if "=" in item:
            k, _, v = item.partition("=")
            if k.strip() in keys:
                raise ConfigError(f"disks: {k.strip()!r} given twice in {text!r}")
            keys[k.strip()] = v.strip()
        elif item in FLAGS:
            keys[item] = "1"
        else:
            positional.append(item)
    return keys, positional


def _positional(keys: dict[str, str], items: list[str], text: str) -> None:
    if not items:
        return
    if len(items) == 3 and items[1] not in FORMATS:
        names = ("target", "vdev", "access")
    else:
        names = ("target", "format", "vdev", "access")
    if len(items) > len(names):
        raise ConfigError(f"disks: too many positional parameters in {text!r} (target, format, vdev, access)")
    for name, value in zip(names, items):
        if name in keys:
            raise ConfigError(f"disks: {name!r} given twice in {text!r}")
        keys[name] = value


def _target_path(value: str, base: Path) -> Path:
    for prefix in ("phy:", "file:", "raw:", "aio:"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def spec_target(text: str, base: Path) -> tuple[str, Path] | None:
    """The vdev and target path a disk spec names, the target not required to exist yet (for a
    tool that makes the image first: ``make run``'s copy of the root image); None without both."""
    keys, positional = _split(text)
    _positional(keys, positional, text)
    if not keys.get("vdev") or not keys.get("target"):
        return None
    return keys["vdev"], _target_path(keys["target"], base)


def _target(value: str, base: Path) -> Path:
    p = _target_path(value, base)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise ConfigError(f"disks: target {str(p)!r}: {e.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ConfigError(f"disks: target {str(p)!r} is neither a file nor a block device")
    return p


def parse_disk(text: object, base: Path) -> DiskSpec:
    """Parse one ``disks:`` entry."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"disks: expected a string like 'format=raw, vdev=xvda, access=rw, target=IMG', got {text!r}")
    keys, positional = _split(text)
    _positional(keys, positional, text)
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise ConfigError(f"disks: unknown key {unknown[0]!r} in {text!r} (known: {', '.join(KEYS)})")
    if not keys.get("target"):
        raise ConfigError(f"disks: 'target' is required in {text!r}")
    if not keys.get("vdev"):
        raise ConfigError(f"disks: 'vdev' is required in {text!r}")
    fmt = keys.get("format", "raw") or "raw"
    if fmt not in FORMATS:
        raise ConfigError(f"disks: format={fmt!r} is not supported ({', '.join(FORMATS)}) in {text!r}")
    access = keys.get("access", "rw")
    if access not in ("r", "ro", "w", "rw"):
        raise ConfigError(f"disks: access={access!r}: expected r, ro, w or rw")
    devtype = keys.get("devtype", "disk")
    if devtype not in ("disk", "cdrom"):
        raise ConfigError(f"disks: devtype={devtype!r}: expected disk or cdrom")
    backend = keys.get("backendtype", "phy")
    if backend not in ("phy", "qdisk", "tap"):
        raise ConfigError(f"disks: backendtype={backend!r}: expected phy, qdisk or tap")
    if "backing" in keys and "no-backing" in keys:
        raise ConfigError(f"disks: both 'backing' and 'no-backing' in {text!r}")
    if "persistent" in keys and "no-persistent" in keys:
        raise ConfigError(f"disks: both 'persistent' and 'no-persistent' in {text!r}")
    if "backing" in keys and fmt not in BACKING_FORMATS:
        raise ConfigError(f"disks: 'backing': format={fmt} has no backing file ({', '.join(BACKING_FORMATS)} do)")
    try:
        devid = vdev_to_devid(keys["vdev"])
    except ValueError:
        raise ConfigError(f"disks: vdev={keys['vdev']!r}: expected xvdX, hdX, sdX or a number") from None
    return DiskSpec(target=_target(keys["target"], base), vdev=keys["vdev"], devid=devid,
                    readonly=access in ("r", "ro") or devtype == "cdrom", cdrom=devtype == "cdrom",
                    discard="no-discard" not in keys, format=fmt, backing="backing" in keys,
                    persistent="persistent" in keys or (fmt != "raw" and "no-persistent" not in keys))


def parse_disks(value: object, base: Path) -> tuple[DiskSpec, ...]:
    """The ``disks:`` list; two disks may not share a vdev."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"disks: expected a list of disk specifications, got {value!r}")
    disks = tuple(parse_disk(v, base) for v in value)
    seen: set[int] = set()
    for d in disks:
        if d.devid in seen:
            raise ConfigError(f"disks: vdev {d.vdev!r} used twice")
        seen.add(d.devid)
    return disks
