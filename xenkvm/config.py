"""Guest definitions: YAML files (and command-line overrides) loaded into dataclasses.

Every problem is a :class:`ConfigError` with a one-line message naming the
file and the key; the CLI prints it and exits non-zero, never a traceback.

    name: hello
    kernel: out/hello.elf      # relative paths are relative to the YAML file
    initrd: out/initrd.cpio    # optional
    cmdline: "console=ttyS0"
    memory: 64M                # K/M/G suffixes (binary); a bare number means MiB
    vcpus: 1
    boot: auto                 # auto | pvh | linux
    console: stdio             # stdio | none | file:PATH
    xen:                       # optional: present = the guest sees a Xen hypervisor
      version: "4.17"
      domid: 1
      hypercall_trap: auto     # auto | kvm-xen | hypercall-page | breakpoint | patch
      xenstore_socket: /run/xenstored/socket   # optional; default $XENSTORED_PATH or that
      platform_pci: false      # Xen platform PCI device + unplug ports (always on for boot: linux)
      hypervisor_log: stderr   # console_io output: stderr ("(XEN) " lines) | file:PATH | none
      pv_time: true            # Xen PV time (XENFEAT_hvm_safe_pvclock); false: the guest's LAPIC timer and TSC
      fast_path: true          # ring kicks (EVTCHNOP_send to a PV backend) and the vCPUs' single-shot timers done in C; false: all in Python
      kernel_kicks: true       # with fast_path and the patch trap on Linux: ring kicks signal the backend inside KVM (KVM_IOEVENTFD), no VMM exit
      fifo_events: false       # true: FIFO event channels offered (EVTCHNOP_init_control), as Xen; false: 2-level only, as QEMU (backend notifies done in C)
    disks:                     # optional, Xen guests: PV disks in xl.cfg(5) spelling (xenkvm/diskspec.py)
      - "format=raw, vdev=xvda, access=rw, target=root.img"
    vifs:                      # optional, Xen guests: PV NICs in xl.cfg(5) spelling (xenkvm/vifspec.py)
      - "mac=00:16:3e:01:02:03, bridge=br0"
    consoles:                  # optional, Xen guests: device/console/1.. (xenkvm/consolespec.py)
      - {backend: pty}
    uuid: 6f2a...              # optional; default derived from name and domid
    maxmem: 256M               # optional, >= memory (the balloon's static maximum)
    maxvcpus: 2                # optional, >= vcpus (a Xen guest gets this many vCPUs, the rest offline)
    on_poweroff: destroy       # destroy | restart | preserve (xl.cfg(5); managed domains)
    on_reboot: restart
    on_crash: destroy
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

MIN_MEMORY = 2 << 20
MAX_VCPUS = 255
MAX_CMDLINE = 4096


class ConfigError(ValueError):
    """A guest definition that cannot be used; the message is one line for the user."""


class BootMode(str, Enum):
    AUTO = "auto"    #: PVH if the ELF has the PVH note, else the Linux boot protocol
    PVH = "pvh"      #: Xen PVH entry (ELF, or the vmlinux extracted from a bzImage)
    LINUX = "linux"  #: Linux x86 boot protocol, 64-bit entry (bzImage)


class LifecycleAction(str, Enum):
    """What the toolstack does when the guest powers off, reboots or crashes (xl.cfg(5) on_*)."""

    DESTROY = "destroy"    #: the domain goes away
    RESTART = "restart"    #: a fresh machine with the same configuration, in the same process
    PRESERVE = "preserve"  #: the stopped domain stays listed (state "shutdown") until destroyed


class HypercallTrap(str, Enum):
    AUTO = "auto"
    KVM_XEN = "kvm-xen"
    HYPERCALL_PAGE = "hypercall-page"
    BREAKPOINT = "breakpoint"
    PATCH = "patch"


@dataclass(frozen=True)
class XenConfig:
    """The Xen personality: which version the guest is told, its domid, how hypercalls trap."""

    version: tuple[int, int] = (4, 17)
    domid: int = 1
    hypercall_trap: HypercallTrap = HypercallTrap.AUTO
    #: expose the test backend (xen/testdev.py) that test guests drive to check grant copies
    test_device: bool = False
    #: the embedded xenstored's socket (None: $XENSTORED_PATH, else ${XENSTORED_RUNDIR:-/run/xenstored}/socket)
    xenstore_socket: str | None = None
    #: the introduce socket of a shared host xenstored (xenkvm/xenstore/hostd.py): when set, the
    #: domain's ring goes to that daemon instead of an embedded one, and ``xenstore_socket`` is
    #: the daemon's client socket (``xenkvm create`` sets both)
    xenstored: str | None = None
    #: the Xen platform PCI device (5853:0001) and the unplug ports at 0x10, as an HVM guest
    #: sees them (always on for the Linux boot protocol; off by default for PVH)
    platform_pci: bool = False
    #: where the guest's console_io writes go (Xen's own console, what ``xl dmesg`` shows):
    #: ``stderr`` (each line prefixed "(XEN) "), ``file:PATH`` (appended, unprefixed) or ``none``;
    #: the guest's PV console stays on ``console:``
    hypervisor_log: str = "stderr"
    #: advertise XENFEAT_hvm_safe_pvclock, with which Linux HVM/PVH uses the Xen clocksource,
    #: the Xen one-shot timer (a hypercall per re-arm: VCPUOP_set_singleshot_timer) and the
    #: runstate area; false: the guest keeps its native clocks (the in-kernel LAPIC timer, the
    #: TSC), which on hardware KVM costs no exit to the VMM (docs/linux-xen.md, "PV time")
    pv_time: bool = True
    #: a guest's EVTCHNOP_send on a PV backend's ring port, and each vCPU's own single-shot timer
    #: set/stop, completed in C on the vCPU's thread (xen/fastpath.py, the port traps only; not
    #: under --trace).  On by default since kicks and timers together gave Debian's xvdb 1.5x
    #: QD1 and 2.5x QD32 IOPS in the rig (docs/linux-disk.md); false: every hypercall in Python
    fast_path: bool = True
    #: with ``fast_path`` and the patch trap on Linux's hypercall pair: the pair is rewritten
    #: into a stub that makes ``EVTCHNOP_send`` an ``out`` of the port number, and each PV
    #: backend's ring port gets a KVM_IOEVENTFD on it, so a ring kick wakes the backend from
    #: inside KVM without an exit to the VMM (xen/sendstub.py); false: the plain 3-byte patch
    kernel_kicks: bool = True
    #: FIFO event channels offered (EVTCHNOP_init_control, expand_array, set_priority), as Xen
    #: does; false (the default): those answer -ENOSYS as in QEMU's Xen emulation and Linux
    #: stays on 2-level channels, whose backend notifies C delivers without Python
    #: (xen/evtchn/cdeliver.py): a QD1 disk request or a TCP segment costs no Python there
    fifo_events: bool = False


XEN_FIELDS = {f.name for f in dataclasses.fields(XenConfig)}


@dataclass(frozen=True)
class GuestConfig:
    name: str
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = 128 << 20
    vcpus: int = 1
    boot: BootMode = BootMode.AUTO
    console: str = "stdio"
    xen: XenConfig | None = None
    #: PV disks (xl.cfg ``disk`` spellings, xenkvm/diskspec.py); served by xenkvm/backends
    disks: tuple = ()
    #: PV NICs (xl.cfg ``vif`` spellings, xenkvm/vifspec.py); host taps served by xenkvm/backends/net.py
    vifs: tuple = ()
    #: extra PV consoles device/console/1.. (xenkvm/consolespec.py); xenkvm/backends/console.py
    consoles: tuple = ()
    uuid: str | None = None
    maxmem: int | None = None
    maxvcpus: int | None = None
    on_poweroff: LifecycleAction = LifecycleAction.DESTROY
    on_reboot: LifecycleAction = LifecycleAction.RESTART
    on_crash: LifecycleAction = LifecycleAction.DESTROY


FIELDS = {f.name for f in dataclasses.fields(GuestConfig)}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(value: Any, what: str = "memory") -> int:
    """'64M', '1G', '512MiB' or a bare number of MiB -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 256M, got {value!r}")
    if isinstance(value, int):
        return value << 20
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: expected a size like 256M or 1G, got {value!r}")
    n, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return n << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise ConfigError(f"{key}: no such file: {p}")
    return p


