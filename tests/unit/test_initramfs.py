"""newc cpio writer: byte format, determinism, and extraction by the system cpio."""
from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess

import pytest

from xenkvm.machine.boot.initramfs import Cpio, InitramfsError


def parse_newc(data: bytes) -> list[dict]:
    """An independent newc reader: checks magic and 4-byte alignment of every member."""
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
             "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    out, off = [], 0
    while True:
        assert off % 4 == 0 and data[off:off + 6] == b"070701"
        fields = {n: int(data[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_end = off + 110 + fields["namesize"]
        fields["name"] = data[off + 110:name_end - 1].decode()
        assert data[name_end - 1] == 0
        body = name_end + (-name_end % 4)
        fields["data"] = data[body:body + fields["filesize"]]
        off = body + fields["filesize"] + (-fields["filesize"] % 4)
        out.append(fields)
        if fields["name"] == "TRAILER!!!":
            assert off == len(data)
            return out


def sample() -> Cpio:
    c = Cpio()
    c.add_dir("bin")
    c.add_file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755, mtime=1_700_000_000)
    c.add_file("etc/motd", "odd length!", 0o644, uid=1000, gid=100)      # etc/ made implicitly
    c.add_symlink("init", "bin/hello")
    c.add_device("dev/console", "c", 5, 1, 0o600)
    c.add_device("dev/sda", "b", 8, 0, 0o660)
    c.add_dir("tmp", 0o1777)
    return c


def test_format_fields():
    members = {m["name"]: m for m in parse_newc(sample().to_bytes())}
    assert list(members) == ["bin", "bin/hello", "etc", "etc/motd", "init", "dev", "dev/console",
                             "dev/sda", "tmp", "TRAILER!!!"]
    assert members["bin"]["mode"] == stat.S_IFDIR | 0o755 and members["bin"]["nlink"] == 2
    assert members["bin/hello"]["mode"] == stat.S_IFREG | 0o755
    assert members["bin/hello"]["mtime"] == 1_700_000_000
    assert members["etc/motd"]["data"] == b"odd length!"
    assert (members["etc/motd"]["uid"], members["etc/motd"]["gid"]) == (1000, 100)
    assert members["init"]["mode"] == stat.S_IFLNK | 0o777 and members["init"]["data"] == b"bin/hello"
    con = members["dev/console"]
    assert con["mode"] == stat.S_IFCHR | 0o600 and (con["rdevmajor"], con["rdevminor"]) == (5, 1)
    assert members["dev/sda"]["mode"] == stat.S_IFBLK | 0o660
    assert members["tmp"]["mode"] & 0o7777 == 0o1777
    inos = [m["ino"] for m in members.values() if m["name"] != "TRAILER!!!"]
    assert len(set(inos)) == len(inos)


def test_deterministic_and_gzip():
    a, b = sample().to_bytes(), sample().to_bytes()
    assert a == b
    ga, gb = sample().to_bytes("gzip"), sample().to_bytes("gzip")
    assert ga == gb and gzip.decompress(ga) == a


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_system_cpio_extracts_it(tmp_path):
    archive = tmp_path / "initrd.cpio"
    archive.write_bytes(sample().to_bytes())
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, check=True, text=True).stdout
    assert "dev/console" in listing and listing.splitlines()[0].startswith("drwxr-xr-x")
    root = tmp_path / "root"
    root.mkdir()
    can_mknod = os.geteuid() == 0
    c = sample() if can_mknod else _without_devices()
    (tmp_path / "x.cpio").write_bytes(c.to_bytes())
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=root,
                   stdin=(tmp_path / "x.cpio").open("rb"), check=True)
    assert (root / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((root / "bin/hello").stat().st_mode) == 0o755
    assert (root / "bin/hello").stat().st_mtime == 1_700_000_000
    assert (root / "etc/motd").read_text() == "odd length!"
    assert os.readlink(root / "init") == "bin/hello"
    if can_mknod:
        st = (root / "dev/console").lstat()
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)
        assert stat.S_ISBLK((root / "dev/sda").lstat().st_mode)


def _without_devices() -> Cpio:
    c = Cpio()
    c.add_dir("bin")
    c.add_file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755, mtime=1_700_000_000)
    c.add_file("etc/motd", "odd length!")
    c.add_symlink("init", "bin/hello")
    return c


@pytest.mark.parametrize("path", ["/abs", "../up", "a/../b", "a//b", "a/./b", ".", "", "a/", "nul\0x"])
def test_bad_paths_rejected(path):
    with pytest.raises(InitramfsError):
        Cpio().add_file(path, b"")


def test_other_bad_input():
    c = Cpio().add_file("f", b"x")
    with pytest.raises(InitramfsError, match="already"):
        c.add_file("f", b"y")
    with pytest.raises(InitramfsError, match="not a directory"):
        c.add_file("f/g", b"y")
    with pytest.raises(InitramfsError):
        c.add_file("m", b"", mode=0o10000)
    with pytest.raises(InitramfsError):
        c.add_device("d", "x", 1, 1)
    with pytest.raises(InitramfsError):
        c.add_device("d", "c", 1 << 32, 1)
    with pytest.raises(InitramfsError):
        c.add_symlink("l", "")
    with pytest.raises(InitramfsError):
        c.add_file("u", b"", uid=-1)
    with pytest.raises(InitramfsError, match="compression"):
        c.to_bytes("lz4")
