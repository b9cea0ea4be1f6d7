"""What ``make run`` runs: Debian as a managed Xen PVH domain with its console attached.

``python -m xenkvm.quickstart [guests/debian-pvh.cfg]`` (docs/make-run.md):

1. reads the xl.cfg domain file (only its settings: the disk does not exist yet on a
   first run);
2. makes the domain's writable root disk: the ``xvda`` target, when missing, becomes a
   sparse copy of the pristine ``make rootfs-image`` image (``--root-image``), so the
   pristine image is never written and the user's files survive the next run;
3. networking: each vif with ``bridge=B`` needs that bridge.  As root, B is created when
   missing (``ip link add B type bridge``) and given the host's address, the cfg's
   ``xenkvm.gw=`` with the prefix of ``xenkvm.ip=``, so the guest can ping the host.
   Without root a tap cannot be made: the domain starts with ``vif=[]`` and one line
   says so;
4. if a domain of that name is already running, attaches to it instead of starting it
   twice;
5. prints how to detach, list and shut the domain down, then becomes
   ``xenkvm create -c --progress FILE [vif=[]]``: a managed domain, its console on this
   terminal with boot phases shown while the console is quiet (xenkvm/bootprogress.py).

Mistakes (no such file, no image, a name in the way) are one line and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from xenkvm import xlcfg
from xenkvm.config import ConfigError
from xenkvm.diskspec import spec_target
from xenkvm.vifspec import parse_vif

log = logging.getLogger("xenkvm.quickstart")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GUEST = ROOT / "guests" / "debian-pvh.cfg"
DEFAULT_ROOT_IMAGE = ROOT / ".cache" / "linux" / "rootfs.ext4"
ROOT_VDEV = "xvda"


@dataclass(frozen=True)
class Plan:
    """What the launcher found in the domain file."""

    cfg: Path
    name: str
    root_disk: Path | None         #: the xvda target (made from the pristine image when missing)
    bridges: tuple[str, ...]       #: bridges the vifs join
    guest_ip: str | None           #: xenkvm.ip=ADDR/PREFIX of the command line
    host_ip: str | None            #: the host's ADDR/PREFIX on the bridge (xenkvm.gw + the prefix)


def read_plan(cfg: Path) -> Plan:
    """The name, root disk, bridges and addresses ``cfg`` names (ConfigError if unreadable)."""
    raw = xlcfg.read(cfg)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cfg}: name: required")
    base = cfg.resolve().parent
    root_disk = None
    for spec in raw.get("disk") or []:
        found = spec_target(str(spec), base)
        if found is not None and found[0] == ROOT_VDEV:
            root_disk = found[1].resolve()
    bridges = tuple(dict.fromkeys(v.bridge for v in (parse_vif(str(s), i, name) for i, s in
                                                     enumerate(raw.get("vif") or [])) if v.bridge))
    words = " ".join(str(raw.get(k) or "") for k in ("cmdline", "extra")).split()
    guest_ip = next((w.split("=", 1)[1] for w in words if w.startswith("xenkvm.ip=")), None)
    gateway = next((w.split("=", 1)[1] for w in words if w.startswith("xenkvm.gw=")), None)
    host_ip = None
    if gateway:
        prefix = guest_ip.partition("/")[2] if guest_ip and "/" in guest_ip else "24"
        host_ip = f"{gateway}/{prefix}"
    return Plan(cfg, name, root_disk, bridges, guest_ip, host_ip)


def make_root_disk(target: Path, pristine: Path) -> bool:
    """A sparse copy of ``pristine`` at ``target`` unless one is there; True if made now."""
    if target.exists():
        return False
    if not pristine.is_file():
        raise ConfigError(f"{pristine}: no root image (make rootfs-image builds it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    res = _tool(["cp", "--sparse=always", str(pristine), str(tmp)])
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot copy {pristine} to {tmp}: {res.stderr.strip()}")
    os.replace(tmp, target)
    return True


def _tool(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a host tool; its absence is a one-line ConfigError, not a traceback."""
    try:
        return subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]}: not installed (make run needs it: {'iproute2' if argv[0] == 'ip' else 'coreutils'})")


