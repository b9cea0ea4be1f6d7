"""xl.cfg(5) domain configuration files, read into the native guest definition.

The grammar is xl's: one ``KEY = VALUE`` (or ``KEY += VALUE``, which appends to
a list or string) per statement, statements ended by a newline or ``;``;
``#`` starts a comment; a VALUE is a number (decimal or 0x hex), a string in
'single' (no escapes) or "double" quotes (C escapes), or a list ``[ v, v, ]``
of strings and numbers that may span lines and end with a comma.  Lists do not
nest.

:func:`to_mapping` turns the parsed settings into the YAML spelling
(xenkvm/config.py) that :func:`xenkvm.config.from_mapping` validates, so both
formats give one ``GuestConfig``.  Keys xl knows but xenkvm does not use are
logged once, in one line, as ignored; a value xenkvm cannot honour is a
:class:`ConfigError` naming the key.  Everything here is hostile input: the
file size, the statement count, string lengths and list lengths are capped,
and binary content is refused, each with one line.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Union

import yaml

from xenkvm.config import ConfigError, GuestConfig, from_mapping

log = logging.getLogger(__name__)

MAX_FILE = 1 << 20          #: bytes; real domain files are a few hundred
MAX_STATEMENTS = 4096
MAX_LIST = 1024
MAX_STRING = 64 * 1024

Value = Union[int, str, list]

#: xl.cfg(5) keys xenkvm reads.
USED = {"name", "type", "builder", "kernel", "ramdisk", "cmdline", "extra", "root", "memory", "maxmem",
        "vcpus", "maxvcpus", "on_poweroff", "on_reboot", "on_crash", "uuid", "disk", "vif"}
#: xl.cfg(5) keys that are valid but have no meaning (yet) for xenkvm: logged as ignored.
KNOWN = {
    "acpi", "acpi_firmware", "altp2m", "apic", "bios", "bios_path_override", "boot", "bootloader",
    "bootloader_args", "cap", "channel", "claim_mode", "colo_checkpoint_host", "cpu_weight", "cpuid",
    "cpus", "cpus_soft", "device_model_args", "device_model_args_hvm", "device_model_args_pv",
    "device_model_override", "device_model_stubdomain_override", "device_model_user",
    "device_model_version", "device_tree", "driver_domain", "dtdev", "e820_host", "event_channels",
    "firmware", "gfx_passthru", "hap", "hdtype", "iomem", "ioports", "irqs", "keymap", "localtime",
    "max_event_channels", "max_grant_frames", "max_maptrack_frames", "mca_caps", "migration_channel",
    "nestedhvm", "nographic", "nomigrate", "on_soft_reset", "on_watchdog", "opengl", "p9", "pae",
    "passthrough", "pci", "pci_permissive", "pci_power_mgmt", "pci_seize", "pool", "pvcalls", "pvshim",
    "pvshim_cmdline", "pvshim_path", "rdm", "rdm_mem_boundary", "rtc_timeoffset", "sdl", "seclabel",
    "serial", "shadow_memory", "soundhw", "spice", "spice_clipboard_sharing", "spicedisable_ticketing",
    "spicehost", "spicepasswd", "spiceport", "spicetls_port", "spiceusbredirection", "spicevdagent",
    "stdvga", "stubdomain_cmdline", "stubdomain_kernel", "stubdomain_memory", "stubdomain_ramdisk",
    "timer_mode", "tsc_mode", "usb", "usbctrl", "usbdev", "usbdevice", "vcpu_hard_affinity",
    "vcpu_soft_affinity", "vdispl", "vfb", "vga", "videoram", "viridian", "vkb", "vkb_device",
    "vnc", "vncconsole", "vncdisplay", "vnclisten", "vncpasswd", "vncunused", "vnuma", "vsnd",
    "vtpm", "vuart", "xen_platform_pci", "xendbg", "trap_unmapped_accesses", "nr_spis", "gic_version",
    "vpmu", "smbios", "acpi_s3", "acpi_s4", "acpi_laptop_slate", "hpet", "vpt_align", "msitranslate",
    "power_mgmt", "suppress_vmdesc", "vif2", "console", "vdispl",
}

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+) | (?P<comment>\#[^\n]*) | (?P<nl>[\n;]) |
    (?P<num>0[xX][0-9a-fA-F]+|[0-9]+)(?![A-Za-z_0-9]) | (?P<id>[A-Za-z_][A-Za-z0-9_.]*) |
    (?P<sq>'[^'\n]*') | (?P<dq>"(?:[^"\\\n]|\\.)*") |
    (?P<op>\+=|=|\[|\]|,)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", '"': '"', "'": "'"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")


def _unescape(body: str, line: int) -> str:
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] == "x":
            return chr(int(e[1:], 16))
        if e[0] in "01234567":
            return chr(int(e, 8) & 0xFF)
        if e in _ESCAPES:
            return _ESCAPES[e]
        raise ConfigError(f"line {line}: unknown escape \\{e} in a string")
    return _ESCAPE.sub(one, body)


def _tokens(text: str):
    """(kind, value, line) for each token; one ConfigError line for a character xl would refuse."""
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"line {line}: unexpected {text[pos]!r} (not xl.cfg syntax)")
        kind, value = m.lastgroup, m.group()
        pos = m.end()
        if kind == "nl":
            yield "nl", value, line
            line += value == "\n"
        elif kind == "num":
            yield "value", int(value, 0), line
        elif kind == "sq":
            yield "value", value[1:-1], line
        elif kind == "dq":
            yield "value", _unescape(value[1:-1], line), line
        elif kind in ("id", "op"):
            yield kind, value, line
    yield "nl", "", line


class _Parser:
    """A recursive-descent reader over :func:`_tokens` (lists are one level deep)."""

    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.cur = next(self.toks)

    def take(self):
        tok, self.cur = self.cur, next(self.toks, ("nl", "", self.cur[2]))
        return tok

    def skip_newlines(self, inside_list: bool = False) -> None:
        while self.cur[0] == "nl" and self.cur[1]:
            if inside_list and self.cur[1] == ";":
                raise ConfigError(f"line {self.cur[2]}: ';' inside a list")
            self.take()

    def value(self) -> Value:
        kind, v, line = self.take()
        if kind == "value":
            if isinstance(v, str) and len(v) > MAX_STRING:
                raise ConfigError(f"line {line}: a string longer than {MAX_STRING} characters")
            return v
        if (kind, v) == ("op", "["):
            return self.list_rest(line)
        raise ConfigError(f"line {line}: expected a value (number, 'string' or [list]), got {v!r}")

    def list_rest(self, line: int) -> list:
        items: list = []
        while True:
            self.skip_newlines(inside_list=True)
            if self.cur[:2] == ("op", "]"):
                self.take()
                return items
            if self.cur[:2] == ("op", "["):
                raise ConfigError(f"line {self.cur[2]}: lists do not nest in xl.cfg")
            if self.cur[0] == "nl":
                raise ConfigError(f"line {line}: the list opened here is not closed")
            items.append(self.value())
            if len(items) > MAX_LIST:
                raise ConfigError(f"line {line}: a list of more than {MAX_LIST} items")
            self.skip_newlines(inside_list=True)
            if self.cur[:2] == ("op", ","):
                self.take()
            elif self.cur[:2] != ("op", "]"):
                raise ConfigError(f"line {self.cur[2]}: expected ',' or ']' in the list, got {self.cur[1]!r}")

    def statements(self):
        count = 0
        while True:
            self.skip_newlines()
            if self.cur == ("nl", "", self.cur[2]):
                return
            kind, key, line = self.take()
            if kind != "id":
                raise ConfigError(f"line {line}: expected a setting name, got {key!r}")
            kind, op, _ = self.take()
            if kind != "op" or op not in ("=", "+="):
                raise ConfigError(f"line {line}: expected '=' after {key}")
            value = self.value()
            if self.cur[0] != "nl":
                raise ConfigError(f"line {line}: {key}: unexpected {self.cur[1]!r} after the value")
            count += 1
            if count > MAX_STATEMENTS:
                raise ConfigError(f"more than {MAX_STATEMENTS} settings")
            yield key, op, value


def parse(text: str, into: dict[str, Value] | None = None) -> dict[str, Value]:
    """The settings of an xl.cfg text, in order; a later ``KEY =`` replaces, ``+=`` appends
    (``into``: settings read before, which this text amends)."""
    if "\0" in text:
        raise ConfigError("binary content (NUL bytes): not an xl.cfg file")
    out: dict[str, Value] = {} if into is None else into
    for key, op, value in _Parser(text).statements():
        if op == "+=" and key in out:
            old = out[key]
            if isinstance(old, list) and isinstance(value, list):
                value = old + value
            elif isinstance(old, str) and isinstance(value, str):
                value = old + value
            else:
                raise ConfigError(f"{key}: '+=' needs two lists or two strings")
        out[key] = value
    return out


def read(path: str | Path) -> dict[str, Value]:
    """Parse the xl.cfg file at ``path`` (size-capped, UTF-8)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{p}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{p}: larger than {MAX_FILE >> 10} KiB: not an xl.cfg file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text: not an xl.cfg file") from None
    try:
        return parse(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# -- xl settings -> the YAML spelling -------------------------------------------------------
def _str(cfg: dict[str, Value], key: str) -> str | None:
    v = cfg.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r:.80}")
    return v


