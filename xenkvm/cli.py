"""The ``xenkvm`` command: run a guest, describe the host, run the xenstore daemon, drive a guest.

User mistakes (bad YAML, missing files, a host without /dev/kvm) end with one
line on stderr and a non-zero status, never a traceback.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

import dataclasses

from xenkvm.config import BootMode, ConfigError, HypercallTrap, XenConfig, load_config, parse_hypervisor_log
from xenkvm.machine.boot import BootError
from xenkvm.kvm.errors import KvmError
from xenkvm.machine.snapshot.format import SnapshotError
from xenkvm.toolstack.protocol import ApiError

log = logging.getLogger("xenkvm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xenkvm", description="Run Xen guests on plain KVM.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest and show its console")
    run.add_argument("guest", nargs="?", help="guest definition (YAML)")
    run.add_argument("--kernel", help="kernel image (PVH ELF or bzImage)")
    run.add_argument("--initrd", help="initial ramdisk")
    run.add_argument("--cmdline", help="kernel command line")
    run.add_argument("--memory", help="guest RAM, e.g. 256M or 1G")
    run.add_argument("--vcpus", type=int, help="number of vCPUs")
    run.add_argument("--boot", choices=[m.value for m in BootMode], help="boot protocol")
    run.add_argument("--console", help="stdio, none or file:PATH")
    run.add_argument("--trace", action="store_true", help="print every VM exit (and hypercall) as one line")
    run.add_argument("--xen", action="store_true", help="give the guest the Xen ABI (as a `xen:` section would)")
    run.add_argument("--hypercall-trap", choices=[t.value for t in HypercallTrap],
                     help="force how hypercalls are trapped (implies --xen)")
    run.add_argument("--xenstore-socket", metavar="PATH",
                     help="socket of the embedded xenstored (implies --xen; default $XENSTORED_PATH "
                          "or ${XENSTORED_RUNDIR:-/run/xenstored}/socket)")
    run.add_argument("--hypervisor-log", metavar="SINK",
                     help="where console_io output (Xen's own console) goes: stderr, none or file:PATH "
                          "(implies --xen; default stderr, each line prefixed \"(XEN) \")")

    run.add_argument("--restore", metavar="FILE",
                     help="resume the guest saved in snapshot FILE (FILE.ram beside it) instead of booting")
    run.add_argument("--prefault", action="store_true",
                     help="with --restore: read all of the guest's RAM in now, not on first touch")
    run.add_argument("--stop-after-snapshot", action="store_true",
                     help="with --snapshot-on-port: stop the guest once the snapshot is written, before it "
                          "runs on (as save does; exit status 130)")
    run.add_argument("--disk-copy", metavar="DIR",
                     help="with --restore: run on copies of the writable disks made in DIR (reflink or "
                          "sparse), so restores of one snapshot write independently")
    run.add_argument("--snapshot-on-port", metavar="FILE",
                     help="tests: a guest write to port 0xee (layout.SNAPSHOT_PORT) snapshots it to FILE "
                          "and it runs on")
    sub.add_parser("info", help="describe this host's KVM, capabilities and hypercall traps")

    sd = sub.add_parser("shutdown", help="ask a Xen guest to power off (as xl shutdown NAME); "
                        "the older form ACTION --socket PATH writes a running guest's store directly")
    sd.add_argument("target", help="a managed domain's name, or poweroff|reboot|halt with --socket/--domid")
    sd.add_argument("--socket", metavar="PATH", help="legacy form: the guest's xenstored socket (default "
                    "$XENSTORED_PATH or ${XENSTORED_RUNDIR:-/run/xenstored}/socket)")
    sd.add_argument("--domid", type=int, default=None, help="legacy form: the guest's domid (default 1)")
    sd.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the guest to react (0: do not wait; default 30)")
    sd.add_argument("-w", "--wait", action="store_true", help="also wait until the domain is gone")

    ms = sub.add_parser("mem-set", help="set a Xen guest's memory target (as xl mem-set NAME SIZE)")
    ms.add_argument("words", nargs="+", metavar="NAME SIZE",
                    help="a managed domain's name and the new target, e.g. 256M or 1G (a bare number is MiB); "
                    "at most the guest's memory/static-max.  The older form SIZE --socket PATH writes a "
                    "running guest's store directly")
    ms.add_argument("--socket", metavar="PATH", help="legacy form: the guest's xenstored socket")
    ms.add_argument("--domid", type=int, default=1, help="legacy form: the guest's domid (default 1)")

    _toolstack_parsers(sub)
    xs = sub.add_parser("xenstored", help="run the xenstore daemon standalone", add_help=False)
    xs.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _toolstack_parsers(sub) -> None:
    """The xl-style commands of xenkvm/toolstack (docs/control-api.md, README's xl table)."""
    cr = sub.add_parser("create", help="start a domain in the background from an xl.cfg or YAML file")
    cr.add_argument("config", help="domain configuration (xl.cfg(5) syntax, or the YAML guest definition)")
    cr.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                    help="xl.cfg settings after the file's, as xl create (e.g. 'vif=[]'); xl.cfg files only")
    cr.add_argument("-c", dest="console", action="store_true", help="attach its console after starting")
    cr.add_argument("--progress", action="store_true",
                    help="with -c: while the console is quiet, a status line with the boot phase (slow hosts)")
    cr.add_argument("-F", dest="foreground", action="store_true",
                    help="stay in the foreground with the console on this terminal (as `run`)")
    cr.add_argument("--xenstore", choices=("shared", "embedded"), default="shared",
                    help="the host's shared xenstored (default; started on demand) or one in the VMM")
    ls = sub.add_parser("list", help="list managed domains (name, domid, memory, vCPUs, state, uptime)")
    ls.add_argument("--json", action="store_true", help="one JSON array instead of the table")
    for name, text in (("console", "attach to a domain's console (detach with Ctrl-])"),
                       ("destroy", "stop a domain at once"),
                       ("pause", "stop a domain's vCPUs and its Xen clock"),
                       ("unpause", "let a paused domain run on"),
                       ("dmesg", "show the hypervisor console (console_io output) of a domain")):
        sub.add_parser(name, help=text).add_argument("name")
    sub.choices["console"].add_argument("--progress", action="store_true",
                                        help="while the console is quiet, a status line with the boot phase")
    rb = sub.add_parser("reboot", help="ask a Xen guest to reboot (control/shutdown = reboot)")
    rb.add_argument("name")
    rb.add_argument("-w", "--wait", action="store_true", help="wait until it has come back")
    rb.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)")
    from xenkvm.toolstack.devcmds import add_parsers as add_device_parsers
    add_device_parsers(sub)
    vs = sub.add_parser("vcpu-set", help="set how many of a Xen guest's maxvcpus are online (as xl vcpu-set)")
    vs.add_argument("name")
    vs.add_argument("count", type=int, help="vCPUs online, 1 to maxvcpus (cpu/N/availability)")
    for name, text in (("snapshot", "save a domain to FILE (and FILE.ram) and let it run on"),
                       ("save", "save a domain to FILE (and FILE.ram) and stop it, as xl save")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("name")
        sp.add_argument("file")
        if name == "save":
            sp.add_argument("--timeout", type=float, default=60.0,
                            help="seconds a guest that suspends itself has to do so (default 60)")
    rs = sub.add_parser("restore", help="resume a domain saved with snapshot or save, as a managed domain")
    rs.add_argument("file")
    rs.add_argument("--name", help="the restored domain's name (default: the saved one's)")
    rs.add_argument("-c", dest="console", action="store_true", help="attach its console after starting")
    rs.add_argument("--disk-copy", metavar="DIR",
                    help="run on copies of the writable disks made in DIR (reflink or sparse), so restores of "
                         "one snapshot write independently (as run --restore --disk-copy)")
    cf = sub.add_parser("config", help="convert a domain configuration")
    cf.add_argument("--to-yaml", action="store_true", help="print an xl.cfg file as the YAML guest definition")
    cf.add_argument("config")


def _setup_logging(verbose: int, trace: bool = False) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="xenkvm: %(levelname)s: %(name)s: %(message)s")
    if trace:
        logging.getLogger("xenkvm.trace").setLevel(logging.INFO)
    logging.getLogger("xenkvm.backends.console.tty").setLevel(logging.INFO)   # a console's pty path


