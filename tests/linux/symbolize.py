"""Map kernel addresses to System.map symbols: python tests/linux/symbolize.py MAP ADDR... (or - for stdin)."""
from __future__ import annotations

import bisect
import re
import sys


def load(path: str) -> tuple[list[int], list[str]]:
    addrs, names = [], []
    for line in open(path):
        parts = line.split()
        if len(parts) >= 3 and parts[1].lower() in "ttwd":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def symbolize(addrs: list[int], names: list[str], a: int) -> str:
    i = bisect.bisect_right(addrs, a) - 1
    return f"{names[i]}+{a - addrs[i]:#x}" if i >= 0 else "?"


if __name__ == "__main__":
    A, N = load(sys.argv[1])
    if sys.argv[2:] == ["-"]:
        for line in sys.stdin:
            print(re.sub(r"0x(ffffffff[0-9a-f]{8})", lambda m: f"{m.group(0)} <{symbolize(A, N, int(m.group(1), 16))}>",
                         line.rstrip()))
    else:
        for s in sys.argv[2:]:
            print(s, symbolize(A, N, int(s, 16)))