def _validate(raw: dict[str, Any], base: Path, origin: str) -> GuestConfig:
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    if "kernel" not in raw or raw["kernel"] is None:
        raise ConfigError(f"{origin}: 'kernel' is required")
    kw: dict[str, Any] = {"name": str(raw.get("name") or Path(str(raw["kernel"])).stem)}
    kw["kernel"] = _path(raw["kernel"], "kernel", base)
    if raw.get("initrd") is not None:
        kw["initrd"] = _path(raw["initrd"], "initrd", base)
    cmdline = raw.get("cmdline", "")
    if not isinstance(cmdline, str) or len(cmdline) > MAX_CMDLINE or "\0" in cmdline:
        raise ConfigError(f"cmdline: expected a string of at most {MAX_CMDLINE} characters")
    kw["cmdline"] = cmdline
    memory = parse_size(raw.get("memory", "128M"))
    if memory < MIN_MEMORY or memory % 4096:
        raise ConfigError(f"memory: {memory} bytes is too small or not page-aligned (minimum 2M)")
    if memory > _host_memory():
        raise ConfigError(f"memory: {memory >> 20} MiB is more than this host has ({_host_memory() >> 20} MiB)")
    kw["memory"] = memory
    vcpus = raw.get("vcpus", 1)
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"vcpus: expected an integer from 1 to {MAX_VCPUS}, got {vcpus!r}")
    kw["vcpus"] = vcpus
    try:
        kw["boot"] = BootMode(raw.get("boot", "auto"))
    except ValueError:
        raise ConfigError(f"boot: expected one of auto, pvh, linux, got {raw.get('boot')!r}") from None
    console = raw.get("console", "stdio")
    if not isinstance(console, str) or not (console in ("stdio", "none") or console.startswith("file:")):
        raise ConfigError(f"console: expected stdio, none or file:PATH, got {console!r}")
    kw["console"] = console
    if raw.get("xen") is not None:
        kw["xen"] = _xen(raw["xen"])
    if raw.get("disks"):
        from xenkvm.diskspec import parse_disks
        if "xen" not in kw:
            raise ConfigError("disks: PV disks need the Xen personality (add 'xen:')")
        kw["disks"] = parse_disks(list(_specs(raw["disks"], "disks")), base)
    if raw.get("vifs"):
        from xenkvm.vifspec import parse_vifs
        if "xen" not in kw:
            raise ConfigError("vifs: PV NICs need the Xen personality (add 'xen:')")
        kw["vifs"] = parse_vifs(list(_specs(raw["vifs"], "vifs")), kw["name"])
    if raw.get("consoles"):
        from xenkvm.consolespec import parse_consoles
        if "xen" not in kw:
            raise ConfigError("consoles: PV consoles need the Xen personality (add 'xen:')")
        kw["consoles"] = parse_consoles(raw["consoles"], base)
    kw.update(_domain_fields(raw, kw))
    return GuestConfig(**kw)


