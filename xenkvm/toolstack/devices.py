"""The control API's device ops: ``block-attach/-detach/-list`` and ``network-attach/-detach/-list``.

Each op calls the running domain's ``devices`` (xenkvm/backends/devices.py, the
hot-plug API) on the control thread: attaching opens the image or creates the tap
and writes both xenstore nodes, detaching only starts the unplug handshake (the
frontend is asked to close; ``force`` removes the device at once, as ``xl
block-detach --force``), so every op returns at once.  Specs are parsed by the same
code as the guest definition's ``disks:``/``vifs:`` (xl-disk-configuration and
xl-network-configuration spellings): a bad spec is ``invalid-argument`` with one
line naming the key, and the domain is untouched.

A device plugged in or unplugged this way also changes the domain's configuration
(``config``, the VMM's :class:`DeviceConfig`), as xl keeps devices added with
``block-attach``/``network-attach`` in the domain's config: a domain that reboots with
``on_reboot = "restart"`` comes back with the devices it had, not the ones it was
created with.  A device leaves the configuration when its detach is asked for.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from xenkvm.config import ConfigError
from xenkvm.diskspec import DiskSpec, parse_disk
from xenkvm.toolstack.protocol import ApiError, ErrorCode
from xenkvm.vifspec import _MAC, VifSpec, parse_vif

if TYPE_CHECKING:
    from xenkvm.backends import DeviceManager, XenbusBackend

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class DeviceConfig(Protocol):
    """Where hot-plugged devices are remembered for the domain's next boot (its configuration)."""

    def device_added(self, spec: DiskSpec | VifSpec) -> None:
        """``spec`` was plugged in: the next machine gets it too."""

    def device_removed(self, type_: str, devid: int) -> None:
        """Device ``devid`` of ``type_`` (``vbd``, ``vif``) is being unplugged: the next machine does not get it."""


def _arg(args: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = args.get(key, default)
    if value is None and default is None and kind is not bool:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{key}: required")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{key}: expected a {kind.__name__}")
    return value


class DeviceOps:
    """The six device ops of one managed domain; ``devices()`` is its live DeviceManager
    (raising ApiError when the guest is not running or has no PV backends)."""

    def __init__(self, devices: Callable[[], "DeviceManager"], domain_name: str,
                 config: DeviceConfig | None = None):
        self.devices = devices
        self.domain_name = domain_name
        self.config = config

    def handlers(self) -> dict[str, Handler]:
        return {"block-attach": self.block_attach, "block-detach": self.block_detach,
                "block-list": self.block_list, "network-attach": self.network_attach,
                "network-detach": self.network_detach, "network-list": self.network_list}

    # -- block ----------------------------------------------------------------------------
    def block_attach(self, args: dict[str, Any]) -> dict[str, Any]:
        """``spec``: an xl disk spec; ``base``: the absolute folder relative targets are in."""
        spec_text = _arg(args, "spec", str)
        base = _arg(args, "base", str, os.getcwd())
        if not os.path.isabs(base):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "base: expected an absolute path")
        devices = self.devices()
        try:
            spec = parse_disk(spec_text, Path(base))
            backend = devices.attach(spec)
        except ConfigError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e)) from None
        if self.config is not None:
            self.config.device_added(spec)
        return self._block_row(devices, backend)

    def block_detach(self, args: dict[str, Any]) -> dict[str, Any]:
        """``vdev``: ``xvdb`` or its device id; ``force``: remove without asking the guest."""
        vdev = _arg(args, "vdev", str)
        force = _arg(args, "force", bool, False)
        devices = self.devices()
        backend = self._find(devices, vdev, "vbd")
        backend.unplug(force)
        if self.config is not None:
            self.config.device_removed("vbd", backend.device.devid)
        return {"vdev": backend.device.name, "devid": backend.device.devid, "forced": force}

    def block_list(self, args: dict[str, Any]) -> dict[str, Any]:
        devices = self.devices()
        return {"devices": [self._block_row(devices, b) for b in self._live(devices, "vbd")]}

    def _block_row(self, devices: "DeviceManager", b: "XenbusBackend") -> dict[str, Any]:
        spec = b.device.spec
        return {"vdev": b.device.name, "devid": b.device.devid, "target": str(spec.target),
                "mode": "r" if spec.readonly else "w", "devtype": "cdrom" if spec.cdrom else "disk",
                **self._states(devices, b)}

    # -- network --------------------------------------------------------------------------------
    def network_attach(self, args: dict[str, Any]) -> dict[str, Any]:
        """``spec``: an xl vif spec (``mac=..., bridge=...``, may be empty); the next free devid."""
        spec_text = _arg(args, "spec", str, "")
        devices = self.devices()
        live = {b.device.devid for b in self._live(devices, "vif")}
        devid = next(i for i in range(len(live) + 1) if i not in live)
        try:
            spec = parse_vif(spec_text, devid, self.domain_name)
            if any(b.device.spec.mac == spec.mac for b in self._live(devices, "vif")):
                raise ConfigError(f"vifs: mac {spec.mac} is already in use by this domain")
            backend = devices.attach(spec)
        except ConfigError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e)) from None
        if self.config is not None:
            self.config.device_added(spec)
        return self._vif_row(devices, backend)

    def network_detach(self, args: dict[str, Any]) -> dict[str, Any]:
        """``id``: the vif's devid (a number) or its MAC; ``force`` as for block-detach."""
        ident = args.get("id")
        force = _arg(args, "force", bool, False)
        if isinstance(ident, bool) or not isinstance(ident, (int, str)):
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "id: expected a device id or a MAC address")
        devices = self.devices()
        if isinstance(ident, str) and _MAC.match(ident):
            backend = next((b for b in self._live(devices, "vif") if b.device.spec.mac == ident.lower()), None)
            if backend is None:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"no vif with MAC {ident} attached")
        else:
            backend = self._find(devices, str(ident), "vif")
        backend.unplug(force)
        if self.config is not None:
            self.config.device_removed("vif", backend.device.devid)
        return {"devid": backend.device.devid, "mac": backend.device.spec.mac, "forced": force}

    def network_list(self, args: dict[str, Any]) -> dict[str, Any]:
        devices = self.devices()
        return {"devices": [self._vif_row(devices, b) for b in self._live(devices, "vif")]}

    def _vif_row(self, devices: "DeviceManager", b: "XenbusBackend") -> dict[str, Any]:
        spec = b.device.spec
        return {"devid": b.device.devid, "mac": spec.mac, "ifname": b.device.name, "bridge": spec.bridge,
                **self._states(devices, b)}

    # -- shared ------------------------------------------------------------------------------------
    @staticmethod
    def _live(devices: "DeviceManager", type_: str) -> list["XenbusBackend"]:
        rows = [b for (t, _), b in list(devices.backends.items()) if t == type_ and not b.removed.is_set()]
        return sorted(rows, key=lambda b: b.device.devid)

    @staticmethod
    def _find(devices: "DeviceManager", ident: str, type_: str) -> "XenbusBackend":
        if type_ == "vif" and not ident.isdigit():
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{ident[:64]!r} is neither a vif device id nor a MAC")
        try:
            return devices.find(ident, type_)
        except ConfigError as e:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, str(e)) from None

    @staticmethod
    def _states(devices: "DeviceManager", b: "XenbusBackend") -> dict[str, Any]:
        fe = devices.xs.read(f"{b.fe_path}/state")
        return {"backend_state": int(b.state), "frontend_state": int(fe) if fe and fe.isdigit() else None,
                "backend": b.be_path}