def _num(cfg: dict[str, Value], key: str) -> int | None:
    """A number, or a string of digits (xl reads both with strtol)."""
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, str) and re.fullmatch(r"\s*\d{1,12}\s*", v):
        v = int(v)
    if not isinstance(v, int):
        raise ConfigError(f"{key}: expected a number, got {v!r:.80}")
    return v


def _list(cfg: dict[str, Value], key: str) -> list[str] | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
        raise ConfigError(f"{key}: expected a list of strings like ['...', '...'], got {v!r:.80}")
    return v


def _boot(cfg: dict[str, Value]) -> dict[str, Any]:
    """``type`` (or the older ``builder``): pvh and hvm run; pv cannot under KVM."""
    kind = _str(cfg, "type")
    if kind is None:
        builder = _str(cfg, "builder")
        kind = {"hvm": "hvm", "generic": "pv"}.get(builder or "", builder)
    if kind is None:
        log.info("type not given (xl's default is pv, which xenkvm cannot run): using pvh")
        kind = "pvh"
    if kind == "pvh":
        return {"boot": "pvh", "xen": {}}
    if kind == "hvm":
        return {"boot": "linux", "xen": {"platform_pci": True}}
    if kind == "pv":
        raise ConfigError("type: pv guests need a paravirtualised MMU, which KVM cannot give: "
                          "use type = \"pvh\" (or \"hvm\") with the same kernel")
    raise ConfigError(f"type: expected pvh, hvm or pv, got {kind!r:.80}")


