"""YAML guest definitions: every mistake is one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from xenkvm.config import BootMode, ConfigError, load_config, parse_size


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    return k


def write(tmp_path, text: str):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return p


def test_valid_config_relative_paths(tmp_path, kernel):
    cfg = load_config(write(tmp_path, "kernel: k.elf\nmemory: 64M\nvcpus: 2\nboot: pvh\n"))
    assert cfg.kernel == kernel and cfg.memory == 64 << 20 and cfg.vcpus == 2
    assert cfg.boot is BootMode.PVH and cfg.name == "k"


def test_overrides_win(tmp_path, kernel):
    cfg = load_config(write(tmp_path, "kernel: k.elf\nvcpus: 1\n"), {"vcpus": 3, "cmdline": "x"})
    assert cfg.vcpus == 3 and cfg.cmdline == "x"


@pytest.mark.parametrize("value,expected", [("64M", 64 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20),
                                            (256, 256 << 20), ("2048K", 2 << 20)])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("text,needle", [
    ("kernel: k.elf\nmemroy: 64M\n", "unknown key 'memroy'"),
    ("memory: 64M\n", "'kernel' is required"),
    ("kernel: missing.elf\n", "no such file"),
    ("kernel: k.elf\nmemory: lots\n", "memory"),
    ("kernel: k.elf\nmemory: 1K\n", "too small"),
    ("kernel: k.elf\nmemory: 900T\n", "more than this host has"),
    ("kernel: k.elf\nvcpus: 0\n", "vcpus"),
    ("kernel: k.elf\nvcpus: 1000\n", "vcpus"),
    ("kernel: k.elf\nvcpus: true\n", "vcpus"),
    ("kernel: k.elf\nboot: bios\n", "boot"),
    ("kernel: k.elf\nconsole: tty9\n", "console"),
    ("kernel: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("kernel: k.elf\ncmdline: {a: 1}\n", "cmdline"),
])
def test_bad_configs(tmp_path, kernel, text, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text", ["kernel: k.elf\nvcpus: -1\n", "kernel: k.elf\nmemroy: 1\n", "kernel: nope\n"])
def test_cli_reports_one_line(tmp_path, kernel, text):
    p = write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "xenkvm", "run", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("xenkvm: ")


def test_cli_missing_yaml(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xenkvm", "run", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_xen_section(tmp_path, kernel):
    from xenkvm.config import HypercallTrap
    cfg = load_config(write(tmp_path, "kernel: k.elf\nxen:\n  version: '4.13'\n  hypercall_trap: breakpoint\n"
                                      "  xenstore_socket: /tmp/xs.sock\n"))
    assert cfg.xen.version == (4, 13) and cfg.xen.hypercall_trap is HypercallTrap.BREAKPOINT
    assert cfg.xen.xenstore_socket == "/tmp/xs.sock" and cfg.xen.domid == 1
    assert cfg.xen.hypervisor_log == "stderr" and cfg.xen.pv_time is True
    assert load_config(write(tmp_path, "kernel: k.elf\n")).xen is None
    assert load_config(write(tmp_path, "kernel: k.elf\nxen:\n  pv_time: false\n")).xen.pv_time is False


@pytest.mark.parametrize("value", ["stderr", "none", "file:/tmp/xen.log"])
def test_hypervisor_log_settings(tmp_path, kernel, value):
    cfg = load_config(write(tmp_path, f"kernel: k.elf\nxen:\n  hypervisor_log: '{value}'\n"))
    assert cfg.xen.hypervisor_log == value


def test_cli_hypervisor_log_is_checked_in_one_line(tmp_path, kernel):
    r = subprocess.run([sys.executable, "-m", "xenkvm", "run", "--kernel", str(kernel), "--hypervisor-log", "tty"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == \
        "xenkvm: xen.hypervisor_log: expected stderr, none or file:PATH, got 'tty'"


@pytest.mark.parametrize("xen,needle", [
    ("  version: four\n", "xen.version"), ("  domid: 0\n", "xen.domid"), ("  domid: 40000\n", "xen.domid"),
    ("  hypercall_trap: vmcall\n", "xen.hypercall_trap"), ("  colour: blue\n", "unknown key 'colour'"),
    ("  xenstore_socket: ''\n", "xen.xenstore_socket"), ("  test_device: 1\n", "xen.test_device"),
    ("  hypervisor_log: stdout\n", "xen.hypervisor_log"), ("  hypervisor_log: 'file:'\n", "xen.hypervisor_log"),
    ("  hypervisor_log: 2\n", "xen.hypervisor_log"), ("  pv_time: 'no'\n", "xen.pv_time"),
])
def test_bad_xen_sections(tmp_path, kernel, xen, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, "kernel: k.elf\nxen:\n" + xen))


def test_xen_console_without_xen_is_refused_before_start(tmp_path, kernel, monkeypatch):
    """console=hvc0 / earlyprintk=xen need the Xen ABI: without it the guest would print nothing."""
    from xenkvm import build, cli

    def no_machine(*a, **kw):
        raise AssertionError("the guest must not start")
    monkeypatch.setattr(build, "build_machine", no_machine)
    p = write(tmp_path, "kernel: k.elf\ncmdline: 'console=hvc0 earlyprintk=xen rdinit=/init'\n")
    assert cli.main(["run", str(p)]) == 2
    with pytest.raises(AssertionError, match="must not start"):
        cli.main(["run", str(p), "--xen"])
    with pytest.raises(AssertionError, match="must not start"):
        cli.main(["run", str(p), "--cmdline", "console=ttyS0"])


def test_xen_console_message_says_use_xen(tmp_path, kernel):
    p = write(tmp_path, "kernel: k.elf\ncmdline: 'console=hvc0'\n")
    r = subprocess.run([sys.executable, "-m", "xenkvm", "run", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--xen" in r.stderr
