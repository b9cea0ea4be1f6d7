"""The snapshot file format and RAM file: round trips, and every damaged file refused with one line."""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from xenkvm.config import BootMode, GuestConfig, HypercallTrap, XenConfig
from xenkvm.machine.snapshot import ramfile
from xenkvm.machine.snapshot.format import (FORMAT_VERSION, MAGIC, Index, SnapshotError, canonical, read_state,
                                            write_state)
from xenkvm.config import config_from_json, config_to_json

PAGE = 4096


def _write(path, sections=None) -> None:
    index = Index(xenkvm="test", config_sha256="0" * 64, snapshot_id="ab" * 16, ram={"regions": []}, sections=[])
    write_state(str(path), index, sections or {"config": {"name": "g"}, "vcpus": [{"regs": "AAAA"}]})


def test_state_round_trip(tmp_path):
    p = tmp_path / "s"
    _write(p, {"a": {"x": 1, "blob": "AQID"}, "b": [1, 2, 3]})
    index, sections = read_state(str(p))
    assert sections == {"a": {"x": 1, "blob": "AQID"}, "b": [1, 2, 3]}
    assert [e["name"] for e in index.sections] == ["a", "b"] and index.snapshot_id == "ab" * 16
    assert not (tmp_path / "s.tmp").exists()


