"""The ``xenkvm`` command: run a guest, describe the host, run the xenstore daemon, drive a guest.

User mistakes (bad YAML, missing files, a host without /dev/kvm) end with one
line on stderr and a non-zero status, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys

import dataclasses

from xenkvm.config import BootMode, ConfigError, HypercallTrap, XenConfig, load_config, parse_hypervisor_log
from xenkvm.machine.boot import BootError
from xenkvm.kvm.errors import KvmError
from xenkvm.machine.snapshot.format import SnapshotError

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
    run.add_argument("--snapshot-on-port", metavar="FILE",
                     help="tests: a guest write to port 0xee (layout.SNAPSHOT_PORT) snapshots it to FILE "
                          "and it runs on")
    sub.add_parser("info", help="describe this host's KVM, capabilities and hypercall traps")

    sd = sub.add_parser("shutdown", help="ask a running Xen guest to power off or reboot (as xl shutdown)")
    sd.add_argument("action", choices=SHUTDOWN_ACTIONS, help="written to control/shutdown")
    sd.add_argument("--socket", metavar="PATH", help="the guest's xenstored socket (default $XENSTORED_PATH "
                    "or ${XENSTORED_RUNDIR:-/run/xenstored}/socket)")
    sd.add_argument("--domid", type=int, default=1, help="the guest's domid (default 1)")
    sd.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the guest to react (0: do not wait; default 30)")
    sd.add_argument("--wait", action="store_true", help="also wait until the domain is gone")

    ms = sub.add_parser("mem-set", help="set a running Xen guest's memory target (as xl mem-set)")
    ms.add_argument("size", help="the new target, e.g. 256M or 1G (a bare number is MiB); at most "
                    "the guest's memory/static-max")
    ms.add_argument("--socket", metavar="PATH", help="the guest's xenstored socket (default $XENSTORED_PATH "
                    "or ${XENSTORED_RUNDIR:-/run/xenstored}/socket)")
    ms.add_argument("--domid", type=int, default=1, help="the guest's domid (default 1)")

    xs = sub.add_parser("xenstored", help="run the xenstore daemon standalone", add_help=False)
    xs.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _setup_logging(verbose: int, trace: bool = False) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="xenkvm: %(levelname)s: %(name)s: %(message)s")
    if trace:
        logging.getLogger("xenkvm.trace").setLevel(logging.INFO)


def cmd_run(args: argparse.Namespace) -> int:
    from xenkvm.build import build_machine
    from xenkvm.machine.status import ExitStatus

    overrides = {"kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline,
                 "memory": args.memory, "vcpus": args.vcpus, "boot": args.boot, "console": args.console}
    if args.restore:
        return _run_restored(args)
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
        machine.snapshot_on_port(SNAPSHOT_PORT, args.snapshot_on_port)
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
                                        xenstore_socket=args.xenstore_socket))


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["xenstored"]:
        from xenkvm.xenstore.daemon import main as xenstored_main
        return xenstored_main(argv[1:])
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "trace", False))
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "shutdown":
            return cmd_shutdown(args)
        if args.command == "mem-set":
            return cmd_mem_set(args)
        return cmd_info(args)
    except (ConfigError, BootError, SnapshotError) as e:
        print(f"xenkvm: {e}", file=sys.stderr)
        return 2
    except KvmError as e:
        print(f"xenkvm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
