"""The toolstack's pieces without a guest: run directory allocation and the control server."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from xenkvm.config import ConfigError
from xenkvm.toolstack.client import ControlClient
from xenkvm.toolstack.protocol import ApiError, ErrorCode
from xenkvm.toolstack.rundir import RunDir, base_dir
from xenkvm.toolstack.server import ControlServer


def test_base_dir_choice(monkeypatch):
    assert str(base_dir({"XENKVM_RUN_DIR": "/x/y"})) == "/x/y"
    expected = "/run/xenkvm" if os.geteuid() == 0 else "/r/xenkvm"
    assert str(base_dir({"XDG_RUNTIME_DIR": "/r"})) == expected


def test_domids_unique_lowest_free_and_stale_reclaimed(tmp_path):
    run = RunDir(tmp_path / "run")
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    a, ra = run.allocate("a", None, 0.0)
    b, rb = run.allocate("b", None, 0.0)
    assert (ra.domid, rb.domid) == (1, 2)
    with pytest.raises(ConfigError, match="already exists"):
        run.allocate("a", None, 0.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ra.pid, ra.start_time = dead.pid, 1
    a.write(ra)                                    # a's VMM is gone: stale
    c, rc = run.allocate("c", None, 0.0)
    assert rc.domid == 1                            # a's domid is free again
    with pytest.raises(ConfigError, match="not a domain name"):
        run.allocate("../x", None, 0.0)


def test_open_run_dir_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with pytest.raises(ConfigError, match="0700"):
        RunDir(d)


@pytest.fixture
def server(tmp_path):
    calls = []
    typed = []

    def echo(args):
        calls.append(args)
        return {"echo": args}

    def boom(args):
        raise RuntimeError("bug")

    srv = ControlServer(str(tmp_path / "c.sock"), {"echo": echo, "boom": boom}, console_input=typed.append,
                        console_tail=lambda: b"old output\n")
    srv.start()
    yield srv, calls, typed
    srv.close()


def test_requests_errors_and_console(server, tmp_path):
    srv, calls, typed = server
    assert (tmp_path / "c.sock").stat().st_mode & 0o777 == 0o600
    with ControlClient(str(tmp_path / "c.sock")) as c:
        assert c.call("echo", x=1) == {"echo": {"x": 1}}
        with pytest.raises(ApiError) as e:
            c.call("boom")
        assert e.value.code is ErrorCode.INTERNAL     # a handler bug is an answer, not a dead server
        c.send_raw(b'{"v":1,"id":"s","op":"echo","args":[]}\n')
        assert json.loads(c.read_line())["error"]["code"] == "bad-request"
        assert c.call("echo") == {"echo": {}}
    con = ControlClient(str(tmp_path / "c.sock"))
    head = con.attach_console()
    con.sock.settimeout(5)
    while b"old output\n" not in head:
        head += con.sock.recv(100)
    srv.console_output(b"new")
    got = b""
    while b"new" not in got:
        got += con.sock.recv(100)
    con.send_raw(b"typed")
    with ControlClient(str(tmp_path / "c.sock")) as c:
        c.call("echo")                                # a round trip: the typed bytes were handled
    assert b"".join(typed) == b"typed"
    con.close()


def test_slow_console_reader_is_dropped_not_buffered(server, tmp_path):
    srv, _, _ = server
    con = ControlClient(str(tmp_path / "c.sock"))
    con.attach_console()
    con.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(400):                              # 4 MiB never read
        srv.console_output(b"x" * 10240)
    with ControlClient(str(tmp_path / "c.sock")) as c:
        assert c.call("echo") == {"echo": {}}
    assert all(len(conn.outbuf) <= (1 << 20) + 10240 for conn in srv.conns.values())
    con.close()


def test_console_output_queued_at_close_is_delivered(tmp_path):
    """The guest's last words (written just before its machine stops) reach an attached console
    even when the control thread has not flushed them before the server closes."""
    srv = ControlServer(str(tmp_path / "c.sock"), {}, console_input=lambda data: None, console_tail=lambda: b"")
    srv.start()
    con = ControlClient(str(tmp_path / "c.sock"))
    con.attach_console()
    srv._wake = lambda: None                          # the control thread is not told: only close() can send it
    srv.console_output(b"shutdown request: poweroff\n")
    srv.close()
    con.sock.settimeout(5)
    got = b""
    while chunk := con.sock.recv(4096):
        got += chunk
    assert got.endswith(b"shutdown request: poweroff\n")
    con.close()
