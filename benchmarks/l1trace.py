"""A window of L1's ftrace (KVM exits, injections, the scheduler, system calls), for the rig benchmarks.

Where a nested guest's request spends its time is not in any counter: ``bench_diskguest.py
--trace-qd1 DIR`` records L1's trace for a short window of the queue-depth-1 phase of each guest
row and :func:`summarize` turns it into a per-request timeline.  L1 has one CPU (the rig's
default), so the trace is one ordered stream: who runs, which exit, which syscall, in order.

    python benchmarks/l1trace.py TRACE...     # the summary of saved traces
"""
from __future__ import annotations

import collections
import re
import sys
import threading
from pathlib import Path

TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
#: the events recorded (those the kernel lacks are skipped)
EVENTS = ("kvm/kvm_exit", "kvm/kvm_entry", "kvm/kvm_userspace_exit", "kvm/kvm_pio", "kvm/kvm_msi_set_irq",
          "kvm/kvm_apic_accept_irq", "kvm/kvm_inj_virq", "kvm/kvm_vcpu_wakeup", "kvm/kvm_set_irq",
          "sched/sched_switch", "sched/sched_wakeup", "raw_syscalls/sys_enter", "raw_syscalls/sys_exit")
BUFFER_KB = 65536


def tracefs() -> Path | None:
    for p in TRACEFS:
        if (p / "tracing_on").exists():
            return p
    return None


def file_name(label: str, suffix: str = "") -> str:
    """The file a benchmark row's trace is saved as: ``trace-<label as a slug><suffix>.txt``."""
    return "trace-" + re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") + suffix + ".txt"


class Window:
    """Record L1's trace for ``seconds`` from :meth:`start`, then write it to ``dest``."""

    def __init__(self, dest: Path, seconds: float = 0.4):
        self.dest, self.seconds = dest, seconds
        self.fs = tracefs()
        self._timer: threading.Timer | None = None

    def start(self) -> bool:
        if self.fs is None or self._timer is not None:
            return False
        fs = self.fs
        (fs / "tracing_on").write_text("0")
        (fs / "trace").write_text("")
        (fs / "buffer_size_kb").write_text(str(BUFFER_KB))
        for ev in EVENTS:
            enable = fs / "events" / ev / "enable"
            if enable.exists():
                enable.write_text("1")
        (fs / "tracing_on").write_text("1")
        self._timer = threading.Timer(self.seconds, self.stop)
        self._timer.start()
        return True

    def stop(self) -> None:
        fs = self.fs
        (fs / "tracing_on").write_text("0")
        for ev in EVENTS:
            enable = fs / "events" / ev / "enable"
            if enable.exists():
                enable.write_text("0")
        self.dest.write_text((fs / "trace").read_text(errors="replace"))
        (fs / "trace").write_text("")

    def join(self) -> None:
        if self._timer is not None:
            self._timer.join()


#: one trace line: task-pid, [cpu], flags, timestamp, event, the rest
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+):\s+(\w+):\s*(.*)$")
EXIT_REASON = re.compile(r"reason (\S+)")
SYSCALL = re.compile(r"NR (\d+)")
SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*? next_comm=(.*?) next_pid=(\d+)")
#: x86-64 syscall numbers worth a name in the summary
SYSCALLS = {0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 16: "ioctl", 19: "readv",
            20: "writev", 232: "epoll_wait", 270: "pselect6", 271: "ppoll", 202: "futex", 295: "preadv",
            296: "pwritev", 286: "timerfd_settime", 281: "epoll_pwait", 441: "epoll_pwait2", 426: "io_uring_enter",
            230: "clock_nanosleep", 35: "nanosleep", 24: "sched_yield", 7 + 1000: "?"}


def parse(text: str):
    """(task, pid, t_us, event, detail) per trace line."""
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            yield m.group(1).strip(), int(m.group(2)), float(m.group(3)) * 1e6, m.group(4), m.group(5)


def _thread(comm: str, pid) -> str:
    """A task's name in the summary: the command without its per-CPU suffix, and the thread id
    for Python's (every thread of the VMM is "python": the id tells the vCPU, I/O and worker apart)."""
    name = re.sub(r'[0-9/]+$', '', comm.strip())
    return f"{name}/{pid}" if name.startswith("python") else name


def summarize(text: str) -> list[str]:
    """Where the CPU went over the window: time per task, exits by reason (and how many reached
    userspace), syscalls per task (count, total time), injections; all divided by the guest's
    requests where the window shows them (kvm_pio to the send port, or every exit when unknown)."""
    events = list(parse(text))
    if not events:
        return ["no events"]
    t0, t1 = events[0][2], events[-1][2]
    run_us: collections.Counter = collections.Counter()
    exits: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    call_us: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    open_call: dict[int, tuple[str, float]] = {}
    running, since = None, t0
    in_guest_us, entry_at = 0.0, None
    for task, pid, t, ev, detail in events:
        counts[ev] += 1
        if ev == "sched_switch":
            m = SWITCH.search(detail)
            if m:
                if running is not None:
                    run_us[running] += t - since
                running, since = _thread(m.group(3), m.group(4)), t
        elif ev == "kvm_entry":
            entry_at = t
        elif ev == "kvm_exit":
            m = EXIT_REASON.search(detail)
            exits[m.group(1) if m else detail[:20]] += 1
            if entry_at is not None:
                in_guest_us += t - entry_at
                entry_at = None
        elif ev == "sys_enter":
            m = SYSCALL.search(detail)
            if m:
                nr = int(m.group(1))
                open_call[pid] = (f"{_thread(task, pid)}:{SYSCALLS.get(nr, nr)}", t)
        elif ev == "sys_exit" and pid in open_call:
            name, at = open_call.pop(pid)
            calls[name] += 1
            call_us[name] += t - at
    span = t1 - t0
    out = [f"window {span / 1e3:.1f} ms, {len(events)} events; in guest mode {in_guest_us / 1e3:.1f} ms "
           f"({100 * in_guest_us / span:.0f}%)"]
    out.append("CPU by task: " + "  ".join(f"{k} {v / 1e3:.1f} ms" for k, v in run_us.most_common(8)))
    out.append("exits: " + "  ".join(f"{k} {v}" for k, v in exits.most_common(10)))
    out.append("events: " + "  ".join(f"{k} {v}" for k, v in counts.most_common(14)))
    out.append("syscalls (n, total ms): " + "  ".join(
        f"{k} {calls[k]} {call_us[k] / 1e3:.1f}" for k, _ in call_us.most_common(14)))
    return out


def main(argv: list[str]) -> int:
    for path in argv:
        print(f"== {path}")
        for line in summarize(Path(path).read_text(errors="replace")):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
