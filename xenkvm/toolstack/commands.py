"""The xl-style commands (create, list, console, shutdown, reboot, destroy, pause, unpause,
mem-set, dmesg, config --to-yaml, snapshot, save, restore), each a function of parsed arguments returning an exit status.

They talk to each domain's VMM through its control socket (client.py); user
mistakes are ConfigError (one line, exit 2), a domain that refuses is one line
and exit 1.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xenkvm import xlcfg
from xenkvm.config import ConfigError, GuestConfig, load_config, parse_size
from xenkvm.toolstack.client import ControlClient
from xenkvm.toolstack.console import attach
from xenkvm.toolstack.protocol import ApiError
from xenkvm.toolstack.rundir import DomainDir, RunDir, process_start_time
from xenkvm.toolstack.xenstored import SharedXenstored

log = logging.getLogger(__name__)

START_TIMEOUT = 300.0      #: seconds for a new VMM to answer on its socket (PVM hosts under load)
SNAPSHOT_TIMEOUT = 120.0   #: seconds for a snapshot's files to be written (vCPUs park within 10 s)
WAIT_POLL = 0.2


def load_guest(path: str, settings: Sequence[str] = ()) -> GuestConfig:
    """A guest definition in either format: xl.cfg (xlcfg.is_xl, amended by ``KEY=VALUE``
    ``settings`` as xl create's) or YAML (no settings)."""
    if xlcfg.is_xl(path):
        return xlcfg.load(path, settings=settings)
    if settings:
        raise ConfigError(f"{path}: KEY=VALUE settings ({settings[0]!r}) amend xl.cfg files only, not YAML")
    return load_config(path)


def domain(name: str) -> DomainDir:
    d = RunDir().find(name)
    if d is None:
        raise ConfigError(f"no domain called {name!r} (xenkvm list shows them)")
    return d


def call(name: str, op: str, timeout: float = 10.0, **args) -> dict:
    """One request to ``name``'s VMM; ConfigError (one line) if it is not there."""
    d = domain(name)
    try:
        with ControlClient(d.control, timeout) as c:
            return c.call(op, **args)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(f"{name}: its VMM is not running (xenkvm list reports and cleans it)") from None
    except (ConnectionError, TimeoutError) as e:
        raise VmmGone(f"{name}: the VMM went away during {op!r} ({e})") from None


class VmmGone(ConfigError):
    """The VMM closed the connection before answering (it stopped meanwhile)."""


# -- create ---------------------------------------------------------------------------------------
def cmd_create(args) -> int:
    settings = list(getattr(args, "settings", None) or ())
    cfg = load_guest(args.config, settings)
    run = RunDir()
    shared = None
    if cfg.xen is not None and getattr(args, "xenstore", "shared") == "shared":
        shared = SharedXenstored.of(run)
        shared.ensure(run)      # started on demand; it stays after the last domain
    d, rec = run.allocate(cfg.name, cfg.uuid, time.time())
    if shared is not None:
        rec.xenstored = str(shared.dir)
        d.write(rec)
    if args.foreground:
        from xenkvm.toolstack.vmm import DomainProcess
        return DomainProcess(cfg, d, rec, foreground=True).run()
    return _start_vmm(args, cfg, d, rec, [str(Path(args.config).resolve()), *settings])


def _start_vmm(args, cfg: GuestConfig, d: DomainDir, rec, vmm_args: list[str]) -> int:
    """Start ``_vmm DIR *vmm_args`` in the background and wait until it answers as running."""
    fd = os.open(d.vmm_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log_reader = open(d.vmm_log, "rb")        # still readable after a failed VMM removes its folder
    cmd = [sys.executable, "-m", "xenkvm"] + ["-v"] * max(args.verbose, 1) + ["_vmm", str(d.path), *vmm_args]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    except OSError as e:
        d.remove()
        raise ConfigError(f"create: cannot start the VMM: {e}") from None
    finally:
        os.close(fd)
    rec.pid, rec.start_time = proc.pid, process_start_time(proc.pid) or 0
    d.write(rec)
    with log_reader:
        started = _wait_started(d, proc)
        tail = [] if started else log_reader.read().decode(errors="replace").splitlines()[-8:]
    if not started:
        d.remove()
        print(_start_failure(f"{args.command}: {cfg.name} failed to start", tail), file=sys.stderr)
        return 1
    log.info("created %s (domid %d, pid %d)", cfg.name, rec.domid, proc.pid)
    if args.console:
        return attach(d.control, cfg.name, progress=getattr(args, "progress", False))
    return 0


def _start_failure(what: str, tail: list[str]) -> str:
    """The message for a VMM that did not start: its own one-line error (``xenkvm: ...``, what
    the CLI prints for a refused snapshot or config) where it ended with one, else its log's tail."""
    if tail and tail[-1].startswith("xenkvm: "):
        return f"xenkvm: {what}: {tail[-1][len('xenkvm: '):]}"
    return f"xenkvm: {what}" + (":\n  " + "\n  ".join(tail) if tail else "")


def _wait_started(d: DomainDir, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with ControlClient(d.control, 5.0) as c:
                if c.call("info")["state"] in ("running", "paused"):
                    return True
        except (OSError, ApiError, ValueError):
            pass
        time.sleep(WAIT_POLL)
    proc.kill()
    return False


def cmd_vmm(args) -> int:
    """The hidden ``_vmm DIR CONFIG`` entry: the background VMM that ``create`` started."""
    from xenkvm.toolstack.vmm import DomainProcess
    d = DomainDir(Path(args.dir))
    rec = d.read()
    if rec is None:
        raise ConfigError(f"{d.path}: no domain record")
    if getattr(args, "restore", None):
        proc = DomainProcess(saved_config(args.restore, rec.name), d, rec, restore=args.restore,
                             disk_copy=getattr(args, "disk_copy", None))
    else:
        proc = DomainProcess(load_guest(args.config, getattr(args, "settings", ())), d, rec)
    proc.install_signal_handlers()
    return proc.run()


# -- snapshots (docs/snapshots.md) ------------------------------------------------------------------
def saved_config(path: str, name: str | None = None) -> GuestConfig:
    """The guest config snapshot ``path`` holds (the whole snapshot checked, RAM file included),
    renamed to ``name`` (a copy under another name is another VM: it gets its own uuid, so two
    copies never share ``/vm/<uuid>``); SnapshotError (one line) for a damaged or foreign one."""
    from xenkvm.machine.snapshot import snapshot as snap
    loaded = snap.load(path)
    loaded.close()
    if not name or name == loaded.cfg.name:
        return loaded.cfg
    return dataclasses.replace(loaded.cfg, name=name, uuid=None)


def cmd_snapshot(args, op: str = "snapshot") -> int:
    """``snapshot NAME FILE`` (the domain runs on) and ``save NAME FILE`` (it stops, as xl save)."""
    path = os.path.abspath(args.file)
    extra = {"suspend_timeout": args.timeout} if op == "save" else {}
    res = call(args.name, op, timeout=SNAPSHOT_TIMEOUT + extra.get("suspend_timeout", 0), file=path, **extra)
    log.info("%s: %s to %s (%d pages, paused %.3f s)", args.name, op, path, res["pages"], res["paused_s"])
    if op == "save":
        return _wait(args.name, lambda i: i is None, 30.0, "stop")
    return 0


def cmd_restore(args) -> int:
    """``restore FILE [--name N] [--disk-copy DIR]``: a managed domain again, resumed where the
    snapshot was taken (``--disk-copy``: on copies of its writable disks made in DIR, which the
    VMM makes, as ``run --restore`` does; a DIR that is not a directory is refused here)."""
    path = os.path.abspath(args.file)
    cfg = saved_config(path, args.name)
    copy_args: list[str] = []
    if getattr(args, "disk_copy", None):
        copy_dir = os.path.abspath(args.disk_copy)
        if not os.path.isdir(copy_dir):
            raise ConfigError(f"restore --disk-copy: {args.disk_copy} is not a directory")
        if cfg.xen is None:
            raise ConfigError(f"restore --disk-copy: {path}: the snapshot has no disks")
        copy_args = ["--disk-copy", copy_dir]
    prefer = cfg.xen.domid if cfg.xen is not None else None
    run = RunDir()
    shared = None
    if cfg.xen is not None and cfg.xen.xenstored:     # saved on the shared xenstored: back onto it
        shared = SharedXenstored.of(run)
        shared.ensure(run)
    d, rec = run.allocate(cfg.name, None if args.name else cfg.uuid, time.time(), prefer=prefer)
    if shared is not None:
        rec.xenstored = str(shared.dir)
        d.write(rec)
    return _start_vmm(args, cfg, d, rec, ["--restore", path, *copy_args])


# -- list -----------------------------------------------------------------------------------------
def list_domains() -> list[dict]:
    """Every domain's info; a domain whose VMM is gone is reported ``crashed`` once and cleaned."""
    rows = []
    run = RunDir()
    for d in run.domains():
        rec = d.read()
        try:
            with ControlClient(d.control, 5.0) as c:
                rows.append(c.call("info"))
                continue
        except (OSError, ApiError, ValueError):
            pass
        if rec is None or not rec.alive():
            rows.append({"name": d.name, "domid": rec.domid if rec else None, "state": "crashed",
                         "memory": None, "vcpus": None, "uptime": None})
            with run.locked():        # re-checked under the lock: a create may have reclaimed the name
                again = d.read()
                if again is None or (again.pid == (rec.pid if rec else again.pid) and not again.alive()):
                    d.remove()
        else:
            rows.append({"name": d.name, "domid": rec.domid, "state": "starting" if rec.pid else "unknown",
                         "memory": None, "vcpus": None, "uptime": None})
    return rows


def cmd_list(args) -> int:
    rows = list_domains()
    if args.json:
        import json
        print(json.dumps(rows))
        return 0
    print(f"{'Name':<24} {'ID':>5} {'Mem':>6} {'VCPUs':>5} {'State':<9} {'Time(s)':>9}")
    for r in rows:
        mem = f"{r['memory'] >> 20}" if r.get("memory") else "-"
        up = f"{r['uptime']:.1f}" if r.get("uptime") is not None else "-"
        domid = r["domid"] if r.get("domid") is not None else "-"
        print(f"{r['name']:<24} {domid:>5} {mem:>6} {r.get('vcpus') or '-':>5} {r['state']:<9} {up:>9}")
    return 0


# -- the rest -------------------------------------------------------------------------------------
def cmd_console(args) -> int:
    return attach(domain(args.name).control, args.name, progress=getattr(args, "progress", False))


def _wait(name: str, done, timeout: float, what: str) -> int:
    """Poll ``info`` until ``done(info or None-if-gone)``; 1 with a line on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = call(name, "info", timeout=5.0)
        except ConfigError:
            info = None
        if done(info):
            return 0
        time.sleep(WAIT_POLL)
    print(f"xenkvm: {name} did not {what} within {timeout:g} s", file=sys.stderr)
    return 1


def cmd_shutdown_api(args, action: str) -> int:
    res = call(args.name, "shutdown", action=action)
    if not args.wait:
        return 0
    gen = res["generation"]
    if action == "reboot":
        return _wait(args.name, lambda i: i is None or (i["generation"] > gen and i["state"] == "running"),
                     args.timeout, "come back")
    return _wait(args.name, lambda i: i is None or i["state"] in ("shutdown", "crashed"), args.timeout, "stop")


def cmd_destroy(args) -> int:
    try:
        call(args.name, "destroy")
    except VmmGone:
        pass                             # it stopped before it could answer: that is the point
    return _wait(args.name, lambda i: i is None, 30.0, "go away")


def cmd_simple(args, op: str) -> int:
    call(args.name, op)
    return 0


def cmd_mem_set_api(name: str, size_text: str) -> int:
    size = parse_size(size_text, "mem-set")
    if size <= 0 or size % 4096:
        raise ConfigError(f"mem-set: {size_text!r} is not a positive whole number of 4 KiB pages")
    call(name, "mem-set", bytes=size)
    return 0


def cmd_vcpu_set(args) -> int:
    """``vcpu-set NAME N``: N of the domain's maxvcpus online (xenstore cpu/*/availability)."""
    call(args.name, "vcpu-set", count=args.count)
    return 0


def cmd_dmesg(args) -> int:
    sys.stdout.write(call(args.name, "dmesg")["text"])
    return 0


def cmd_config(args) -> int:
    if not args.to_yaml:
        raise ConfigError("config: say what to do (--to-yaml)")
    sys.stdout.write(xlcfg.to_yaml(xlcfg.read(args.config)))
    return 0
