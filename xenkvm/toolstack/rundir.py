"""The run directory: one private folder per managed domain, names and domids unique.

Layout (``$XENKVM_RUN_DIR``, else ``/run/xenkvm`` as root, else
``$XDG_RUNTIME_DIR/xenkvm``, else ``/tmp/xenkvm-UID``)::

    RUN/                      0700, owned by the user
      .lock                   flock(2) around allocating a name and a domid
      NAME/                   0700
        domain.json           name, domid, uuid, the VMM's pid and its start time (0600)
        control.sock          the control API (docs/control-api.md), 0600
        xenstore.sock         the domain's embedded xenstored (``create --xenstore embedded``)
      .xenstored/             the shared xenstored (toolstack/xenstored.py), the default
        hypervisor.log        console_io output (``xenkvm dmesg``)
        vmm.log               the VMM process's own log (stderr)

A folder whose VMM process is gone (killed, crashed) is *stale*: ``list``
reports the domain ``crashed`` once and removes the folder, which frees its
name and domid.  A process is matched by pid *and* start time, so a reused pid
is not mistaken for the VMM.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from xenkvm.config import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_DOMID = 0x7FEF          #: DOMID_FIRST_RESERVED - 1
SOCKET_PATH_MAX = 107       #: sun_path


def base_dir(env: dict[str, str] | None = None) -> Path:
    """Where run directories live (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("XENKVM_RUN_DIR"):
        return Path(env["XENKVM_RUN_DIR"])
    if os.geteuid() == 0:
        return Path("/run/xenkvm")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "xenkvm"
    return Path(f"/tmp/xenkvm-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` 0700 (and parents) or check an existing one is ours and private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError(f"run directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"run directory {path} is not a directory owned by uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise ConfigError(f"run directory {path} is open to other users (mode {st.st_mode & 0o777:o}); "
                          "it must be 0700")
    return path


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if no such process or a
    zombie (killed, not yet reaped: in a container init may never reap it)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass
class DomainRecord:
    """What ``domain.json`` says about one managed domain."""

    name: str
    domid: int
    uuid: str | None = None
    pid: int = 0
    start_time: int = 0          #: the VMM's /proc start time, to tell a reused pid apart
    created: float = 0.0         #: wall-clock seconds when ``create`` ran
    #: the shared xenstored's folder (toolstack/xenstored.py) the domain is introduced to;
    #: None: an embedded one on ``xenstore.sock``
    xenstored: str | None = None

    def alive(self) -> bool:
        """Whether the VMM process still runs (pid 0: not started yet, counts as alive)."""
        return self.pid == 0 or process_start_time(self.pid) == self.start_time


class DomainDir:
    """One domain's folder under the run directory."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name

    control = property(lambda self: self.path / "control.sock")
    xenstore = property(lambda self: self.path / "xenstore.sock")
    hypervisor_log = property(lambda self: self.path / "hypervisor.log")
    vmm_log = property(lambda self: self.path / "vmm.log")
    record_file = property(lambda self: self.path / "domain.json")

    def read(self) -> DomainRecord | None:
        try:
            raw = json.loads(self.record_file.read_text())
            return DomainRecord(**{k: raw[k] for k in DomainRecord.__dataclass_fields__ if k in raw})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self, rec: DomainRecord) -> None:
        tmp = self.path / ".domain.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(rec), f)
        os.replace(tmp, self.record_file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class RunDir:
    """The run directory: allocates names and domids, lists domain folders."""

    def __init__(self, path: Path | None = None):
        self.path = ensure_private_dir(path or base_dir())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def domains(self) -> list[DomainDir]:
        return sorted((DomainDir(p) for p in self.path.iterdir() if p.is_dir() and NAME.fullmatch(p.name)),
                      key=lambda d: d.name)

    def find(self, name: str) -> DomainDir | None:
        if not NAME.fullmatch(name):
            return None
        d = DomainDir(self.path / name)
        return d if d.path.is_dir() else None

    def allocate(self, name: str, uuid: str | None, created: float,
                 prefer: int | None = None) -> tuple[DomainDir, DomainRecord]:
        """A new folder for ``name`` with domid ``prefer`` if it is free (a restored guest's own),
        else the lowest free one (stale folders are reclaimed)."""
        if not NAME.fullmatch(name):
            raise ConfigError(f"name: {name!r} is not a domain name (letters, digits, '_.-', at most 64)")
        d = DomainDir(self.path / name)
        if len(str(d.xenstore)) > SOCKET_PATH_MAX:
            raise ConfigError(f"run directory {self.path}: socket paths would exceed {SOCKET_PATH_MAX} bytes; "
                              "set XENKVM_RUN_DIR to a shorter path")
        with self.locked():
            used = set()
            for other in self.domains():
                rec = other.read()
                if rec is not None and not rec.alive():
                    continue    # stale: its name and domid are free again (list reports it)
                if other.name == name:
                    raise ConfigError(f"name: a domain called {name!r} already exists")
                if rec is not None:
                    used.add(rec.domid)
            domid = next((i for i in ([prefer] if prefer else []) + list(range(1, MAX_DOMID + 1))
                          if i not in used and 1 <= i <= MAX_DOMID), None)
            if domid is None:
                raise ConfigError("no free domid")
            d.remove()
            d.path.mkdir(mode=0o700)
            rec = DomainRecord(name=name, domid=domid, uuid=uuid, created=created)
            d.write(rec)
        return d, rec
