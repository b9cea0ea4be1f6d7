"""xl.cfg(5) ``vif`` specifications (docs/misc/xl-network-configuration), parsed and checked.

    vifs:
      - "mac=00:16:3e:01:02:03, bridge=br0, vifname=web0"
      - "bridge=br0"                       # MAC generated, tap named vif<domid>.<devid>
      - ""                                 # a tap with no bridge

Keys: ``mac`` (unicast, six hex octets), ``bridge`` (an existing host bridge
the tap is enslaved to), ``vifname`` (the host tap's name: at most 15
characters, no ``/``, ``:`` or white space), ``ip`` (written to the backend
node as libxl does; not enforced), ``offload`` (``on``, the default, or
``off``: xenkvm's own key; the backend then offers no GSO/TSO and no IPv6
checksum offload and the tap hands it only finished frames; Linux netfront
still leaves IPv4 checksums to every backend, which the backend completes), ``txcoalesce``
(xenkvm's own: microseconds, 0 to 100000, that the backend may hold the guest's tx completions
before it publishes them, as a NIC's tx interrupt coalescing does; docs/pv-backends.md,
"Tx completion coalescing"), ``type`` (``vif`` or ``ioemu``: both get
the PV device), ``model`` and ``script`` (accepted for existing
configurations; the VMM plugs the tap itself).  Every problem is a
ConfigError naming the key.

A vif without ``mac`` gets one in Xen's 00:16:3e prefix derived from the
domain's name and the device id (libxl draws one at random and stores it; we
have no store that outlives the VMM, so it is a hash: a reboot keeps it).
As libxl does, the fourth octet's top bit is clear.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from xenkvm.config import ConfigError

KEYS = ("mac", "bridge", "vifname", "ip", "type", "model", "script", "offload", "txcoalesce")
TX_COALESCE_MAX_US = 100_000
XEN_OUI = (0x00, 0x16, 0x3E)
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
IFNAMSIZ = 16


@dataclass(frozen=True)
class VifSpec:
    """One vif of the guest definition."""

    devid: int
    mac: str                  #: "00:16:3e:xx:xx:xx", lower case
    bridge: str | None = None
    vifname: str | None = None
    ip: str | None = None
    offload: bool = True      #: offer GSO/TSO v4/v6 and IPv6 checksum offload (``offload=off``: none)
    tx_coalesce_us: int = 0   #: how long tx completions may be held before they are published


def generated_mac(name: str, devid: int) -> str:
    """A stable MAC in Xen's prefix for vif ``devid`` of domain ``name``."""
    h = hashlib.sha256(f"{name}/{devid}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (*XEN_OUI, h[0] & 0x7F, h[1], h[2]))


def check_ifname(value: str, what: str) -> str:
    """Linux ``dev_valid_name``: 1-15 characters, not . or .., no / : or white space."""
    if not value or len(value) >= IFNAMSIZ or value in (".", "..") or re.search(r"[/:\s]", value):
        raise ConfigError(f"vifs: {what}={value!r} is not a valid interface name (1-15 characters, no / : or spaces)")
    return value


def _split(text: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep:
            raise ConfigError(f"vifs: {item!r} is not key=value in {text!r}")
        if k in keys:
            raise ConfigError(f"vifs: {k!r} given twice in {text!r}")
        keys[k] = v.strip()
    return keys


def _mac(value: str) -> str:
    if not _MAC.match(value):
        raise ConfigError(f"vifs: mac={value!r}: expected six hex octets like 00:16:3e:01:02:03")
    if int(value[:2], 16) & 1:
        raise ConfigError(f"vifs: mac={value!r} is a multicast address")
    return value.lower()


def parse_vif(text: object, devid: int, domain_name: str) -> VifSpec:
    """Parse one ``vifs:`` entry (the ``devid``-th)."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ConfigError(f"vifs: expected a string like 'mac=00:16:3e:01:02:03, bridge=br0', got {text!r}")
    keys = _split(text)
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise ConfigError(f"vifs: unknown key {unknown[0]!r} in {text!r} (known: {', '.join(KEYS)})")
    if keys.get("type", "vif") not in ("vif", "ioemu"):
        raise ConfigError(f"vifs: type={keys['type']!r}: expected vif or ioemu")
    mac = _mac(keys["mac"]) if "mac" in keys else generated_mac(domain_name, devid)
    bridge = check_ifname(keys["bridge"], "bridge") if "bridge" in keys else None
    vifname = check_ifname(keys["vifname"], "vifname") if "vifname" in keys else None
    if keys.get("offload", "on") not in ("on", "off"):
        raise ConfigError(f"vifs: offload={keys['offload']!r}: expected on or off")
    return VifSpec(devid=devid, mac=mac, bridge=bridge, vifname=vifname, ip=keys.get("ip") or None,
                   offload=keys.get("offload", "on") == "on", tx_coalesce_us=_coalesce(keys.get("txcoalesce", "0")))


def _coalesce(value: str) -> int:
    if not value.isdigit() or int(value) > TX_COALESCE_MAX_US:
        raise ConfigError(f"vifs: txcoalesce={value!r}: expected microseconds, 0 to {TX_COALESCE_MAX_US}")
    return int(value)


def parse_vifs(value: object, domain_name: str) -> tuple[VifSpec, ...]:
    """The ``vifs:`` list; two vifs may not share a MAC or a vifname."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"vifs: expected a list of vif specifications, got {value!r}")
    vifs = tuple(parse_vif(v, i, domain_name) for i, v in enumerate(value))
    for attr in ("mac", "vifname"):
        seen = [getattr(v, attr) for v in vifs if getattr(v, attr)]
        dup = next((x for x in seen if seen.count(x) > 1), None)
        if dup:
            raise ConfigError(f"vifs: {attr} {dup!r} used twice")
    return vifs
