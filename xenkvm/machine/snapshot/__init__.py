"""Snapshots of a running Machine: the file format, the RAM file, the state of vCPUs, VM and devices.

A snapshot is two files (docs/snapshots.md): ``PATH`` (a header and checksummed JSON
sections: every vCPU, the in-kernel irqchip/PIT/clock, each device, each extension's own
section) and ``PATH.ram`` (guest memory, sparse: zero pages are holes), which a restore
maps copy-on-write so its cost does not grow with guest RAM.
"""