_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
MAX_DEVICE_SPECS = 64
MAX_SPEC_LEN = 1024


def _specs(value: Any, key: str) -> tuple[str, ...]:
    """A bounded list of xl.cfg device strings (``disk``/``vif``), checked before they are parsed."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DEVICE_SPECS:
        raise ConfigError(f"{key}: expected a list of at most {MAX_DEVICE_SPECS} strings, got {value!r:.80}")
    for v in value:
        if not isinstance(v, str) or len(v) > MAX_SPEC_LEN or "\0" in v:
            raise ConfigError(f"{key}: expected strings of at most {MAX_SPEC_LEN} characters, got {v!r:.80}")
    return tuple(value)


def _domain_fields(raw: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The toolstack's keys (uuid, maxmem, maxvcpus, on_*), checked (disks, vifs, consoles: _validate)."""
    out: dict[str, Any] = {}
    if raw.get("uuid") is not None:
        if not isinstance(raw["uuid"], str) or not _UUID.fullmatch(raw["uuid"]):
            raise ConfigError(f"uuid: expected a UUID like 6f1c0a2e-8d5b-4c3e-9a7f-0b1c2d3e4f50, got {raw['uuid']!r:.80}")
        out["uuid"] = raw["uuid"].lower()
    if raw.get("maxmem") is not None:
        out["maxmem"] = parse_size(raw["maxmem"], "maxmem")
        if out["maxmem"] < kw["memory"]:
            raise ConfigError(f"maxmem: {out['maxmem'] >> 20} MiB is below memory ({kw['memory'] >> 20} MiB)")
    if raw.get("maxvcpus") is not None:
        m = raw["maxvcpus"]
        if isinstance(m, bool) or not isinstance(m, int) or not kw["vcpus"] <= m <= MAX_VCPUS:
            raise ConfigError(f"maxvcpus: expected an integer from vcpus ({kw['vcpus']}) to {MAX_VCPUS}, got {m!r}")
        out["maxvcpus"] = m
    for key in ("on_poweroff", "on_reboot", "on_crash"):
        if raw.get(key) is not None:
            try:
                out[key] = LifecycleAction(raw[key])
            except ValueError:
                choices = ", ".join(a.value for a in LifecycleAction)
                raise ConfigError(f"{key}: expected one of {choices}, got {raw[key]!r:.80}") from None
    return out


def parse_hypervisor_log(value: Any) -> str:
    """Check a ``hypervisor_log`` setting: ``stderr``, ``none`` or ``file:PATH``."""
    if isinstance(value, str) and (value in ("stderr", "none") or (value.startswith("file:") and value[5:]
                                                                       and "\0" not in value)):
        return value
    raise ConfigError(f"xen.hypervisor_log: expected stderr, none or file:PATH, got {value!r}")