def cmd_run(args: argparse.Namespace) -> int:
    from xenkvm.build import build_machine

    overrides = {"kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline,
                 "memory": args.memory, "vcpus": args.vcpus, "boot": args.boot, "console": args.console}
    if args.restore:
        return _run_restored(args)
    if args.disk_copy:
        raise ConfigError("run --disk-copy: only with --restore")
    if args.guest is None and args.kernel is None:
        raise ConfigError("run: give a guest definition (YAML) or --kernel")
    cfg = load_config(args.guest, overrides)
    if args.xen or args.hypercall_trap or args.xenstore_socket or args.hypervisor_log:
        xen = cfg.xen or XenConfig()
        if args.hypercall_trap:
            xen = dataclasses.replace(xen, hypercall_trap=HypercallTrap(args.hypercall_trap))
        if args.xenstore_socket:
            xen = dataclasses.replace(xen, xenstore_socket=args.xenstore_socket)
        if args.hypervisor_log:
            xen = dataclasses.replace(xen, hypervisor_log=parse_hypervisor_log(args.hypervisor_log))
        cfg = dataclasses.replace(cfg, xen=xen)
    _refuse_xen_console_without_xen(cfg)
    machine = build_machine(cfg, trace=args.trace)
    if args.snapshot_on_port:
        from xenkvm.machine.layout import SNAPSHOT_PORT
        machine.snapshot_on_port(SNAPSHOT_PORT, args.snapshot_on_port, stop=args.stop_after_snapshot)
    return _run_machine(machine)


