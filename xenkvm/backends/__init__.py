"""PV device backends: the xenbus framework (xenbus.py), hot-plug (devices.py), block (block.py).

``XenDomain.devices`` is a :class:`DeviceManager`; see each module's docstring.
"""
from .devices import DeviceError, DeviceManager
from .xenbus import ConnectError, XenbusBackend, XenbusDevice, XenbusState

__all__ = ["ConnectError", "DeviceError", "DeviceManager", "XenbusBackend", "XenbusDevice", "XenbusState"]
