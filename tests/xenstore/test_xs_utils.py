"""Integration: Debian's xenstore-utils (libxenstore 4.17) against our daemon.

The daemon runs as ``python -m xenkvm.xenstore.daemon`` in a subprocess, the
tools find it through ``XENSTORED_PATH``.  CI installs xenstore-utils; without
the binaries these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm", "xenstore-list",
         "xenstore-exists", "xenstore-chmod", "xenstore-watch"]

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="Debian xenstore-utils not installed (apt-get install xenstore-utils)")


class Daemon:
    """``xenkvm xenstored`` in a subprocess."""

    def __init__(self, directory: str, state: str | None = None) -> None:
        self.socket = os.path.join(directory, "socket")
        self.env = dict(os.environ, XENSTORED_PATH=self.socket,
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = [sys.executable, "-m", "xenkvm.xenstore.daemon", "--socket", self.socket]
        if state:
            args += ["--state", state]
        self.proc = subprocess.Popen(args, env=self.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline, "daemon did not create its socket"
            time.sleep(0.02)

    def run(self, *argv: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    yield d
    d.stop()


def test_write_read_ls_list_exists_rm(daemon):
    daemon.run("xenstore-write", "/vm/name", "guest1", "/vm/uuid", "1234")
    assert daemon.run("xenstore-read", "/vm/name").stdout == "guest1\n"
    assert daemon.run("xenstore-read", "/vm/name", "/vm/uuid").stdout == "guest1\n1234\n"
    assert daemon.run("xenstore-list", "/vm").stdout.split() == ["name", "uuid"]
    ls = daemon.run("xenstore-ls", "/vm").stdout
    assert 'name = "guest1"' in ls and 'uuid = "1234"' in ls
    assert daemon.run("xenstore-exists", "/vm/name").returncode == 0
    assert daemon.run("xenstore-exists", "/vm/nope", check=False).returncode != 0
    daemon.run("xenstore-rm", "/vm/name")
    assert daemon.run("xenstore-read", "/vm/name", check=False).returncode != 0
    assert daemon.run("xenstore-list", "/vm").stdout.split() == ["uuid"]


def test_read_missing_fails(daemon):
    result = daemon.run("xenstore-read", "/does/not/exist", check=False)
    assert result.returncode != 0
    assert "couldn't read path" in result.stderr


def test_relative_path_from_socket_is_under_dom0(daemon):
    daemon.run("xenstore-write", "/local/domain/0/name", "Domain-0")
    assert daemon.run("xenstore-read", "name").stdout == "Domain-0\n"


def test_rm_t_removes_empty_parents(daemon):
    daemon.run("xenstore-write", "/t/a/b", "")
    daemon.run("xenstore-rm", "-t", "/t/a/b")
    assert daemon.run("xenstore-exists", "/t", check=False).returncode != 0


def test_chmod_and_ls_p(daemon):
    daemon.run("xenstore-write", "/perm/node", "v")
    daemon.run("xenstore-chmod", "/perm/node", "r0", "b5", "w7")
    assert "(r0,b5,w7)" in daemon.run("xenstore-ls", "-p", "/perm").stdout
    daemon.run("xenstore-write", "/perm/node/child", "c")
    assert "(r0,b5,w7)" in daemon.run("xenstore-ls", "-p", "/perm/node").stdout  # inherited
    daemon.run("xenstore-chmod", "-r", "/perm", "n3")
    out = daemon.run("xenstore-ls", "-p", "/perm").stdout
    assert out.count("(n3)") == 2
    bad = daemon.run("xenstore-chmod", "/perm/node", "x9", check=False)
    assert bad.returncode != 0


def test_watch_prints_events(daemon):
    daemon.run("xenstore-write", "/w", "")
    watch = subprocess.Popen(["xenstore-watch", "-n", "4", "/w"], env=daemon.env,
                             stdout=subprocess.PIPE, text=True)
    try:
        # The initial event arrives first; wait for it so ours are not raced.
        assert watch.stdout.readline() == "/w\n"
        daemon.run("xenstore-write", "/w/x", "1")
        daemon.run("xenstore-write", "/other", "1")
        daemon.run("xenstore-write", "/w/y/z", "1")
        daemon.run("xenstore-rm", "/w")
        out, _ = watch.communicate(timeout=10)
    finally:
        watch.kill()
    assert out.splitlines() == ["/w/x", "/w/y/z", "/w"]
    assert watch.returncode == 0


def test_watch_special_introduce_domain(daemon):
    watch = subprocess.Popen(["xenstore-watch", "-n", "2", "@introduceDomain"],
                             env=daemon.env, stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout.readline() == "@introduceDomain\n"
        from xenkvm.xenstore.client import XsClient
        from xenkvm.xenstore.protocol import XsType
        with XsClient(daemon.socket) as c:
            c.call(XsType.INTRODUCE, b"5\x000\x001\0")
        out, _ = watch.communicate(timeout=10)
    finally:
        watch.kill()
    assert out == "@introduceDomain\n"


def test_big_directory_falls_back_to_directory_part(daemon):
    from xenkvm.xenstore.client import XsClient
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(300)]
    with XsClient(daemon.socket) as c:
        for name in names:
            c.write(f"/big/{name}", "")
    assert daemon.run("xenstore-list", "/big").stdout.split() == names


def test_binary_and_multi_key_transactional_write(daemon):
    daemon.run("xenstore-write", "/m/a", "1", "/m/b", "2", "/m/c", "3")
    assert daemon.run("xenstore-read", "/m/a", "/m/b", "/m/c").stdout.split() == ["1", "2", "3"]


def test_open_transaction_keeps_its_view_while_tools_change_the_store(daemon):
    # The shell tools cannot hold a transaction across commands, so our client
    # holds one while the tools (each in its own libxenstore transaction)
    # change what it has read.
    from xenkvm.xenstore.client import XsClient
    from xenkvm.xenstore.protocol import XenstoreError, XsError
    daemon.run("xenstore-write", "/t/a", "1", "/t/gone", "x")
    with XsClient(daemon.socket) as c:
        tx = c.transaction_start()
        assert c.read("/t/a", tx) == b"1"
        assert c.directory("/t", tx) == ["a", "gone"]
        assert c.get_perms("/t/a", tx) == ["n0"]
        with pytest.raises(XenstoreError) as missing:
            c.read("/t/new", tx)
        assert missing.value.err == XsError.ENOENT
        daemon.run("xenstore-write", "/t/a", "2", "/t/new", "n")
        daemon.run("xenstore-chmod", "/t/a", "r0", "b3")
        daemon.run("xenstore-rm", "/t/gone")
        assert c.read("/t/a", tx) == b"1"
        assert c.directory("/t", tx) == ["a", "gone"]
        assert c.get_perms("/t/a", tx) == ["n0"]
        with pytest.raises(XenstoreError) as missing:
            c.read("/t/new", tx)
        assert missing.value.err == XsError.ENOENT
        c.write("/t/a", "mine", tx)
        assert c.read("/t/a", tx) == b"mine"
        assert daemon.run("xenstore-read", "/t/a").stdout == "2\n"
        with pytest.raises(XenstoreError) as exc:
            c.transaction_end(tx)
        assert exc.value.err == XsError.EAGAIN
    assert daemon.run("xenstore-read", "/t/a").stdout == "2\n"
    assert daemon.run("xenstore-list", "/t").stdout.split() == ["a", "new"]


def test_state_survives_restart(tmp_path):
    state = str(tmp_path / "state.json")
    first = Daemon(str(tmp_path), state)
    first.run("xenstore-write", "/persist/me", "yes")
    first.run("xenstore-chmod", "/persist/me", "r0", "b9")
    assert first.stop() == 0
    assert os.path.exists(state)
    second = Daemon(str(tmp_path), state)
    try:
        assert second.run("xenstore-read", "/persist/me").stdout == "yes\n"
        assert "(r0,b9)" in second.run("xenstore-ls", "-p", "/persist").stdout
    finally:
        second.stop()
