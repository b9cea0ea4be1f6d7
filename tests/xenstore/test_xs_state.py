"""Durability: lossless snapshot/restore, atomic saves, the daemon's state option."""

from __future__ import annotations

import json
import os

import pytest

from xenkvm.xenstore import state
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.perms import Perm
from xenkvm.xenstore.protocol import Message, XsType


def populated() -> Xenstored:
    core = Xenstored()
    core.quotas.nodes = 77
    core.write_path("/local/domain/3", "", perms=(Perm(0, 0), Perm(1, 3)))
    core.write_path("/local/domain/3/name", b"\x00binary\xff")
    core.write_path("/z/b", "1")
    core.write_path("/z/a", "2")          # child order differs from sorted order
    core.store.special_perms["@releaseDomain"] = (Perm(0, 0), Perm(1, 3))
    page = bytearray(4096)
    ring = core.attach_ring(3, page, lambda: None)
    conn = ring.conn
    with core.lock:
        core.handle(conn, Message(XsType.WATCH, 1, 0, b"name\0rel-token\0"))
        core.handle(conn, Message(XsType.WATCH, 2, 0, b"/z\0abs\xfftoken\0"))
    core.domains.get(3).target = 5
    return core


def test_snapshot_roundtrip_is_lossless():
    core = populated()
    doc = state.snapshot(core)
    again = state.snapshot(state.restore(json.loads(json.dumps(doc))))
    assert again == doc


def test_restore_contents():
    core = state.restore(json.loads(json.dumps(state.snapshot(populated()))))
    assert core.read_path("/local/domain/3/name") == b"\x00binary\xff"
    assert core.store.nodes["/z"].children == ("b", "a")
    assert core.quotas.nodes == 77
    assert core.store.special_perms["@releaseDomain"] == (Perm(0, 0), Perm(1, 3))
    assert core.store.check() == []
    assert core.store.owned(0) == len(core.store.nodes) - 1
    dom = core.domains.get(3)
    assert dom.target == 5
    assert sorted(w[1] for w in dom.saved_watches) == ["abs\udcfftoken", "rel-token"]


def test_restored_watches_rearm_when_ring_attaches():
    core = state.restore(json.loads(json.dumps(state.snapshot(populated()))))
    page = bytearray(4096)
    ring = core.attach_ring(3, page, lambda: None)
    assert {(w.path, w.token) for w in ring.conn.watches.values()} == {
        ("/local/domain/3/name", "rel-token"), ("/z", "abs\udcfftoken")}
    core.write_path("/local/domain/3/name", "x")
    data = ring.conn.out.chunk(4096) or bytes(page[1024:2048])
    assert b"name\0rel-token\0" in data


def test_generation_preserved():
    core = populated()
    restored = state.restore(state.snapshot(core))
    assert restored.store.generation == core.store.generation
    for path, node in core.store.nodes.items():
        assert restored.store.nodes[path].generation == node.generation


def test_save_and_load(tmp_path):
    path = str(tmp_path / "xs.json")
    core = populated()
    state.save(core, path)
    assert state.snapshot(state.load(path)) == state.snapshot(core)
    assert os.listdir(tmp_path) == ["xs.json"]


def test_crash_mid_save_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "xs.json")
    state.save(Xenstored(), path)
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        state.save(populated(), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["xs.json"]


def test_bad_state_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(state.StateError):
        state.load(str(path))
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(state.StateError):
        state.load(str(path))
    path.write_text(json.dumps({"format": state.FORMAT, "version": 999}))
    with pytest.raises(state.StateError):
        state.load(str(path))


def test_daemon_rejects_bad_state(tmp_path):
    from xenkvm.xenstore.daemon import main
    bad = tmp_path / "bad.json"
    bad.write_text("garbage")
    assert main(["--socket", str(tmp_path / "s"), "--state", str(bad)]) == 1


def test_daemon_quota_option(tmp_path):
    from xenkvm.xenstore.daemon import build_core, parse_args
    core = build_core(parse_args(["--quota", "nodes=12", "--quota", "watches=0x10"]))
    assert (core.quotas.nodes, core.quotas.watches) == (12, 16)


def test_malformed_state_document(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": state.FORMAT, "version": state.VERSION}))
    with pytest.raises(state.StateError):
        state.load(str(path))
    path.write_text(json.dumps({"format": state.FORMAT, "version": state.VERSION,
                                "generation": 1, "nodes": [{"path": "/x"}]}))
    with pytest.raises(state.StateError):
        state.load(str(path))
