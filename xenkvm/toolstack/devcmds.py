"""``xenkvm block-attach/-detach/-list`` and ``network-attach/-detach/-list``, spelled as xl's.

Each sends one control-API op (xenkvm/toolstack/devices.py) to the domain's VMM.
Like xl, ``block-detach``/``network-detach`` wait until the guest has let the
device go (the unplug handshake); ``--force`` removes it without asking the guest.
A bad spec or an unknown device is one line from the VMM (exit 1); the domain keeps
running.
"""
from __future__ import annotations

import json
import os
import sys
import time

from xenkvm.toolstack.commands import WAIT_POLL, call

DETACH_TIMEOUT = 30.0


def add_parsers(sub) -> None:
    ba = sub.add_parser("block-attach", help="hot-plug a disk (as xl block-attach DOMAIN DISKSPEC)")
    ba.add_argument("name")
    ba.add_argument("spec", nargs="+", help="xl disk spec, e.g. 'format=raw, vdev=xvdb, access=rw, target=b.img' "
                    "(several words are joined with commas)")
    bd = sub.add_parser("block-detach", help="hot-unplug a disk (as xl block-detach DOMAIN VDEV)")
    bd.add_argument("name")
    bd.add_argument("vdev", help="xvdb, or its device id")
    na = sub.add_parser("network-attach", help="hot-plug a vif (as xl network-attach DOMAIN [VIFSPEC])")
    na.add_argument("name")
    na.add_argument("spec", nargs="*", help="xl vif spec, e.g. 'mac=00:16:3e:01:02:03, bridge=br0'")
    nd = sub.add_parser("network-detach", help="hot-unplug a vif (as xl network-detach DOMAIN DEVID|MAC)")
    nd.add_argument("name")
    nd.add_argument("id", help="the vif's device id or MAC address")
    for p in (bd, nd):
        p.add_argument("--force", action="store_true", help="remove it without waiting for the guest")
        p.add_argument("--timeout", type=float, default=DETACH_TIMEOUT,
                       help=f"seconds to wait for the guest to let it go (default {DETACH_TIMEOUT:g})")
    for what in ("block", "network"):
        ls = sub.add_parser(f"{what}-list", help=f"list a domain's {'disks' if what == 'block' else 'vifs'} "
                            f"(as xl {what}-list DOMAIN)")
        ls.add_argument("name")
        ls.add_argument("--json", action="store_true", help="one JSON array instead of the table")


def _join(words: list[str]) -> str:
    return ", ".join(w.strip().strip(",") for w in words if w.strip().strip(","))


def cmd_block_attach(args) -> int:
    call(args.name, "block-attach", spec=_join(args.spec), base=os.getcwd())
    return 0


def cmd_network_attach(args) -> int:
    row = call(args.name, "network-attach", spec=_join(args.spec))
    print(f"vif {row['devid']}: mac {row['mac']}, tap {row['ifname']}")
    return 0


def _wait_gone(name: str, op: str, key: str, value, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(row[key] != value for row in call(name, op)["devices"]):
            return 0
        time.sleep(WAIT_POLL)
    print(f"xenkvm: {name}: the guest did not release it within {timeout:g} s (--force removes it anyway)",
          file=sys.stderr)
    return 1


def cmd_block_detach(args) -> int:
    res = call(args.name, "block-detach", vdev=args.vdev, force=args.force)
    return _wait_gone(args.name, "block-list", "devid", res["devid"], args.timeout)


def cmd_network_detach(args) -> int:
    ident = int(args.id) if args.id.isdigit() else args.id
    res = call(args.name, "network-detach", id=ident, force=args.force)
    return _wait_gone(args.name, "network-list", "devid", res["devid"], args.timeout)


_STATES = {1: "init", 2: "initwait", 3: "initialised", 4: "connected", 5: "closing", 6: "closed"}


def _state(n) -> str:
    return _STATES.get(n, "-" if n is None else str(n))


def cmd_block_list(args) -> int:
    rows = call(args.name, "block-list")["devices"]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'Vdev':<8} {'Devid':>6} {'BE':<11} {'FE':<11} {'Mode':<4} {'Type':<5} Target")
    for r in rows:
        print(f"{r['vdev']:<8} {r['devid']:>6} {_state(r['backend_state']):<11} {_state(r['frontend_state']):<11} "
              f"{r['mode']:<4} {r['devtype']:<5} {r['target']}")
    return 0


def cmd_network_list(args) -> int:
    rows = call(args.name, "network-list")["devices"]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'Idx':>3} {'Mac':<17} {'BE':<11} {'FE':<11} {'Tap':<15} Bridge")
    for r in rows:
        print(f"{r['devid']:>3} {r['mac']:<17} {_state(r['backend_state']):<11} {_state(r['frontend_state']):<11} "
              f"{r['ifname']:<15} {r['bridge'] or '-'}")
    return 0


COMMANDS = {"block-attach": cmd_block_attach, "block-detach": cmd_block_detach, "block-list": cmd_block_list,
            "network-attach": cmd_network_attach, "network-detach": cmd_network_detach,
            "network-list": cmd_network_list}
