"""Unit tests for every node operation and its errors, through the request dispatcher."""

from __future__ import annotations

import pytest

from xenkvm.xenstore.protocol import PAYLOAD_MAX, XsType
from xenkvm.xenstore.store import RECORD_HEADER_SIZE


# ---------------------------------------------------------------- READ / WRITE
def test_initial_tree(dom0):
    assert dom0.ls("/") == ["tool", "local"]
    assert dom0.ls("/tool") == ["xenstored"]
    assert dom0.ls("/local") == ["domain"]
    assert dom0.perms("/") == ["n0"]


def test_write_read_roundtrip_binary(dom0):
    dom0.write("/a", b"\x00\x01\xffbinary")
    assert dom0.read("/a") == b"\x00\x01\xffbinary"


def test_read_reply_has_no_trailing_nul(dom0):
    dom0.write("/a", "v")
    assert dom0.raw(XsType.READ, b"/a\0") == (XsType.READ, b"v")


def test_write_creates_missing_parents_with_empty_values(dom0):
    dom0.write("/x/y/z", "1")
    assert dom0.read("/x") == b""
    assert dom0.read("/x/y") == b""
    assert dom0.ls("/x") == ["y"]
    assert dom0.ls("/x/y") == ["z"]


def test_write_overwrites_value_keeps_children(dom0):
    dom0.write("/a/b", "1")
    dom0.write("/a", "2")
    assert dom0.read("/a") == b"2"
    assert dom0.ls("/a") == ["b"]


def test_write_empty_value(dom0):
    dom0.write("/a", "")
    assert dom0.read("/a") == b""


def test_write_missing_nul_is_einval(dom0):
    assert dom0.err(XsType.WRITE, b"/a") == "EINVAL"
    assert dom0.err(XsType.WRITE, b"") == "EINVAL"


def test_read_missing_is_enoent(dom0):
    assert dom0.err(XsType.READ, b"/nope\0") == "ENOENT"


def test_read_needs_exactly_one_string(dom0):
    dom0.write("/a", "1")
    assert dom0.err(XsType.READ, b"/a") == "EINVAL"            # no NUL
    assert dom0.err(XsType.READ, b"/a\0junk") == "EINVAL"      # trailing data
    assert dom0.err(XsType.READ, b"/a\0\0") == "EINVAL"        # two strings
    assert dom0.err(XsType.READ, b"") == "EINVAL"


def test_children_keep_insertion_order(dom0):
    for name in ("c", "a", "b"):
        dom0.write(f"/o/{name}", "")
    assert dom0.ls("/o") == ["c", "a", "b"]


# ---------------------------------------------------------------- path rules
@pytest.mark.parametrize("path", [
    "/a//b", "/a/", "/a b", "/a\tb", "/ä", "/a.b", "/a:b", "/a*", "@foo", "/" + "x" * 3072,
])
def test_invalid_paths_einval(dom0, path):
    assert dom0.err(XsType.WRITE, path.encode() + b"\0v") == "EINVAL"
    assert dom0.err(XsType.READ, path.encode() + b"\0") == "EINVAL"


@pytest.mark.parametrize("path", ["/a-b", "/A_Z/0-9", "/x@y", "/" + "x" * 3071])
def test_valid_paths(dom0, path):
    dom0.write(path, "1")
    assert dom0.read(path) == b"1"


def test_relative_paths_resolve_under_local_domain(dom0, make_client):
    dom0.write("/local/domain/0/rel", "zero")
    assert dom0.read("rel") == b"zero"
    guest = make_client(7)
    dom0.mkdir("/local/domain/7")
    dom0.chmod("/local/domain/7", "b7")
    guest.write("data/x", "1")
    assert dom0.read("/local/domain/7/data/x") == b"1"


def test_empty_relative_path_is_einval(dom0):
    assert dom0.err(XsType.READ, b"\0") == "EINVAL"


def test_unprivileged_path_max_counts_below_domain_home(core, dom0, make_client):
    guest = make_client(3)
    dom0.mkdir("/local/domain/3")
    dom0.chmod("/local/domain/3", "b3")
    core.quotas.path_max = 20
    guest.write("/local/domain/3/" + "x" * 20, "ok")
    assert guest.err(XsType.WRITE, b"/local/domain/3/" + b"x" * 21 + b"\0v") == "EINVAL"


# ---------------------------------------------------------------- MKDIR
def test_mkdir_creates(dom0):
    dom0.mkdir("/m/n")
    assert dom0.read("/m/n") == b""
    assert dom0.ls("/m") == ["n"]


def test_mkdir_leaves_existing_value(dom0):
    dom0.write("/m", "keep")
    dom0.mkdir("/m")
    assert dom0.read("/m") == b"keep"


