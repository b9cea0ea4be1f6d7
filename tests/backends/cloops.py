"""A backend's C serve loop under test: run in the test's thread when it returns at once, or on a
thread of its own when it is to sleep, its return codes collected."""
from __future__ import annotations

import queue
import threading


class LoopRunner:
    """Subclasses give :meth:`run` (one call of the C loop)."""

    def __init__(self) -> None:
        self.codes: queue.Queue[int] = queue.Queue()

    def run(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        threading.Thread(target=lambda: self.codes.put(self.run()), daemon=True).start()

    def returned(self, timeout: float = 30) -> int:
        return self.codes.get(timeout=timeout)

    def asleep(self) -> bool:
        """Still blocked after a moment (an honest negative: a return would be in ``codes``)."""
        try:
            self.codes.get(timeout=0.3)
        except queue.Empty:
            return True
        return False


def closing(make):
    """A fixture's body: the test gets ``make``, and every loop it made is closed after it."""
    made = []
    yield lambda *args: made.append(make(*args)) or made[-1]
    for lp in made:
        lp.close()


class NotifyRecorder:
    """C delivery's stand-in for a loop's ``notify_fn``: records ``(ctx, port)``, answers ``answer``."""

    def __init__(self, ffi) -> None:
        self.answer, self.calls = 0, []

        @ffi.callback("int(void *, uint32_t)")
        def fn(ctx, port):
            self.calls.append((int(ffi.cast("uintptr_t", ctx)), port))
            return self.answer

        self.fn = fn