def _run_restored(args: argparse.Namespace) -> int:
    """``run --restore FILE``: the saved guest, resumed (its own config; --console may redirect)."""
    from xenkvm.build import restore_machine
    from xenkvm.machine.devices.console import open_sink
    if args.guest or args.kernel or args.snapshot_on_port:
        raise ConfigError("run --restore: the snapshot holds the guest; give no guest, --kernel or "
                          "--snapshot-on-port")
    sink = open_sink(args.console) if args.console else None
    return _run_machine(restore_machine(args.restore, prefault=args.prefault, sink=sink, trace=args.trace,
                                        xenstore_socket=args.xenstore_socket, disk_copy=args.disk_copy))


def _run_machine(machine) -> int:
    from xenkvm.machine.status import ExitStatus
    cfg = machine.cfg
    try:
        result = machine.run()
    finally:
        machine.close()
    if result.status is ExitStatus.POWEROFF:
        log.info("%s", result.message)
    else:
        print(f"xenkvm: {cfg.name}: {result.message}", file=sys.stderr)
        if result.status in (ExitStatus.GUEST_CRASH, ExitStatus.GUEST_HALTED) and result.console_tail:
            print("last console lines:\n  " + "\n  ".join(result.console_tail), file=sys.stderr)
    return int(result.status)


#: Kernel parameters whose console exists only under Xen (hvc0 is the Xen console ring,
#: earlyprintk=xen the console_io hypercall): without the Xen ABI such a guest prints nothing.
XEN_ONLY_CONSOLES = ("console=hvc0", "earlyprintk=xen")


def _refuse_xen_console_without_xen(cfg) -> None:
    """A guest told to use Xen's console, run without Xen, would run silently: say so and stop."""
    if cfg.xen is not None:
        return
    words = [w for w in (cfg.cmdline or "").split() if w in XEN_ONLY_CONSOLES]
    if words:
        raise ConfigError(f"{cfg.name}: its command line ({' '.join(words)}) uses the Xen console, which "
                          "needs the Xen ABI: run it with --xen (or a `xen:` section)")


SHUTDOWN_ACTIONS = ("poweroff", "reboot", "halt")