def test_mkdir_errors(dom0):
    assert dom0.err(XsType.MKDIR, b"/m//n\0") == "EINVAL"
    assert dom0.err(XsType.MKDIR, b"/m") == "EINVAL"


# ---------------------------------------------------------------- RM
def test_rm_subtree(dom0):
    dom0.write("/r/a/b", "1")
    dom0.write("/r/c", "2")
    dom0.rm("/r")
    assert dom0.err(XsType.READ, b"/r\0") == "ENOENT"
    assert dom0.err(XsType.READ, b"/r/a/b\0") == "ENOENT"
    assert "r" not in dom0.ls("/")
    assert set(dom0.core.store.nodes) == {"/", "/tool", "/tool/xenstored", "/local",
                                          "/local/domain"}


def test_rm_missing_node_with_parent_ok(dom0):
    dom0.write("/p", "")
    dom0.rm("/p/missing")


def test_rm_missing_parent_is_enoent(dom0):
    assert dom0.err(XsType.RM, b"/nope/missing\0") == "ENOENT"


def test_rm_root_is_einval(dom0):
    assert dom0.err(XsType.RM, b"/\0") == "EINVAL"


def test_rm_deep_tree_no_recursion_limit(dom0):
    path = "/d" + "/x" * 1400
    dom0.write(path, "deep")
    dom0.rm("/d")
    assert "d" not in dom0.ls("/")


# ---------------------------------------------------------------- DIRECTORY(_PART)
def test_directory_empty_reply_is_len0(dom0):
    dom0.write("/e", "")
    assert dom0.raw(XsType.DIRECTORY, b"/e\0") == (XsType.DIRECTORY, b"")


def test_directory_missing_enoent(dom0):
    assert dom0.err(XsType.DIRECTORY, b"/nope\0") == "ENOENT"


def _make_many(dom0, count=400):
    for i in range(count):
        dom0.write(f"/big/child-with-a-long-name-{i:05d}", "")
    return [f"child-with-a-long-name-{i:05d}" for i in range(count)]


def test_directory_too_big_is_e2big(dom0):
    _make_many(dom0)
    assert dom0.err(XsType.DIRECTORY, b"/big\0") == "E2BIG"


def test_directory_part_pages_whole_list(dom0):
    names = _make_many(dom0)
    got, offset, gens = [], 0, set()
    while True:
        data = dom0.call(XsType.DIRECTORY_PART, b"/big\0" + str(offset).encode() + b"\0")
        assert len(data) <= PAYLOAD_MAX
        gen, rest = data.split(b"\0", 1)
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            body = rest[:-1]
            got += [s.decode() for s in body.split(b"\0")[:-1]]
            break
        got += [s.decode() for s in rest.split(b"\0")[:-1]]
        offset += len(rest)
    assert got == names
    assert len(gens) == 1


def test_directory_part_generation_changes_with_children(dom0):
    dom0.write("/g/a", "")
    gen1 = dom0.call(XsType.DIRECTORY_PART, b"/g\0" + b"0\0").split(b"\0")[0]
    dom0.write("/g/b", "")
    gen2 = dom0.call(XsType.DIRECTORY_PART, b"/g\0" + b"0\0").split(b"\0")[0]
    assert gen1 != gen2


def test_directory_part_small_and_beyond_end(dom0):
    dom0.write("/g/a", "")
    dom0.write("/g/bb", "")
    data = dom0.call(XsType.DIRECTORY_PART, b"/g\0" + b"0\0")
    gen = data.split(b"\0")[0]
    assert data == gen + b"\0a\0bb\0\0"
    assert dom0.call(XsType.DIRECTORY_PART, b"/g\0" + b"2\0") == gen + b"\0bb\0\0"
    assert dom0.call(XsType.DIRECTORY_PART, b"/g\0" + b"99\0") == gen + b"\0\0"


def test_directory_part_bad_args(dom0):
    dom0.write("/g", "")
    assert dom0.err(XsType.DIRECTORY_PART, b"/g\0") == "EINVAL"
    assert dom0.err(XsType.DIRECTORY_PART, b"/g\x000") == "EINVAL"


# ---------------------------------------------------------------- permissions
def test_get_set_perms(dom0):
    dom0.write("/p", "")
    dom0.chmod("/p", "r0", "b5", "w6", "n7")
    assert dom0.perms("/p") == ["r0", "b5", "w6", "n7"]


def test_set_perms_strtol_domids(dom0):
    dom0.write("/p", "")
    dom0.chmod("/p", "n0x10", "r010")
    assert dom0.perms("/p") == ["n16", "r8"]


@pytest.mark.parametrize("bad", [b"x5", b"r", b"r5z", b"b-", b""])
def test_set_perms_bad_perm_einval(dom0, bad):
    dom0.write("/p", "")
    assert dom0.err(XsType.SET_PERMS, b"/p\0" + bad + b"\0") == "EINVAL"