def _cmdline(cfg: dict[str, Value]) -> str | None:
    """``cmdline``, else libxl's composition ``root=ROOT EXTRA``."""
    cmdline = _str(cfg, "cmdline")
    if cmdline is not None:
        return cmdline
    root, extra = _str(cfg, "root"), _str(cfg, "extra")
    parts = ([f"root={root}"] if root else []) + ([extra] if extra else [])
    return " ".join(parts) if parts else None


def to_mapping(cfg: dict[str, Value]) -> dict[str, Any]:
    """The YAML-spelling mapping for parsed xl settings (validated later by config.from_mapping)."""
    ignored = sorted(k for k in cfg if k not in USED and k in KNOWN)
    unknown = sorted(k for k in cfg if k not in USED and k not in KNOWN)
    if ignored:
        log.warning("xl.cfg keys ignored (no meaning under xenkvm yet): %s", ", ".join(ignored))
    if unknown:
        log.warning("not xl.cfg(5) keys, ignored: %s", ", ".join(unknown))
    raw: dict[str, Any] = {}
    for xl_key, key in (("name", "name"), ("kernel", "kernel"), ("ramdisk", "initrd"), ("uuid", "uuid"),
                        ("on_poweroff", "on_poweroff"), ("on_reboot", "on_reboot"), ("on_crash", "on_crash")):
        if (v := _str(cfg, xl_key)) is not None:
            raw[key] = v
    if raw.get("kernel") is None:
        raise ConfigError("kernel: required (xenkvm boots a kernel directly; bootloader= is not supported)")
    if (cmdline := _cmdline(cfg)) is not None:
        raw["cmdline"] = cmdline
    for key in ("memory", "maxmem"):            # xl: MiB
        if (n := _num(cfg, key)) is not None:
            raw[key] = f"{n}M"
    for key in ("vcpus", "maxvcpus"):
        if (n := _num(cfg, key)) is not None:
            raw[key] = n
    for xl_key, key in (("disk", "disks"), ("vif", "vifs")):
        if (specs := _list(cfg, xl_key)) is not None:
            raw[key] = specs
    raw.update(_boot(cfg))
    return raw


def apply_settings(cfg: dict[str, Value], settings: Sequence[str]) -> dict[str, Value]:
    """``xl create FILE KEY=VALUE...``: each argument is one more line of the file, after it
    (``vif=[]`` replaces the file's vifs, ``extra+=" quiet"`` appends); ConfigError naming it."""
    for setting in settings:
        if not re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*\+?=", setting) or "\n" in setting:
            raise ConfigError(f"{setting!r}: expected one KEY=VALUE xl.cfg setting")
        try:
            parse(setting, cfg)
        except ConfigError as e:
            raise ConfigError(f"{setting!r}: {e}") from None
    return cfg


def load(path: str | Path, overrides: dict[str, Any] | None = None, settings: Sequence[str] = ()) -> GuestConfig:
    """An xl.cfg file as a GuestConfig (relative paths: relative to the file's directory), amended
    by ``settings`` (``KEY=VALUE`` lines, as xl create's trailing arguments)."""
    p = Path(path)
    raw = to_mapping(apply_settings(read(p), settings))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return from_mapping(raw, p.resolve().parent, str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def is_xl(path: str | Path) -> bool:
    """Whether ``path`` is read as xl.cfg: a ``.cfg``/``.xl`` suffix, or no YAML suffix and a
    first setting written ``KEY = VALUE`` (YAML writes ``key: value``)."""
    p = Path(path)
    if p.suffix in (".cfg", ".xl"):
        return True
    if p.suffix in (".yaml", ".yml"):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    first = next((ln for ln in head.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*\+?=", first) is not None


def to_yaml(cfg: dict[str, Value]) -> str:
    """The native YAML guest definition for parsed xl settings (``xenkvm config --to-yaml``)."""
    raw = to_mapping(cfg)
    return yaml.safe_dump(raw, sort_keys=False, default_flow_style=False)