def _ip(*args: str) -> str:
    res = _tool(["ip", *args])
    if res.returncode != 0:
        raise ConfigError(f"ip {' '.join(args)}: {res.stderr.strip() or 'failed'}")
    return res.stdout


def ensure_bridge(bridge: str, address: str | None, sysfs: Path = Path("/sys/class/net")) -> bool:
    """Bridge ``bridge`` up, holding ``address`` (ADDR/PREFIX) if given; True if created now.
    An interface of that name that is not a bridge is refused (one line)."""
    made = False
    if not (sysfs / bridge).exists():
        _ip("link", "add", bridge, "type", "bridge")
        made = True
    elif not (sysfs / bridge / "bridge").is_dir():
        raise ConfigError(f"{bridge}: a host interface of that name exists and is not a bridge")
    if address and f" {address} " not in _ip("-o", "addr", "show", "dev", bridge):
        _ip("addr", "add", address, "dev", bridge)
    _ip("link", "set", bridge, "up")
    return made


def running(name: str) -> bool:
    """Whether a managed domain ``name`` exists and its VMM answers."""
    from xenkvm.toolstack.commands import list_domains
    return any(r["name"] == name and r["state"] in ("running", "paused", "starting") for r in list_domains())


def xenkvm_command() -> str:
    """How the user calls the CLI: ``.venv/bin/xenkvm`` (relative when below the cwd)."""
    exe = Path(sys.executable).parent / "xenkvm"
    if not exe.exists():
        return "python3 -m xenkvm"
    try:
        return os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else str(exe)
    except ValueError:
        return str(exe)


def help_lines(name: str) -> list[str]:
    x = xenkvm_command()
    return ["  detach: Ctrl-]   (the domain keeps running)",
            f"  list:   {x} list",
            f"  attach: {x} console {name}",
            f"  stop:   {x} shutdown {name}   (or type poweroff -f in its shell)"]


def prepare(plan: Plan, pristine: Path, is_root: bool) -> list[str]:
    """Root disk and network ready; the ``KEY=VALUE`` settings ``create`` gets, with one line each
    for what was done."""
    settings: list[str] = []
    if plan.root_disk is not None and make_root_disk(plan.root_disk, pristine):
        print(f"make run: {plan.name}'s root disk is {os.path.relpath(plan.root_disk)}, a copy of "
              f"{os.path.relpath(pristine)} (delete it to start afresh)")
    if plan.bridges and not is_root:
        settings.append("vif=[]")
        print(f"make run: no network: a vif's host tap needs root (CAP_NET_ADMIN); `sudo make run` gives "
              f"{plan.name} eth0 on bridge {', '.join(plan.bridges)}")
    elif plan.bridges:
        for bridge in plan.bridges:
            if ensure_bridge(bridge, plan.host_ip):
                print(f"make run: created host bridge {bridge}" + (f" ({plan.host_ip})" if plan.host_ip else ""))
        if plan.guest_ip and plan.host_ip:
            print(f"make run: network: {plan.name}'s eth0 is {plan.guest_ip} on {plan.bridges[0]}, "
                  f"the host is {plan.host_ip.partition('/')[0]}")
    return settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xenkvm.quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("guest", nargs="?", default=str(DEFAULT_GUEST), help="xl.cfg domain file")
    ap.add_argument("--root-image", default=str(DEFAULT_ROOT_IMAGE),
                    help="the pristine image a missing xvda target is copied from")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="xenkvm: %(message)s")
    try:
        cfg = Path(args.guest)
        plan = read_plan(cfg)
        cmd = [sys.executable, "-m", "xenkvm", "create", "-c", "--progress", str(cfg)]
        if running(plan.name):
            print(f"make run: {plan.name} is already running: attaching to its console")
            cmd = [sys.executable, "-m", "xenkvm", "console", "--progress", plan.name]
        else:
            cmd += prepare(plan, Path(args.root_image), os.geteuid() == 0)
            print(f"make run: starting {plan.name}: {shlex.join(['xenkvm', *cmd[3:]])}")
    except ConfigError as e:
        print(f"xenkvm: {e}", file=sys.stderr)
        return 2
    print("\n".join(help_lines(plan.name)), flush=True)
    os.execv(sys.executable, cmd)
    return 0          # not reached


if __name__ == "__main__":
    sys.exit(main())