def test_set_perms_needs_a_perm(dom0):
    dom0.write("/p", "")
    assert dom0.err(XsType.SET_PERMS, b"/p\0") == "EINVAL"


def test_new_nodes_inherit_parent_perms(dom0):
    dom0.write("/p", "")
    dom0.chmod("/p", "r0", "b5")
    dom0.write("/p/q/r", "")
    assert dom0.perms("/p/q") == ["r0", "b5"]
    assert dom0.perms("/p/q/r") == ["r0", "b5"]


def test_unprivileged_creator_owns_new_nodes(dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "")
    dom0.chmod("/p", "r0", "b5")
    guest.write("/p/mine/deep", "1")
    assert dom0.perms("/p/mine") == ["r5", "b5"]
    assert dom0.perms("/p/mine/deep") == ["r5", "b5"]


def test_owner_letter_is_default(dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "v")
    dom0.chmod("/p", "r0")
    assert guest.read("/p") == b"v"
    assert guest.err(XsType.WRITE, b"/p\0x") == "EACCES"
    dom0.chmod("/p", "n0", "w5")
    assert guest.err(XsType.READ, b"/p\0") == "EACCES"
    guest.write("/p", "x")


def test_owner_has_full_access(dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "v")
    dom0.chmod("/p", "n5")
    assert guest.read("/p") == b"v"
    guest.chmod("/p", "n5", "r6")
    assert dom0.perms("/p") == ["n5", "r6"]


def test_unprivileged_cannot_change_owner(dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "v")
    dom0.chmod("/p", "n5")
    assert guest.err(XsType.SET_PERMS, b"/p\0n6\0") == "EPERM"


def test_set_perms_needs_ownership(dom0, make_client):
    guest = make_client(5)
    dom0.write("/p", "v")
    dom0.chmod("/p", "b0", "b5")
    assert guest.err(XsType.SET_PERMS, b"/p\0b0\0") == "EACCES"


def test_missing_node_enoent_only_if_parent_readable(dom0, make_client):
    guest = make_client(5)
    dom0.write("/hidden/x", "")
    dom0.chmod("/hidden", "n0")
    assert guest.err(XsType.READ, b"/hidden/nope\0") == "EACCES"
    dom0.chmod("/hidden", "r0")
    assert guest.err(XsType.READ, b"/hidden/nope\0") == "ENOENT"


def test_create_needs_write_on_nearest_ancestor(dom0, make_client):
    guest = make_client(5)
    dom0.write("/ro", "")
    dom0.chmod("/ro", "r0")
    assert guest.err(XsType.WRITE, b"/ro/a/b\0v") == "EACCES"
    assert guest.err(XsType.MKDIR, b"/ro/a\0") == "EACCES"
    dom0.chmod("/ro", "r0", "b5")
    guest.write("/ro/a/b", "v")


def test_rm_needs_write(dom0, make_client):
    guest = make_client(5)
    dom0.write("/ro/x", "")
    dom0.chmod("/ro/x", "r0")
    dom0.chmod("/ro", "r0")
    assert guest.err(XsType.RM, b"/ro/x\0") == "EACCES"


def test_target_gets_owners_rights(core, dom0, make_client):
    stub = make_client(9)
    make_client(4)
    dom0.write("/t", "v")
    dom0.chmod("/t", "n4")
    assert stub.err(XsType.READ, b"/t\0") == "EACCES"
    dom0.call(XsType.SET_TARGET, b"9\x004\0")
    assert stub.read("/t") == b"v"


def test_special_path_perms(dom0, make_client):
    guest = make_client(5)
    assert dom0.perms("@releaseDomain") == ["n0"]
    dom0.chmod("@releaseDomain", "n0", "r5")
    assert dom0.perms("@releaseDomain") == ["n0", "r5"]
    assert guest.perms("@releaseDomain") == ["n0", "r5"]
    assert guest.err(XsType.SET_PERMS, b"@releaseDomain\0b5\0") == "EACCES"
    assert dom0.err(XsType.SET_PERMS, b"@other\0n0\0") == "EINVAL"
    assert dom0.err(XsType.GET_PERMS, b"@other\0") == "EINVAL"


# ---------------------------------------------------------------- quota: node size
def test_node_size_quota_for_guests_only(core, dom0, make_client):
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "b5")
    limit = core.quotas.node_size - RECORD_HEADER_SIZE - 8 - 1
    guest.write("/local/domain/5/ok", b"x" * limit)            # record size 2047
    assert guest.err(XsType.WRITE, b"/local/domain/5/big\0" + b"x" * (limit + 1)) == "ENOSPC"
    dom0.write("/local/domain/5/big", b"x" * 4000)
