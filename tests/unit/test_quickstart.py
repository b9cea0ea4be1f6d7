"""make run's launcher (xenkvm/quickstart.py) without booting: the plan it reads from the default
guest, the root disk copy, what it does without root, and its one-line errors.  The boot itself:
tests/linux/test_make_run.py (rig)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenkvm import quickstart
from xenkvm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_makefile_runs_the_launcher_on_the_default_guest():
    """tests/linux/test_make_run.py runs this exact command; the Makefile must too."""
    text = (ROOT / "Makefile").read_text()
    assert "GUEST ?= guests/debian-pvh.cfg" in text
    assert "$(PY) -m xenkvm.quickstart $(GUEST)" in text
    assert "$(VENV)/bin/xenkvm run $(GUEST)" in text          # YAML guests: the foreground fast path


def test_default_guest_plan():
    plan = quickstart.read_plan(quickstart.DEFAULT_GUEST)
    assert plan.name == "debian-pvh"
    assert plan.root_disk == ROOT / "build" / "run" / "debian-pvh-root.ext4"
    assert plan.bridges == ("xenkvm0",)
    assert (plan.guest_ip, plan.host_ip) == ("10.87.0.2/24", "10.87.0.1/24")


def test_default_guest_is_a_pvh_domain_that_restarts(tmp_path):
    """The default guest loads as xenkvm create loads it (disk pointed at a scratch file)."""
    from xenkvm import xlcfg
    from xenkvm.config import BootMode, LifecycleAction
    cache = ROOT / ".cache" / "linux"
    if not (cache / "vmlinuz").is_file() or not (cache / "initramfs-disk.cpio.gz").is_file():
        pytest.skip("make rootfs-image has not run")
    disk = tmp_path / "root.ext4"
    disk.write_bytes(bytes(4096))
    cfg = xlcfg.load(quickstart.DEFAULT_GUEST, settings=[f'disk=["vdev=xvda, access=rw, target={disk}"]'])
    assert cfg.boot is BootMode.PVH and cfg.xen is not None
    assert cfg.on_reboot is LifecycleAction.RESTART
    assert [v.bridge for v in cfg.vifs] == ["xenkvm0"]
    assert "console=hvc0" in cfg.cmdline and "xenkvm.ip=10.87.0.2/24" in cfg.cmdline
    assert " quiet" not in cfg.cmdline        # the progress display reads the kernel's log


def test_root_disk_is_a_sparse_copy_made_once(tmp_path):
    pristine = tmp_path / "pristine.ext4"
    with open(pristine, "wb") as f:
        f.write(b"head")
        f.truncate(64 << 20)
    target = tmp_path / "run" / "root.ext4"
    assert quickstart.make_root_disk(target, pristine)
    assert target.read_bytes() == pristine.read_bytes()
    assert os.stat(target).st_blocks * 512 < (1 << 20)          # holes kept
    target.write_bytes(b"the user's files")
    assert not quickstart.make_root_disk(target, pristine)       # never overwritten
    assert target.read_bytes() == b"the user's files"
    with pytest.raises(ConfigError, match="make rootfs-image"):
        quickstart.make_root_disk(tmp_path / "other.ext4", tmp_path / "missing.ext4")


def _plan(tmp_path, bridges=("xenkvm0",)):
    return quickstart.Plan(tmp_path / "g.cfg", "g", tmp_path / "root.ext4", bridges, "10.87.0.2/24", "10.87.0.1/24")


def test_without_root_the_vif_is_left_out_with_one_line(tmp_path, capsys):
    pristine = tmp_path / "pristine.ext4"
    pristine.write_bytes(b"x" * 4096)
    assert quickstart.prepare(_plan(tmp_path), pristine, is_root=False) == ["vif=[]"]
    out = capsys.readouterr().out.splitlines()
    assert len([ln for ln in out if "no network" in ln]) == 1 and "sudo make run" in out[-1]
    assert (tmp_path / "root.ext4").read_bytes() == pristine.read_bytes()
    assert quickstart.prepare(_plan(tmp_path, ()), pristine, is_root=False) == []


def test_an_interface_that_is_not_a_bridge_is_refused(tmp_path, monkeypatch):
    (tmp_path / "xenkvm0").mkdir()                               # a sysfs entry without bridge/
    calls = []
    monkeypatch.setattr(quickstart, "_ip", lambda *a: calls.append(a) or "")
    with pytest.raises(ConfigError, match="not a bridge"):
        quickstart.ensure_bridge("xenkvm0", "10.87.0.1/24", sysfs=tmp_path)
    assert calls == []


def test_bridge_created_addressed_and_up(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quickstart, "_ip", lambda *a: calls.append(a) or "")
    assert quickstart.ensure_bridge("xenkvm0", "10.87.0.1/24", sysfs=tmp_path)
    assert calls == [("link", "add", "xenkvm0", "type", "bridge"), ("-o", "addr", "show", "dev", "xenkvm0"),
                     ("addr", "add", "10.87.0.1/24", "dev", "xenkvm0"), ("link", "set", "xenkvm0", "up")]
    (tmp_path / "xenkvm0" / "bridge").mkdir(parents=True)        # there already, address too: only up
    calls.clear()
    monkeypatch.setattr(quickstart, "_ip", lambda *a: calls.append(a) or
                        "5: xenkvm0    inet 10.87.0.1/24 scope global xenkvm0\n")
    assert not quickstart.ensure_bridge("xenkvm0", "10.87.0.1/24", sysfs=tmp_path)
    assert calls == [("-o", "addr", "show", "dev", "xenkvm0"), ("link", "set", "xenkvm0", "up")]


@pytest.mark.parametrize("text, message", [
    (None, "No such file"),
    ('type = "pvh"\n', "name: required"),
    ('name = "x"\nvif = [ "bridge=bad/name" ]\n', "bridge"),
])
def test_mistakes_are_one_line_and_status_2(tmp_path, capsys, text, message):
    cfg = tmp_path / "g.cfg"
    if text is not None:
        cfg.write_text(text)
    assert quickstart.main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


def test_a_missing_host_tool_is_one_line(monkeypatch):
    """No `ip` (iproute2) on the host: a ConfigError naming the package, not a FileNotFoundError."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"^ip: not installed .*iproute2"):
        quickstart._ip("link", "show")
