"""``xenkvm run`` for the benchmarks: the same run, plus the hypercall dispatcher's statistics.

    python benchmarks/run_guest.py GUEST [--console file:PATH] [--xenstore-socket PATH]
                                         [--vcpus N] [--cmdline TEXT] --stats OUT.json

Writes ``{"status": int, "message": str, "hypercalls": {nr: {"name", "count", "seconds"}}}``
(host time spent in each hypercall's handler, per number) when the guest stops, and exits
with the run's status like ``xenkvm run``.  The first refused instruction of each kind that
``machine.gaps`` completes is logged on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xenkvm.config import XenConfig, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("guest")
    p.add_argument("--console")
    p.add_argument("--xenstore-socket")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--cmdline")
    p.add_argument("--stats", required=True)
    a = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="xenkvm: %(levelname)s: %(name)s: %(message)s")
    logging.getLogger("xenkvm.machine.gaps").setLevel(logging.INFO)  # each refused instruction kind, once
    from xenkvm.build import build_machine, xen_domain
    from xenkvm.xen.dispatch import _name

    cfg = load_config(a.guest, {"console": a.console, "vcpus": a.vcpus, "cmdline": a.cmdline})
    if a.xenstore_socket:
        cfg = dataclasses.replace(cfg, xen=dataclasses.replace(cfg.xen or XenConfig(),
                                                               xenstore_socket=a.xenstore_socket))
    machine = build_machine(cfg)
    try:
        result = machine.run()
        xen = xen_domain(machine)
        stats = {} if xen is None else {
            str(nr): {"name": _name(nr), "count": s.count, "seconds": s.seconds}
            for nr, s in sorted(xen.dispatcher.stats.items())}
    finally:
        machine.close()
    Path(a.stats).write_text(json.dumps({"status": int(result.status), "message": result.message,
                                         "hypercalls": stats}, indent=1))
    if int(result.status):
        print(f"run_guest: {cfg.name}: {result.message}", file=sys.stderr)
    return int(result.status)


if __name__ == "__main__":
    sys.exit(main())
