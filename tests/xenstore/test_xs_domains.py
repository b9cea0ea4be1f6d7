"""Domain operations, privileged-only requests, CONTROL and node/quota accounting."""

from __future__ import annotations

import pytest

from xenkvm.xenstore.protocol import XsType


def test_get_domain_path(dom0, make_client):
    assert dom0.call(XsType.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    assert dom0.call(XsType.GET_DOMAIN_PATH, b"junk\0") == b"/local/domain/0\0"
    assert make_client(5).call(XsType.GET_DOMAIN_PATH, b"5\0") == b"/local/domain/5\0"
    assert dom0.err(XsType.GET_DOMAIN_PATH, b"7") == "EINVAL"


@pytest.mark.parametrize("type_, payload", [
    (XsType.INTRODUCE, b"9\x000\x001\0"),
    (XsType.RELEASE, b"9\0"),
    (XsType.RESUME, b"9\0"),
    (XsType.SET_TARGET, b"9\x005\0"),
    (XsType.IS_DOMAIN_INTRODUCED, b"9\0"),
    (XsType.CONTROL, b"quota\0"),
])
def test_privileged_ops_refused_to_guests(make_client, type_, payload):
    assert make_client(5).err(type_, payload) == "EACCES"


def test_introduce_release_bookkeeping(dom0):
    assert dom0.call(XsType.IS_DOMAIN_INTRODUCED, b"3\0") == b"F\0"
    assert dom0.call(XsType.INTRODUCE, b"3\x00123\x004\0") == b"OK\0"
    assert dom0.call(XsType.IS_DOMAIN_INTRODUCED, b"3\0") == b"T\0"
    assert dom0.core.domains.get(3).port == 4
    assert dom0.call(XsType.INTRODUCE, b"3\x00123\x004\0") == b"OK\0"   # again: fine
    dom0.call(XsType.RELEASE, b"3\0")
    assert dom0.call(XsType.IS_DOMAIN_INTRODUCED, b"3\0") == b"F\0"


def test_is_domain_introduced_domid_self(dom0):
    assert dom0.call(XsType.IS_DOMAIN_INTRODUCED, str(0x7FF0).encode() + b"\0") == b"T\0"


def test_introduce_errors(dom0):
    assert dom0.err(XsType.INTRODUCE, b"3\x000\x000\0") == "EINVAL"    # port 0
    assert dom0.err(XsType.INTRODUCE, b"3\x000\0") == "EINVAL"          # too few
    assert dom0.err(XsType.INTRODUCE, b"-1\x000\x001\0") == "EINVAL"


def test_release_errors(dom0):
    assert dom0.err(XsType.RELEASE, b"0\0") == "EINVAL"
    assert dom0.err(XsType.RELEASE, b"42\0") == "ENOENT"
    assert dom0.err(XsType.RELEASE, b"42") == "EINVAL"


def test_introduce_fires_once_release_fires(dom0, make_client):
    watcher = make_client(0)
    watcher.watch("@introduceDomain", "i")
    watcher.watch("@releaseDomain", "r")
    watcher.take_events()
    dom0.call(XsType.INTRODUCE, b"4\x000\x001\0")
    dom0.call(XsType.INTRODUCE, b"4\x000\x001\0")
    assert watcher.take_events() == [("@introduceDomain", "i")]
    dom0.call(XsType.RELEASE, b"4\0")
    assert watcher.take_events() == [("@releaseDomain", "r")]


def test_release_removes_nodes_owned_by_domain(core, dom0, make_client):
    guest = make_client(6)
    dom0.mkdir("/local/domain/6")
    dom0.chmod("/local/domain/6", "n0", "b6")
    dom0.write("/shared", "")
    dom0.chmod("/shared", "n0", "r6", "b7")
    guest.write("/local/domain/6/data/x", "1")
    assert core.store.owned(6) == 2
    dom0.call(XsType.RELEASE, b"6\0")
    assert dom0.ls("/local/domain/6") == []
    assert dom0.perms("/local/domain/6") == ["n0"]
    assert dom0.perms("/shared") == ["n0", "b7"]
    assert core.store.owned(6) == 0
    assert guest.conn.closed


def test_resume_clears_shutdown(core, dom0):
    core.introduce_domain(3)
    core.domain_shutdown(3)
    assert core.domains.get(3).shutdown
    dom0.call(XsType.RESUME, b"3\0")
    assert not core.domains.get(3).shutdown
    assert dom0.err(XsType.RESUME, b"99\0") == "ENOENT"


def test_domain_shutdown_fires_release_once(core, dom0):
    core.introduce_domain(3)
    dom0.watch("@releaseDomain", "r")
    dom0.take_events()
    core.domain_shutdown(3)
    core.domain_shutdown(3)
    assert dom0.take_events() == [("@releaseDomain", "r")]


def test_set_target_errors(dom0, make_client):
    make_client(5)
    assert dom0.err(XsType.SET_TARGET, b"5\0") == "EINVAL"
    assert dom0.err(XsType.SET_TARGET, b"5\x0077\0") == "ENOENT"
    assert dom0.err(XsType.SET_TARGET, b"77\x005\0") == "ENOENT"


def test_unknown_and_reserved_types_enosys(dom0):
    for type_ in (20, 23, 24, 25, 26, 99, 0xFFFF, XsType.WATCH_EVENT, XsType.ERROR):
        assert dom0.err(type_, b"/\0") == "ENOSYS"


def test_errors_keep_request_header(dom0):
    with dom0.core.lock:
        from xenkvm.xenstore.protocol import Message
        dom0.core.handle(dom0.conn, Message(XsType.READ, 0xDEAD, 0, b"/nope\0"))
    data = dom0.conn.out.chunk(100)
    from xenkvm.xenstore.protocol import HEADER
    assert HEADER.unpack_from(data) == (XsType.ERROR, 0xDEAD, 0, 7)
    assert data[16:] == b"ENOENT\0"


# ---------------------------------------------------------------- CONTROL
def test_control_quota_report(dom0):
    text = dom0.call(XsType.CONTROL, b"quota\0").decode()
    assert text.startswith("Quota settings:\n")
    assert "nodes" in text and "1000" in text
    assert "watches" in text and "128" in text
    assert "outstanding" in text and "20" in text
    assert text.endswith("\0")


def test_control_quota_set_and_domain_usage(core, dom0, make_client):
    dom0.call(XsType.CONTROL, b"quota\0nodes\x0050\0")
    assert core.quotas.nodes == 50
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "b5")
    guest.write("/local/domain/5/a", "")
    guest.watch("/local/domain/5", "t")
    text = dom0.call(XsType.CONTROL, b"quota\x005\0").decode()
    assert text.startswith("Domain 5:")
    assert "nodes" in text and "watches" in text
    assert dom0.err(XsType.CONTROL, b"quota\0bogus\x001\0") == "EINVAL"
    assert dom0.err(XsType.CONTROL, b"quota\x0099\0") == "ENOENT"


