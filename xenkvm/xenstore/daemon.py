"""Standalone daemon: ``xenkvm xenstored [--socket PATH] [--state FILE] [--introduce PATH]``.

Serves the UNIX socket (Debian's xenstore-utils work against it unmodified:
point them at it with ``XENSTORED_PATH``), optionally starting from a state
file, and saves the state back to that file on a clean exit (SIGINT/SIGTERM).
With ``--introduce`` it is the host's shared xenstored: VMMs hand it their
domains' rings over that socket (:mod:`.hostd`, docs/xenstore.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import state
from .dispatch import Xenstored
from .hostd import IntroduceServer
from .quota import Quotas
from .server import XenstoreServer, default_socket_path

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line of the standalone daemon."""
    parser = argparse.ArgumentParser(prog="xenkvm xenstored",
                                     description="xenstored-compatible store daemon")
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help="UNIX socket (default: $XENSTORED_PATH or "
                             "${XENSTORED_RUNDIR:-/run/xenstored}/socket)")
    parser.add_argument("--state", metavar="FILE", default=None,
                        help="load state from FILE if it exists; save to it on exit")
    parser.add_argument("--quota", metavar="NAME=VALUE", action="append", default=[],
                        help=f"set a quota ({', '.join(Quotas.names())})")
    parser.add_argument("--pid-file", metavar="FILE", default=None)
    parser.add_argument("--introduce", metavar="PATH", default=None,
                        help="serve VMMs' domain introductions on this socket (the shared xenstored)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser.parse_args(argv)


def build_core(args: argparse.Namespace) -> Xenstored:
    """Fresh core, or the one saved in ``--state``; then apply ``--quota``."""
    if args.state and os.path.exists(args.state):
        core = state.load(args.state)
    else:
        core = Xenstored()
    for item in args.quota:
        name, _, value = item.partition("=")
        core.quotas.set(name, int(value, 0))
    return core


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGINT/SIGTERM; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING,
                        format="xenstored: %(levelname)s %(name)s: %(message)s")
    try:
        core = build_core(args)
    except (OSError, ValueError, KeyError, state.StateError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    server = XenstoreServer(core, args.socket or default_socket_path())
    intro = IntroduceServer(server, args.introduce) if args.introduce else None
    try:
        server.listen()
        if intro is not None:
            intro.listen()
    except OSError as exc:
        log.error("cannot listen on %s: %s", exc.filename or server.socket_path, exc.strerror or exc)
        server.close()
        return 1
    _serve(server, core, args, intro)
    return 0


def _serve(server: XenstoreServer, core: Xenstored, args: argparse.Namespace,
           intro: IntroduceServer | None) -> None:
    """Run until SIGINT/SIGTERM, then save ``--state`` and remove the pid file."""
    if args.pid_file:
        with open(args.pid_file, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")

    def _stop(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever()
    finally:
        if intro is not None:
            intro.close()
        server.close()
        if args.state:
            state.save(core, args.state)
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
