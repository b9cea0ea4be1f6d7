"""The xl.cfg(5) disk spellings of ``disks:`` (xenkvm/diskspec.py) and their one-line errors."""
from __future__ import annotations

import pytest

from xenkvm.config import ConfigError, load_config
from xenkvm.diskspec import parse_disk, parse_disks, vdev_to_devid


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "root.img"
    p.write_bytes(bytes(1 << 20))
    return p


def test_key_value_form(img):
    d = parse_disk("format=raw, vdev=xvda, access=rw, target=root.img", img.parent)
    assert (d.target, d.vdev, d.devid, d.readonly, d.cdrom) == (img, "xvda", 51712, False, False)


def test_positional_forms(img):
    d = parse_disk("root.img,raw,xvdb,ro", img.parent)
    assert (d.target, d.devid, d.readonly) == (img, 51728, True)
    legacy = parse_disk(f"phy:{img},hda,w", img.parent)
    assert (legacy.target, legacy.devid, legacy.readonly) == (img, 768, False)


@pytest.mark.parametrize("fmt", ["qcow", "qcow2", "vhd", "vmdk", "qed", "vdi"])
def test_image_formats(img, fmt):
    """xl.cfg(5)'s format names (and QEMU's vmdk, vdi) in both spellings; served through qemu-storage-daemon."""
    assert parse_disk(f"format={fmt}, vdev=xvda, target=root.img", img.parent).format == fmt
    d = parse_disk(f"root.img,{fmt},xvdb,ro", img.parent)
    assert (d.format, d.devid, d.readonly) == (fmt, 51728, True)


def test_backing_files_only_when_asked(img):
    """``backing`` (ours, a bare word like ``discard``) opts a disk into its image's backing file; off by default."""
    assert not parse_disk("format=qcow2, vdev=xvda, target=root.img", img.parent).backing
    assert parse_disk("format=qcow2, vdev=xvda, backing, target=root.img", img.parent).backing
    assert parse_disk("root.img,qcow2,xvdb,ro,backing", img.parent).backing
    assert not parse_disk("format=qed, vdev=xvda, no-backing, target=root.img", img.parent).backing


def test_persistent_grants_offered_by_default_only_where_python_serves(img):
    """``persistent``/``no-persistent`` (ours): raw disks do not offer feature-persistent unless asked
    (their C path claims each page, the guest copies nothing), NBD-served formats do unless told not."""
    assert not parse_disk("format=raw, vdev=xvda, target=root.img", img.parent).persistent
    assert parse_disk("format=raw, vdev=xvda, persistent, target=root.img", img.parent).persistent
    assert parse_disk("root.img,raw,xvdb,ro,persistent", img.parent).persistent
    assert parse_disk("format=qcow2, vdev=xvda, target=root.img", img.parent).persistent
    assert not parse_disk("format=qcow2, vdev=xvda, no-persistent, target=root.img", img.parent).persistent


def test_target_last_may_hold_commas(tmp_path):
    p = tmp_path / "a,b.img"
    p.write_bytes(bytes(4096))
    assert parse_disk("vdev=xvdc, target=a,b.img", tmp_path).target == p


def test_cdrom_is_read_only(img):
    d = parse_disk("vdev=hdc, devtype=cdrom, target=root.img", img.parent)
    assert d.cdrom and d.readonly and d.devid == 22 << 8


@pytest.mark.parametrize("vdev,devid", [("xvda", 51712), ("xvdb", 51728), ("xvda1", 51713), ("xvdq", (1 << 28) | (16 << 8)),
                                        ("xvdaa", (1 << 28) | (26 << 8)), ("hdb", 832), ("hdd", 22 << 8 | 64),
                                        ("sda", 2048), ("sdb3", 2067), ("51712", 51712)])
def test_vdev_numbers(vdev, devid):
    assert vdev_to_devid(vdev) == devid


@pytest.mark.parametrize("spec,word", [
    ("vdev=xvda", "'target' is required"),
    ("target=root.img", "'vdev' is required"),
    ("vdev=xvda, colour=blue, target=root.img", "unknown key 'colour'"),
    ("vdev=xvda, format=qcow3, target=root.img", "format='qcow3'"),
    ("vdev=xvda, access=rx, target=root.img", "access='rx'"),
    ("vdev=xvda, devtype=tape, target=root.img", "devtype='tape'"),
    ("vdev=floppy0, target=root.img", "vdev='floppy0'"),
    ("vdev=xvda, target=missing.img", "missing.img"),
    ("vdev=xvda, vdev=xvdb, target=root.img", "'vdev' given twice"),
    ("root.img,raw,xvda,rw,extra", "too many positional"),
    ("vdev=xvda, backing, target=root.img", "format=raw has no backing file"),
    ("format=vhd, vdev=xvda, backing, target=root.img", "format=vhd has no backing file"),
    ("format=qcow2, vdev=xvda, backing, no-backing, target=root.img", "both 'backing' and 'no-backing'"),
    ("vdev=xvda, persistent, no-persistent, target=root.img", "both 'persistent' and 'no-persistent'"),
    ("", "expected a string"),
])
def test_bad_specs_name_the_key(img, spec, word):
    with pytest.raises(ConfigError) as e:
        parse_disk(spec, img.parent)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_duplicate_vdev(img):
    with pytest.raises(ConfigError, match="used twice"):
        parse_disks(["root.img,raw,xvda,rw", "vdev=xvda, target=root.img"], img.parent)


def test_yaml_disks(tmp_path, img):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    y = tmp_path / "g.yaml"
    y.write_text('kernel: k.elf\nxen: true\ndisks:\n  - "format=raw, vdev=xvda, access=rw, target=root.img"\n')
    cfg = load_config(y)
    assert [d.vdev for d in cfg.disks] == ["xvda"] and cfg.disks[0].target == img
    y.write_text('kernel: k.elf\ndisks: ["root.img,raw,xvda,rw"]\n')
    with pytest.raises(ConfigError, match="need the Xen personality"):
        load_config(y)
    y.write_text('kernel: k.elf\nxen: true\ndisks: "root.img"\n')
    with pytest.raises(ConfigError, match="expected a list"):
        load_config(y)
