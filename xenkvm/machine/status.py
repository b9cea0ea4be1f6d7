"""How a run ends: the process exit status and the result a Machine returns.

A module of its own so that everything that can end a run (the machine's exit
handlers, the stdin reader's Ctrl-], an extension's guest-requested shutdown)
names the statuses without importing the Machine, so no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class ExitStatus(IntEnum):
    """The process exit status of a run, one per way a guest can end."""

    POWEROFF = 0
    VMM_ERROR = 1
    CONFIG_ERROR = 2
    RESET = 3
    TRIPLE_FAULT = 4
    EMULATION_FAILURE = 5
    GUEST_CRASH = 6
    GUEST_HALTED = 7
    INTERRUPTED = 130


@dataclass
class RunResult:
    """Why a run ended, and the last console lines for a crash report."""

    status: ExitStatus
    message: str
    console_tail: list[str] = field(default_factory=list)