def test_control_misc(dom0):
    assert dom0.call(XsType.CONTROL, b"check\0") == b"OK\0"
    assert b"quota" in dom0.call(XsType.CONTROL, b"help\0")
    assert dom0.call(XsType.CONTROL, b"print\0hello\0") == b"OK\0"
    assert b"nodes:" in dom0.call(XsType.CONTROL, b"memreport\0")
    assert dom0.call(XsType.CONTROL, b"quota-soft\0").startswith(b"Soft")
    assert dom0.err(XsType.CONTROL, b"bogus\0") == "EINVAL"
    assert dom0.err(XsType.CONTROL, b"") == "EINVAL"


# ---------------------------------------------------------------- node quota
def test_nodes_per_domain_quota(core, dom0, make_client):
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "n0", "b5")
    core.quotas.nodes = 5
    for i in range(5):
        guest.write(f"/local/domain/5/n{i}", "")
    assert guest.err(XsType.WRITE, b"/local/domain/5/n5\0") == "ENOSPC"
    assert guest.err(XsType.MKDIR, b"/local/domain/5/n5\0") == "ENOSPC"
    guest.write("/local/domain/5/n0", "overwrite is fine")
    guest.rm("/local/domain/5/n0")
    guest.write("/local/domain/5/n5", "")
    dom0.write("/local/domain/5/dom0-made", "")   # privileged: no quota


def test_nodes_quota_counts_all_missing_parents(core, dom0, make_client):
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "n0", "b5")
    core.quotas.nodes = 3
    assert guest.err(XsType.WRITE, b"/local/domain/5/a/b/c/d\0") == "ENOSPC"
    assert dom0.ls("/local/domain/5") == []
    guest.write("/local/domain/5/a/b/c", "")


def test_perms_per_node_quota(core, dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "")
    dom0.chmod("/p", "n5")
    guest.chmod("/p", "n5", "r1", "r2", "r3", "r4")
    assert guest.err(XsType.SET_PERMS, b"/p\0n5\0r1\0r2\0r3\0r4\0r6\0") == "ENOSPC"
    dom0.chmod("/p", "n5", "r1", "r2", "r3", "r4", "r6", "r7")


def test_quota_names_roundtrip():
    from xenkvm.xenstore.quota import Quotas
    quotas = Quotas()
    for name in Quotas.names():
        quotas.set(name, quotas.get(name) + 1)
    with pytest.raises(KeyError):
        quotas.set("nope", 1)
    with pytest.raises(ValueError):
        quotas.set("nodes", -1)


# ---------------------------------------------------------------- initial layout
def test_initial_tree_permissions(core, dom0, make_client):
    from xenkvm.xenstore.layout import DomainInfo, initial_tree, vm_uuid, write_tree
    write_tree(core, initial_tree(DomainInfo(4, "guest4", vm_uuid("guest4", 4), vcpus=2, memory_kib=524288,
                                             store_port=3, store_gfn=0xFEB00, console_port=2,
                                             console_gfn=0xFEB01)))
    guest = make_client(4)
    assert guest.read("name") == b"guest4"
    assert guest.read("memory/static-max") == b"524288"
    assert guest.read("memory/target") == b"524288"      # the guest starts at its target
    assert guest.err(XsType.WRITE, b"memory/target\0x") == "EACCES"   # only the toolstack sets it
    assert guest.read("cpu/1/availability") == b"online"
    assert guest.read("console/port") == b"2"
    assert guest.err(XsType.WRITE, b"name\0x") == "EACCES"
    assert guest.err(XsType.WRITE, b"memory/static-max\0x") == "EACCES"
    assert guest.err(XsType.WRITE, b"control/platform-feature-xs_reset_watches\0x") == "EACCES"
    guest.write("data/foo", "bar")
    guest.write("control/shutdown", "poweroff")
    guest.write("device/suspend/event-channel", "5")
    assert guest.err(XsType.WRITE, b"device/vbd\0x") == "EACCES"
    assert dom0.perms("/local/domain/4") == ["n0", "r4"]
    assert dom0.perms("/local/domain/4/data") == ["n4"]
    other = make_client(9)
    assert other.err(XsType.READ, b"/local/domain/4/name\0") == "EACCES"
