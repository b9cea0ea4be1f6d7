"""Old tree vs this one, side by side: bench_evtchn and bench_gnttab in ``--cpu`` mode, interleaved.

Usage: ``.venv/bin/python benchmarks/compare_trees.py OLD_TREE [--runs N]``.  OLD_TREE is
another checkout with its cffi modules built (e.g. ``git worktree add`` of the commit
before a refactor, then ``make build``).  Each run measures the old tree, then this
one, with *this* checkout's benchmark scripts (``--tree``), so both sides do exactly
the same work; figures are min-of-batches thread CPU time, the only figure that
survives a machine shared with other jobs.  For each row it prints every run's
figure and the best of each side (a row the old tree lacks shows ``-``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {"bench_evtchn.py": "ns", "bench_gnttab.py": "us"}


def run_once(script: str, tree: Path) -> dict[str, float]:
    """name -> figure of one ``--cpu --tsv`` run of ``script`` against ``tree``."""
    out = subprocess.run([sys.executable, str(HERE / script), "--cpu", "--tsv", "--tree", str(tree)],
                         check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    if not lines or lines[0] != f"# xenkvm from {tree}":
        raise SystemExit(f"{script} did not measure {tree}: {lines[:1]}")
    return {name: float(v) for name, v in (line.split("\t") for line in lines[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the checkout to compare against (cffi modules built)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved old/new runs (default 3)")
    args = ap.parse_args()
    old, new = args.old.resolve(), HERE.parent
    for script, unit in BENCHES.items():
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for _ in range(max(1, args.runs)):
            runs["old"].append(run_once(script, old))
            runs["new"].append(run_once(script, new))
        names = list(runs["new"][0])
        width = max(len(n) for n in names)
        print(f"\n{script} ({unit}/op, min thread CPU; each run old then new)")
        print(f"{'row':<{width}}  {'old runs':>24}  {'new runs':>24}  {'old best':>8}  {'new best':>8}  {'new/old':>7}")
        for n in names:
            o = [r[n] for r in runs["old"] if n in r]
            w = [r[n] for r in runs["new"]]
            fmt = "{:.0f}" if unit == "ns" else "{:.2f}"
            o_s = " ".join(fmt.format(x) for x in o) or "-"
            w_s = " ".join(fmt.format(x) for x in w)
            ratio = f"{min(w) / min(o):7.2f}" if o else f"{'-':>7}"
            ob = fmt.format(min(o)) if o else "-"
            print(f"{n:<{width}}  {o_s:>24}  {w_s:>24}  {ob:>8}  {fmt.format(min(w)):>8}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