def cmd_shutdown(args: argparse.Namespace) -> int:
    """Write ``control/shutdown``; then wait for the guest to clear it (Linux's acknowledgement),
    to stop (its VMM, and so the embedded xenstored, goes away), or, with ``--wait``, to be gone."""
    import time

    from xenkvm.xenstore import XenstoreError, XsError, default_socket_path
    from xenkvm.xenstore.client import XsClient

    path = args.socket or default_socket_path()
    home, node = f"/local/domain/{args.domid}", f"/local/domain/{args.domid}/control/shutdown"
    try:
        client = XsClient(path, timeout=5.0)
    except OSError as e:
        raise ConfigError(f"shutdown: no xenstored at {path} ({e.strerror or e}): is the guest running?") from None
    deadline = time.monotonic() + args.timeout
    acked = False
    with client:
        try:
            try:
                client.read(f"{home}/domid")
            except XenstoreError as e:
                if e.err is XsError.ENOENT:
                    raise ConfigError(f"shutdown: no domain {args.domid} in the xenstore at {path}") from None
                raise
            client.watch(node, "xenkvm-shutdown")
            client.watch("@releaseDomain", "xenkvm-release")
            client.write(node, args.action)
            while args.timeout > 0:
                if not acked:
                    acked = client.read(node).decode(errors="replace") != args.action
                    if acked and not args.wait:
                        break
                client.read(f"{home}/domid")            # ENOENT once the domain is released
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = "stop" if acked else f"react to {args.action!r}"
                    print(f"xenkvm: shutdown: dom{args.domid} did not {what} within {args.timeout:g} s",
                          file=sys.stderr)
                    return 1
                client.sock.settimeout(remaining)
                try:
                    client.wait_event()
                except TimeoutError:
                    pass
        except XenstoreError as e:
            if e.err is not XsError.ENOENT:
                print(f"xenkvm: shutdown: dom{args.domid}: xenstore error {e}", file=sys.stderr)
                return 1
        except (ConnectionError, OSError):
            pass                                         # the VMM (and its xenstored) exited: the guest stopped
    return 0


def cmd_mem_set(args: argparse.Namespace) -> int:
    """Write ``memory/target`` (KiB), which the guest's balloon driver follows.

    Like ``xl mem-set``: the target may not exceed ``memory/static-max`` (libxl
    refuses it); it must be a whole number of 4 KiB pages and not zero.
    """
    from xenkvm.config import parse_size
    from xenkvm.xenstore import XenstoreError, XsError, default_socket_path
    from xenkvm.xenstore.client import XsClient

    size = parse_size(args.size, "mem-set")
    if size <= 0 or size % 4096:
        raise ConfigError(f"mem-set: {args.size!r} is not a positive whole number of 4 KiB pages")
    path = args.socket or default_socket_path()
    home = f"/local/domain/{args.domid}"
    try:
        client = XsClient(path, timeout=5.0)
    except OSError as e:
        raise ConfigError(f"mem-set: no xenstored at {path} ({e.strerror or e}): is the guest running?") from None
    with client:
        try:
            raw = client.read(f"{home}/memory/static-max")
            if not raw.isdigit():
                print(f"xenkvm: mem-set: dom{args.domid}'s memory/static-max is {raw!r}", file=sys.stderr)
                return 1
            if size >> 10 > int(raw):
                raise ConfigError(f"mem-set: {size >> 20} MiB is above dom{args.domid}'s static maximum "
                                  f"of {int(raw) >> 10} MiB")
            client.write(f"{home}/memory/target", str(size >> 10))
        except XenstoreError as e:
            if e.err is XsError.ENOENT:
                raise ConfigError(f"mem-set: no domain {args.domid} in the xenstore at {path}") from None
            print(f"xenkvm: mem-set: dom{args.domid}: xenstore error {e}", file=sys.stderr)
            return 1
        except (ConnectionError, OSError) as e:
            print(f"xenkvm: mem-set: lost the xenstored at {path}: {e}", file=sys.stderr)
            return 1
    log.info("dom%d: memory/target = %d KiB", args.domid, size >> 10)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from xenkvm.kvm.system import Kvm
    from xenkvm.machine.host import Host

    with Kvm() as kvm:
        print("\n".join(Host.probe(kvm).describe()))
    return 0


