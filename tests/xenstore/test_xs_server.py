"""UNIX-socket server: framing over a real socket, malformed input, embedding API."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading

import pytest

from xenkvm.xenstore.client import XsClient
from xenkvm.xenstore.protocol import HEADER, XenstoreError, XsError, XsType, encode
from xenkvm.xenstore.server import default_socket_path


def test_default_socket_path():
    assert default_socket_path({}) == "/run/xenstored/socket"
    assert default_socket_path({"XENSTORED_RUNDIR": "/tmp/x"}) == "/tmp/x/socket"
    assert default_socket_path({"XENSTORED_PATH": "/p/s", "XENSTORED_RUNDIR": "/x"}) == "/p/s"


def test_socket_mode_0600(server):
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600


def test_basic_ops(client):
    client.write("/a/b", "hello")
    assert client.read("/a/b") == b"hello"
    assert client.directory("/a") == ["b"]
    client.set_perms("/a/b", ["r0", "b3"])
    assert client.get_perms("/a/b") == ["r0", "b3"]
    client.rm("/a")
    with pytest.raises(XenstoreError) as exc:
        client.read("/a/b")
    assert exc.value.err == XsError.ENOENT


def test_reply_echoes_req_id_and_tx_id(client):
    tx = client.transaction_start()
    client.send(XsType.READ, b"/tool\0", tx_id=tx, req_id=0xABCD)
    assert client.recv_msg() == (XsType.READ, 0xABCD, tx, b"")


@pytest.mark.parametrize("type_, payload, err", [
    (XsType.READ, b"/tool", "EINVAL"),            # missing NUL
    (XsType.READ, b"/tool\0/x\0", "EINVAL"),      # extra string
    (XsType.WRITE, b"/nonul", "EINVAL"),
    (XsType.WATCH, b"/w\0", "EINVAL"),
    (XsType.SET_PERMS, b"/tool\0", "EINVAL"),
    (XsType.TRANSACTION_END, b"T\0", "ENOENT"),
    (99, b"", "ENOSYS"),
    (XsType.INVALID, b"", "ENOSYS"),
])
def test_malformed_requests_answered_connection_lives(client, type_, payload, err):
    rtype, data = client.request(type_, payload)
    assert (rtype, data) == (XsType.ERROR, err.encode() + b"\0")
    assert client.read("/tool") == b""


def test_bad_tx_id_enoent(client):
    assert client.request(XsType.READ, b"/tool\0", tx_id=1234) == (XsType.ERROR, b"ENOENT\0")
    assert client.read("/tool") == b""


def test_zero_length_payload(client):
    assert client.request(XsType.READ, b"") == (XsType.ERROR, b"EINVAL\0")


def test_oversized_header_closes_only_that_connection(server, client):
    bad = XsClient(server.socket_path)
    client.write("/still", "here")
    bad.sock.sendall(HEADER.pack(XsType.WRITE, 1, 0, 4097))
    with pytest.raises((ConnectionError, OSError)):
        bad.recv_msg()
    bad.close()
    assert client.read("/still") == b"here"


def test_max_payload_accepted(client):
    value = b"v" * (4096 - len(b"/big\0"))
    client.write("/big", value)
    assert client.read("/big") == value


def test_pipelined_requests_in_one_send(client):
    frames = b"".join(encode(XsType.WRITE, i, 0, f"/p/{i}\0{i}".encode()) for i in range(50))
    frames += encode(XsType.DIRECTORY, 99, 0, b"/p\0")
    client.sock.sendall(frames)
    replies = [client.recv_msg() for _ in range(51)]
    assert [r[1] for r in replies] == list(range(50)) + [99]
    assert len(replies[-1][3].split(b"\0")) == 51


def test_request_split_across_sends(client):
    frame = encode(XsType.WRITE, 5, 0, b"/split\0value")
    for i in range(len(frame)):
        client.sock.sendall(frame[i:i + 1])
    assert client.recv_msg() == (XsType.WRITE, 5, 0, b"OK\0")


def test_watch_between_clients(server, client):
    with XsClient(server.socket_path) as watcher:
        watcher.watch("/w", "tok")
        assert watcher.wait_event() == ("/w", "tok")
        client.write("/w/x", "1")
        assert watcher.wait_event() == ("/w/x", "tok")
        client.rm("/w")
        assert watcher.wait_event() == ("/w", "tok")


def test_disconnect_drops_watches_and_transactions(server, client):
    watcher = XsClient(server.socket_path)
    watcher.watch("/w", "tok")
    watcher.transaction_start()
    watcher.close()
    client.write("/sync", "")        # round trip: the server has seen the close
    assert len(server.core.watches) == 0
    assert all(not c.transactions for c in server.core.connections.values())


def test_vmm_thread_write_reaches_socket_watcher(server, client):
    client.watch("/vmm", "t")
    assert client.wait_event() == ("/vmm", "t")
    thread = threading.Thread(target=server.core.write_path, args=("/vmm/x", "1"))
    thread.start()
    thread.join()
    assert client.wait_event() == ("/vmm/x", "t")


def test_many_clients(server):
    clients = [XsClient(server.socket_path) for _ in range(40)]
    try:
        for i, c in enumerate(clients):
            c.write(f"/many/{i}", str(i))
        for i, c in enumerate(clients):
            assert c.read(f"/many/{i}") == str(i).encode()
    finally:
        for c in clients:
            c.close()


def test_large_output_backpressure(server, client):
    """A client that does not read while many events pile up still gets them all."""
    watcher = XsClient(server.socket_path)
    watcher.watch("/flood", "t" * 1000)
    watcher.wait_event()
    for i in range(300):
        client.write(f"/flood/{i}", "")
    got = [watcher.wait_event()[0] for _ in range(300)]
    assert got == [f"/flood/{i}" for i in range(300)]
    watcher.close()


def test_client_reset_connection(server):
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(server.socket_path)
    raw.sendall(encode(XsType.READ, 1, 0, b"/tool\0")[:10])
    raw.close()
    with XsClient(server.socket_path) as c:
        assert c.read("/tool") == b""


def test_embedded_vmm_flow(server, client):
    """What the VMM does: build the guest's home, attach its ring, kick on notify."""
    from xenkvm.xenstore.layout import DomainInfo, initial_tree, vm_uuid, write_tree
    from xenkvm.xenstore.protocol import FrameDecoder
    write_tree(server.core, initial_tree(DomainInfo(1, "guest", vm_uuid("guest", 1), vcpus=1, memory_kib=65536,
                                                    store_port=1, store_gfn=0xFEB00)))
    client.watch("/local/domain/1/data", "backend")
    assert client.wait_event() == ("/local/domain/1/data", "backend")
    page = bytearray(4096)
    notified = threading.Event()
    ring = server.add_ring(1, page, notified.set)
    frame = encode(XsType.WRITE, 1, 0, b"data/ip\x0010.0.0.2")
    page[:len(frame)] = frame
    struct.pack_into("<I", page, 2052, len(frame))        # req_prod
    ring.kick()                                            # from the "vCPU" thread
    assert notified.is_set()
    decoder = FrameDecoder()
    decoder.feed(bytes(page[1024:1024 + struct.unpack_from("<I", page, 2060)[0]]))
    assert decoder.next().payload == b"OK\0"
    assert client.wait_event() == ("/local/domain/1/data/ip", "backend")
    assert client.read("/local/domain/1/data/ip") == b"10.0.0.2"
    assert client.call(XsType.IS_DOMAIN_INTRODUCED, b"1\0") == b"T\0"
