"""Extra PV consoles (``device/console/N``, N >= 1): a xencons ring backed by a host pty or a log file.

The protocol is the primary console's (``struct xencons_interface``, served
by xen/console.py's ``ConsoleRing``), found through xenstore as Linux's
hvc_xen does for consoles past the first: the frontend grants a page and
allocates an event channel, writes ``ring-ref`` (a grant reference) and
``port``, and goes Initialised; we map and bind and go Connected.  The nodes
are libxl's: frontend ``limit``, ``type`` = ``xenconsoled`` (we play
xenconsoled's part; ``ioemu`` would mean QEMU), ``output`` and ``tty``;
backend ``domain``, ``protocol`` = ``vt100`` and, for a pty, ``tty`` (its
path, which is also logged at start as ``xl console`` users look for it).

Output goes to the pty's master or is appended to the file; output a pty
cannot take (nobody reading it and its buffer full) is dropped and counted,
as a serial line drops.  Input typed on the pty is read by a small thread,
held (at most 64 KiB) and copied into ``in[]`` on the device's worker as
room appears.  Guest indices are hostile: a broken ring is logged once and
ignored until the frontend reconnects.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import tty

from xenkvm.consolespec import ConsoleSpec
from xenkvm.xen.console import PENDING_MAX, ConsoleRing, RingBroken
from xenkvm.xen.evtchn import EvtchnError
from xenkvm.xen.gnttab import GrantError

from .blkring import _number
from .xenbus import ConnectError, XenbusDevice

log = logging.getLogger(__name__)
#: the pty path is what a user needs to attach (as ``xl console`` finds it): shown without -v
#: the pty path of each console, for the user: the CLI shows this logger at INFO without -v
tty_log = logging.getLogger(__name__ + ".tty")
LIMIT = 1048576                 #: libxl's LIBXL_XENCONSOLE_LIMIT


class ConsoleDevice(XenbusDevice):
    """One extra console; the pty or file lives as long as the device."""

    type = "console"

    def __init__(self, spec: ConsoleSpec, domain_name: str):
        super().__init__(spec.devid, f"console{spec.devid}")
        self.spec, self.domain_name = spec, domain_name
        self.tty: str | None = None
        self.stats = {"out_bytes": 0, "out_dropped": 0, "in_bytes": 0}
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._ring: ConsoleRing | None = None
        self._mapping = None
        self._port: int | None = None
        self._broken = False
        self._reader: threading.Thread | None = None
        self._stop_fd = -1
        if spec.backend == "pty":
            self.fd, self._slave = os.openpty()
            tty.setraw(self._slave)             # bytes pass as they are: the guest runs its own line discipline
            os.set_blocking(self.fd, False)
            self.tty = os.ttyname(self._slave)
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
            self._reader = threading.Thread(target=self._read_pty, name=f"console{spec.devid}-pty", daemon=True)
            self._reader.start()
        else:
            self._slave = -1
            self.fd = os.open(spec.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    # -- xenstore ------------------------------------------------------------------
    def frontend_keys(self) -> dict[str, str]:
        output = "pty" if self.tty else f"file:{self.spec.path}"
        return {"limit": str(LIMIT), "type": "xenconsoled", "output": output, "tty": self.tty or ""}

    def backend_keys(self) -> dict[str, str]:
        keys = {"domain": self.domain_name, "protocol": "vt100"}
        if self.tty:
            keys["tty"] = self.tty
            tty_log.info("d%d console %d: %s", self.domain.domid, self.devid, self.tty)
        return keys

    def connect(self, frontend: dict[str, str]) -> None:
        ref = _number(frontend, "ring-ref", 1 << 32)
        port = _number(frontend, "port", 1 << 17)
        try:
            mapping = self.domain.gnttab.map(self.domain.domid, ref, True)
        except GrantError as e:
            raise ConnectError(f"ring-ref {ref}: {e}") from None
        try:
            self.domain.evtchn.bind_vmm_to_guest_port(port, kick_fd=self.backend.kick_fd)
        except EvtchnError as e:
            mapping.unmap()
            raise ConnectError(f"port {port}: {e}") from None
        self._mapping, self._port, self._broken = mapping, port, False
        self._ring = ConsoleRing(mapping.view)
        log.info("%s: connected, ring-ref %d, port %d", self.backend.label, ref, port)

    def disconnect(self) -> None:
        if self._port is not None:
            self.domain.evtchn.close_vmm_port(self._port)
            self._port = None
        self._ring = None
        if self._mapping is not None:
            self._mapping.unmap()
            self._mapping = None

    def close(self) -> None:
        self.disconnect()
        if self._reader is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._reader.join()
            os.close(self._stop_fd)
            self._reader = None
        for fd in (self.fd, self._slave):
            if fd >= 0:
                os.close(fd)
        self.fd = self._slave = -1

    # -- snapshots (backends/snapshot.py) -----------------------------------------------
    def event_ports(self) -> set[int]:
        return set() if self._port is None else {self._port}

    def save_state(self) -> dict:
        """Input typed but not yet in the ring, and whether the ring was found broken; the pty
        itself is host state: a restore opens a new one (its path logged as at start)."""
        with self._lock:
            return {"pending": bytes(self._pending).hex(), "broken": self._broken}

    def restore_state(self, state: dict, frontend: dict[str, str] | None) -> None:
        pending = bytes.fromhex(state["pending"])[:PENDING_MAX]
        if frontend is not None:
            self.connect(frontend)
            self._broken = bool(state["broken"])
        with self._lock:
            self._pending[:0] = pending

    # -- the ring (worker thread) ----------------------------------------------------
    def service(self) -> None:
        """Drain ``out[]`` to the pty or file, refill ``in[]``; notify if either moved."""
        ring = self._ring
        if ring is None or self._broken:
            return
        try:
            out = ring.take_output()
            with self._lock:
                wrote = ring.put_input(bytes(self._pending[:ring.lay.in_size])) if self._pending else 0
                del self._pending[:wrote]
        except RingBroken as e:
            self._broken = True
            log.warning("%s: ring broken (%s); ignored until the frontend reconnects", self.backend.label, e)
            return
        if out:
            self._output(out)
        self.stats["in_bytes"] += wrote
        if out or wrote:
            self.domain.evtchn.notify(self._port)

    def _output(self, data: bytes) -> None:
        try:
            done = os.write(self.fd, data)
        except BlockingIOError:
            done = 0
        except OSError as e:
            log.warning("%s: output: %s", self.backend.label, e.strerror)
            done = 0
        self.stats["out_bytes"] += done
        if done < len(data):
            self.stats["out_dropped"] += len(data) - done

    # -- pty input (reader thread) -------------------------------------------------------
    def _read_pty(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        poll.register(self._stop_fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ev in poll.poll()}
            if self._stop_fd in ready:
                return
            try:
                data = os.read(self.fd, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            with self._lock:
                self._pending += data[:PENDING_MAX - len(self._pending)]
            if self.backend is not None:
                self.backend.kick()
