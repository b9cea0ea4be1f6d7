"""Shared fixtures: an in-process client for the core, and a running socket server."""

from __future__ import annotations

import os
import tempfile

import pytest

from xenkvm.xenstore.client import XsClient
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.server import XenstoreServer


from xsdirect import Direct  # noqa: E402  (re-exported for fixtures)


@pytest.fixture
def core() -> Xenstored:
    return Xenstored()


@pytest.fixture
def dom0(core: Xenstored) -> Direct:
    return Direct(core)


@pytest.fixture
def make_client(core: Xenstored):
    """Factory: ``make_client(domid)`` -> Direct; domains other than 0 are introduced."""
    def _make(domid: int = 0) -> Direct:
        if not domid:
            return Direct(core)
        core.introduce_domain(domid)
        client = Direct(core, domid, kind="ring")
        core.domains.get(domid).conn = client.conn
        return client
    return _make


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="xs-") as tmp:
        yield tmp


@pytest.fixture
def server(sock_dir):
    srv = XenstoreServer(socket_path=os.path.join(sock_dir, "socket"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with XsClient(server.socket_path) as c:
        yield c