def _xen(raw: Any) -> XenConfig:
    if raw is True:
        return XenConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"xen: expected a mapping (version, domid, hypercall_trap), got {raw!r}")
    unknown = sorted(set(raw) - XEN_FIELDS)
    if unknown:
        raise ConfigError(f"xen: unknown key {unknown[0]!r} (known: {', '.join(sorted(XEN_FIELDS))})")
    kw: dict[str, Any] = {}
    if "version" in raw:
        m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})", str(raw["version"]))
        if not m:
            raise ConfigError(f"xen.version: expected MAJOR.MINOR like 4.17, got {raw['version']!r}")
        kw["version"] = (int(m.group(1)), int(m.group(2)))
    if "domid" in raw:
        domid = raw["domid"]
        if isinstance(domid, bool) or not isinstance(domid, int) or not 1 <= domid < 0x7FF0:
            raise ConfigError(f"xen.domid: expected an integer from 1 to 32751, got {domid!r}")
        kw["domid"] = domid
    if "hypercall_trap" in raw:
        try:
            kw["hypercall_trap"] = HypercallTrap(raw["hypercall_trap"])
        except ValueError:
            choices = ", ".join(t.value for t in HypercallTrap)
            raise ConfigError(f"xen.hypercall_trap: expected one of {choices}, got {raw['hypercall_trap']!r}") from None
    if raw.get("xenstore_socket") is not None:
        path = raw["xenstore_socket"]
        if not isinstance(path, str) or not path or len(path.encode()) > 107:
            raise ConfigError(f"xen.xenstore_socket: expected a socket path of at most 107 bytes, got {path!r}")
        kw["xenstore_socket"] = path
    if raw.get("xenstored") is not None:
        path = raw["xenstored"]
        if not isinstance(path, str) or not path or len(path.encode()) > 107:
            raise ConfigError(f"xen.xenstored: expected a socket path of at most 107 bytes, got {path!r}")
        kw["xenstored"] = path
    if "test_device" in raw:
        if not isinstance(raw["test_device"], bool):
            raise ConfigError(f"xen.test_device: expected true or false, got {raw['test_device']!r}")
        kw["test_device"] = raw["test_device"]
    for key in ("platform_pci", "pv_time", "fast_path", "kernel_kicks", "fifo_events"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"xen.{key}: expected true or false, got {raw[key]!r}")
            kw[key] = raw[key]
    if "hypervisor_log" in raw:
        kw["hypervisor_log"] = parse_hypervisor_log(raw["hypervisor_log"])
    return XenConfig(**kw)


def from_mapping(raw: dict[str, Any], base: Path, origin: str) -> GuestConfig:
    """Validate an already-parsed guest definition (YAML keys; paths relative to ``base``),
    e.g. one converted from an xl.cfg file (xenkvm/xlcfg.py)."""
    return _validate(raw, base, origin)


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> GuestConfig:
    """Read a YAML guest definition (or none), apply overrides, validate."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    origin = "command line"
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values")
        raw = loaded
        base = p.resolve().parent
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key in ("kernel", "initrd"):  # paths given on the command line are relative to the cwd
        if overrides and overrides.get(key) is not None:
            raw[key] = str(Path(overrides[key]).expanduser().resolve())
    return _validate(raw, base, origin)


# -- JSON (snapshots keep the guest definition they were taken from) --------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_json(cfg: GuestConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready values (paths and enums as strings, devices as mappings)."""
    return _plain(dataclasses.asdict(cfg))


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def config_from_json(d: dict[str, Any]) -> GuestConfig:
    """The GuestConfig :func:`config_to_json` wrote (values were checked when it was first loaded)."""
    from xenkvm.consolespec import ConsoleSpec
    from xenkvm.diskspec import DiskSpec
    from xenkvm.vifspec import VifSpec
    d = dict(d)
    xen = d.pop("xen", None)
    if xen is not None:
        xen = XenConfig(**{**xen, "version": tuple(xen["version"]),
                           "hypercall_trap": HypercallTrap(xen["hypercall_trap"])})
    devices = {
        "disks": tuple(DiskSpec(**{**x, "target": Path(x["target"])}) for x in d.get("disks", ())),
        "vifs": tuple(VifSpec(**x) for x in d.get("vifs", ())),
        "consoles": tuple(ConsoleSpec(**{**x, "path": _opt_path(x.get("path"))}) for x in d.get("consoles", ())),
    }
    actions = {k: LifecycleAction(d[k]) for k in ("on_poweroff", "on_reboot", "on_crash") if k in d}
    return GuestConfig(**{**d, **devices, **actions, "kernel": Path(d["kernel"]), "initrd": _opt_path(d["initrd"]),
                          "boot": BootMode(d["boot"]), "xen": xen})