def _refused(path) -> str:
    with pytest.raises(SnapshotError) as e:
        read_state(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_foreign_file_refused(tmp_path):
    p = tmp_path / "s"
    p.write_bytes(b"\x7fELF" + b"\0" * 200)
    assert "not a xenkvm snapshot" in _refused(p)
    p.write_bytes(b"")
    assert "not a xenkvm snapshot" in _refused(p)


def test_every_truncation_refused(tmp_path):
    p = tmp_path / "s"
    _write(p)
    data = p.read_bytes()
    for n in range(0, len(data), max(1, len(data) // 97)):
        p.write_bytes(data[:n])
        msg = _refused(p)
        assert "truncated" in msg or "not a xenkvm snapshot" in msg, (n, msg)


def test_every_flipped_byte_refused(tmp_path):
    p = tmp_path / "s"
    _write(p)
    data = p.read_bytes()
    for i in range(len(MAGIC), len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x20
        p.write_bytes(bytes(damaged))
        with pytest.raises(SnapshotError) as e:   # corrupted, or (version/length bytes) truncated/newer
            read_state(str(p))
        assert "\n" not in str(e.value)


def test_newer_and_older_versions_refused(tmp_path):
    p = tmp_path / "s"
    _write(p)
    data = bytearray(p.read_bytes())
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    p.write_bytes(bytes(data))
    assert "newer than this xenkvm reads" in _refused(p)
    struct.pack_into("<I", data, 8, FORMAT_VERSION - 1)
    p.write_bytes(bytes(data))
    assert "older" in _refused(p)


def _region(pages_set: set[int], npages: int) -> mmap.mmap:
    mm = mmap.mmap(-1, npages * PAGE)
    for p in pages_set:
        mm[p * PAGE + 100] = 7
    return mm


def test_ram_file_writes_only_nonzero_pages_and_maps_back(tmp_path):
    npages = 1024
    used = {0, 1, 2, 500, 1023}
    mm = _region(used, npages)
    path = str(tmp_path / "ram")
    sid = b"i" * 16
    layout, written = ramfile.write_ram(path, sid, [("ram-low", 0, memoryview(mm), None)])
    assert written == len(used)
    st = os.stat(path)
    assert st.st_size == PAGE + npages * PAGE
    assert st.st_blocks * 512 <= (len(used) + 1) * PAGE + 64 * 1024   # holes (a little filesystem slack)
    fd = ramfile.open_ram(path, sid, layout)
    try:
        back = ramfile.map_region(fd, layout[0], prefault=False)
    finally:
        os.close(fd)
    assert back[:] == mm[:]
    back[5 * PAGE] = 9                       # copy-on-write: the file is unchanged
    assert open(path, "rb").read()[PAGE + 5 * PAGE] == 0


def test_nonzero_pages_sees_the_last_byte_of_a_page():
    mm = mmap.mmap(-1, 4 * PAGE)
    mm[3 * PAGE - 1] = 1
    assert list(ramfile.nonzero_pages(memoryview(mm))) == [2]
    assert list(ramfile.nonzero_pages(memoryview(np.zeros(8 * 512, np.uint64)))) == []


def test_ram_file_of_another_snapshot_or_truncated_refused(tmp_path):
    mm = _region({3}, 16)
    path = str(tmp_path / "ram")
    layout, _ = ramfile.write_ram(path, b"a" * 16, [("ram-low", 0, memoryview(mm), None)])
    with pytest.raises(SnapshotError, match="another snapshot"):
        ramfile.open_ram(path, b"b" * 16, layout)
    os.truncate(path, PAGE * 8)
    with pytest.raises(SnapshotError, match="truncated RAM file"):
        ramfile.open_ram(path, b"a" * 16, layout)
    open(path, "wb").write(b"junk")
    with pytest.raises(SnapshotError, match="not a xenkvm snapshot RAM file"):
        ramfile.open_ram(path, b"a" * 16, layout)


def test_prefault_maps_the_data_extents_and_reads_the_same(tmp_path):
    npages = 4096
    used = set(range(0, 20)) | {1000, 4095}
    mm = _region(used, npages)
    path = str(tmp_path / "ram")
    layout, _ = ramfile.write_ram(path, b"p" * 16, [("ram-low", 0, memoryview(mm), None)])
    fd = ramfile.open_ram(path, b"p" * 16, layout)
    try:
        extents = ramfile.data_extents(fd, layout[0].offset, layout[0].size)
        covered = {(o - layout[0].offset) // PAGE + i for o, n in extents for i in range(n // PAGE)}
        assert used <= covered and len(covered) < npages // 4     # data only, not the holes
        back = ramfile.map_region(fd, layout[0], prefault=True)
    finally:
        os.close(fd)
    assert back[:] == mm[:]


def test_guest_config_round_trips_with_its_xen_section():
    cfg = GuestConfig(name="g", kernel=Path("/k"), initrd=Path("/i"), cmdline="a b", memory=64 << 20, vcpus=2,
                      boot=BootMode.PVH, console="none",
                      xen=XenConfig(version=(4, 19), domid=3, hypercall_trap=HypercallTrap.PATCH, test_device=True,
                                    xenstore_socket="/tmp/s", platform_pci=False, hypervisor_log="none"))
    doc = config_to_json(cfg)
    assert config_from_json(doc) == cfg
    assert config_from_json(json.loads(canonical(doc))) == cfg
    plain = GuestConfig(name="p", kernel=Path("/k"))
    assert config_from_json(config_to_json(plain)) == plain


def test_guest_config_round_trips_with_its_devices_and_actions(tmp_path):
    from xenkvm.config import LifecycleAction
    from xenkvm.consolespec import parse_consoles
    from xenkvm.diskspec import parse_disks
    from xenkvm.vifspec import parse_vifs
    (tmp_path / "root.img").write_bytes(bytes(4096))
    cfg = GuestConfig(name="d", kernel=Path("/k"), xen=XenConfig(),
                      disks=parse_disks(["root.img,raw,xvda,ro"], tmp_path),
                      vifs=parse_vifs(["bridge=br0"], "d"),
                      consoles=parse_consoles([{"backend": "file", "path": "c1.log"}], tmp_path),
                      on_reboot=LifecycleAction.PRESERVE)
    assert cfg.disks and cfg.vifs and cfg.consoles
    assert config_from_json(json.loads(canonical(config_to_json(cfg)))) == cfg


def test_only_touched_pages_of_anonymous_memory_are_scanned(tmp_path):
    npages = 256
    mm = _region({3, 200}, npages)     # pages 3 and 200 written; the rest never touched
    addr = int(np.frombuffer(mm, np.uint8).ctypes.data)
    touched = ramfile.touched_pages(addr, npages)
    assert touched is not None and {3, 200} <= set(touched.tolist()) and len(touched) < npages // 2
    path = str(tmp_path / "ram")
    layout, written = ramfile.write_ram(path, b"t" * 16, [("ram-low", 0, memoryview(mm), addr)])
    assert written == 2
    fd = ramfile.open_ram(path, b"t" * 16, layout)
    try:
        assert ramfile.map_region(fd, layout[0], prefault=False)[:] == mm[:]
    finally:
        os.close(fd)