def _vmm_args(argv: list[str]) -> argparse.Namespace | None:
    """The hidden ``[-v...] _vmm DIR CONFIG [KEY=VALUE...]`` form ``create`` starts its background VMM with
    (``_vmm DIR --restore FILE [--disk-copy DIR]`` for ``restore``)."""
    verbose = 0
    while argv[:1] == ["-v"]:
        verbose, argv = verbose + 1, argv[1:]
    if argv[:1] == ["_vmm"] and len(argv) in (4, 6) and argv[2] == "--restore" and argv[4:5] in ([], ["--disk-copy"]):
        return argparse.Namespace(command="_vmm", verbose=verbose, dir=argv[1], config=None, restore=argv[3],
                                  disk_copy=argv[5] if len(argv) == 6 else None)
    if argv[:1] != ["_vmm"] or len(argv) < 3:
        return None
    return argparse.Namespace(command="_vmm", verbose=verbose, dir=argv[1], config=argv[2], settings=argv[3:])


def _toolstack_command(args: argparse.Namespace) -> int:
    from xenkvm.toolstack import commands as ts
    from xenkvm.toolstack.devcmds import COMMANDS as DEVICE_COMMANDS

    if args.command in DEVICE_COMMANDS:
        return DEVICE_COMMANDS[args.command](args)
    simple = {"pause": "pause", "unpause": "unpause"}
    if args.command in simple:
        return ts.cmd_simple(args, simple[args.command])
    if args.command == "reboot":
        return ts.cmd_shutdown_api(args, "reboot")
    if args.command in ("snapshot", "save"):
        return ts.cmd_snapshot(args, args.command)
    table = {"create": ts.cmd_create, "list": ts.cmd_list, "console": ts.cmd_console, "destroy": ts.cmd_destroy,
             "dmesg": ts.cmd_dmesg, "config": ts.cmd_config, "_vmm": ts.cmd_vmm, "vcpu-set": ts.cmd_vcpu_set,
             "restore": ts.cmd_restore}
    return table[args.command](args)


def _legacy_target(word: str, socket: str | None, domid: int | None) -> bool:
    """Whether ``shutdown``/``mem-set`` names the old direct-to-xenstore form rather than a domain."""
    from xenkvm.toolstack.rundir import RunDir
    if socket is not None or domid is not None:
        return True
    try:
        return RunDir().find(word) is None
    except ConfigError:
        return True


def _shutdown(args: argparse.Namespace) -> int:
    from xenkvm.toolstack import commands as ts

    if args.target in SHUTDOWN_ACTIONS and _legacy_target(args.target, args.socket, args.domid):
        args.action, args.domid = args.target, 1 if args.domid is None else args.domid
        return cmd_shutdown(args)
    args.name = args.target
    return ts.cmd_shutdown_api(args, "poweroff")


def _mem_set(args: argparse.Namespace) -> int:
    from xenkvm.toolstack import commands as ts

    if len(args.words) == 1:
        args.size = args.words[0]
        return cmd_mem_set(args)
    if len(args.words) != 2 or args.socket is not None:
        raise ConfigError("mem-set: give NAME SIZE (or the older SIZE --socket PATH)")
    args.name = args.words[0]
    return ts.cmd_mem_set_api(*args.words)


#: ``kill -USR2`` a VMM (``run``, a domain's ``_vmm``): every thread's stack on its stderr
STACKS_SIGNAL = signal.SIGUSR2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["xenstored"] and "--shared" in argv:
        from xenkvm.toolstack.xenstored import main as shared_main
        try:
            return shared_main(argv[1:])
        except ConfigError as e:
            print(f"xenkvm: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["xenstored"]:
        from xenkvm.xenstore.daemon import main as xenstored_main
        return xenstored_main(argv[1:])
    vmm = _vmm_args(argv)
    args = vmm or _parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "trace", False))
    if args.command in ("run", "_vmm"):
        # a hung guest's VMM: `kill -USR2 PID` prints every thread's Python stack to stderr (the
        # domain's vmm.log) and the VMM runs on; SIGUSR1 is the vCPU kick (machine/vcpu_loop.py)
        faulthandler.register(STACKS_SIGNAL, all_threads=True)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "shutdown":
            return _shutdown(args)
        if args.command == "mem-set":
            return _mem_set(args)
        if args.command == "info":
            return cmd_info(args)
        return _toolstack_command(args)
    except (ConfigError, BootError, SnapshotError) as e:
        print(f"xenkvm: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"xenkvm: {getattr(args, 'name', '')}: {e.message} ({e.code.value})", file=sys.stderr)
        return 1
    except KvmError as e:
        print(f"xenkvm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
