"""A small toolstack: managed domains (one VMM process each), their run directory and control API.

rundir.py (names, domids, the per-domain folder), protocol.py and server.py
(the JSON-lines control socket, docs/control-api.md), client.py (its client),
vmm.py (the VMM process: machines in turn, on_* actions), pause.py, console.py
(attach a terminal), commands.py (the xl-style CLI commands).
"""
