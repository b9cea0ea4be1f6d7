"""xl.cfg(5) files into GuestConfig: the grammar, the key mapping, one-line errors, hostile input."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from xenkvm import xlcfg
from xenkvm.config import BootMode, ConfigError, LifecycleAction

KERNEL = Path(__file__).resolve().parents[2] / "guests" / "out" / "xen_shutdown.elf"


def write(tmp_path: Path, text: str, name: str = "dom.cfg") -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"\x7fELF")
    for img in ("web01.img", "data.img"):     # the PVH example's disks (relative to the file)
        (tmp_path / img).write_bytes(bytes(4096))
    p = tmp_path / name
    p.write_text(text)
    return p


# A PVH domU as the man page describes one: comments, both quote styles, a list over
# several lines with a trailing comma, hex numbers, ';' between two settings.
PVH = """\
# /etc/xen/web01.cfg
name    = "web01"
type    = "pvh"
kernel  = "vmlinuz"          # relative to this file
root    = '/dev/xvda1 ro'
extra   = "console=hvc0 earlyprintk=xen"
memory  = 512; maxmem = 0x400
vcpus   = 2
maxvcpus = 4
uuid    = "6F1C0A2E-8D5B-4C3E-9A7F-0B1C2D3E4F50"
on_poweroff = "destroy"
on_reboot   = "restart"
on_crash    = 'preserve'
disk = [ 'format=raw, vdev=xvda, access=rw, target=web01.img',
         'data.img,raw,xvdb,ro',
       ]
vif  = [ "mac=00:16:3e:01:02:03,bridge=xenbr0", ]
"""


def test_pvh_domain(tmp_path):
    cfg = xlcfg.load(write(tmp_path, PVH))
    assert cfg.name == "web01" and cfg.boot is BootMode.PVH and cfg.xen is not None
    assert cfg.kernel == tmp_path / "vmlinuz"
    assert cfg.cmdline == "root=/dev/xvda1 ro console=hvc0 earlyprintk=xen"
    assert (cfg.memory, cfg.maxmem, cfg.vcpus, cfg.maxvcpus) == (512 << 20, 1024 << 20, 2, 4)
    assert cfg.uuid == "6f1c0a2e-8d5b-4c3e-9a7f-0b1c2d3e4f50"
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == (
        LifecycleAction.DESTROY, LifecycleAction.RESTART, LifecycleAction.PRESERVE)
    assert [(d.target, d.vdev, d.readonly) for d in cfg.disks] == [
        (tmp_path / "web01.img", "xvda", False), (tmp_path / "data.img", "xvdb", True)]
    assert [(v.mac, v.bridge) for v in cfg.vifs] == [("00:16:3e:01:02:03", "xenbr0")]


def test_hvm_gets_linux_boot_and_platform_pci(tmp_path):
    cfg = xlcfg.load(write(tmp_path, 'builder = "hvm"\nkernel = "vmlinuz"\ncmdline = "console=ttyS0"\n'))
    assert cfg.boot is BootMode.LINUX and cfg.xen.platform_pci and cfg.cmdline == "console=ttyS0"


def test_cmdline_wins_over_root_and_extra(tmp_path):
    cfg = xlcfg.load(write(tmp_path, 'type="pvh"\nkernel="vmlinuz"\ncmdline="a=1"\nroot="/dev/x"\nextra="b"\n'))
    assert cfg.cmdline == "a=1"


def test_grammar_details():
    got = xlcfg.parse('a = "tab\\there \\"q\\" \\x41\\101"\nb = 0x10\nc = []\nd = [1, "x",\n\n 2,]\n'
                      'd += ["y"]\ne = \'no \\n escape\'\n')
    assert got == {"a": 'tab\there "q" AA', "b": 16, "c": [], "d": [1, "x", 2, "y"], "e": "no \\n escape"}


def test_later_setting_replaces():
    assert xlcfg.parse("memory = 1\nmemory = 2\n") == {"memory": 2}


def test_ignored_keys_logged_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "xenkvm.xlcfg")
    xlcfg.load(write(tmp_path, 'type="pvh"\nkernel="vmlinuz"\nvnc=1\nserial="pty"\nmemroy=3\n'))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["xl.cfg keys ignored (no meaning under xenkvm yet): serial, vnc",
                     "not xl.cfg(5) keys, ignored: memroy"]


@pytest.mark.parametrize("text, key", [
    ('type = "pv"\nkernel="vmlinuz"\n', "type"),
    ('type = "hvmx"\nkernel="vmlinuz"\n', "type"),
    ('type="pvh"\nkernel="vmlinuz"\nmemory = "lots"\n', "memory"),
    ('type="pvh"\nkernel="vmlinuz"\nmemory = 1\n', "memory"),
    ('type="pvh"\nkernel="vmlinuz"\nmemory = 64\nmaxmem = 32\n', "maxmem"),
    ('type="pvh"\nkernel="vmlinuz"\nvcpus = "two"\n', "vcpus"),
    ('type="pvh"\nkernel="vmlinuz"\nvcpus = 2\nmaxvcpus = 1\n', "maxvcpus"),
    ('type="pvh"\nkernel="vmlinuz"\non_reboot = "rename-restart"\n', "on_reboot"),
    ('type="pvh"\nkernel="vmlinuz"\non_crash = 3\n', "on_crash"),
    ('type="pvh"\nkernel="vmlinuz"\nuuid = "not-a-uuid"\n', "uuid"),
    ('type="pvh"\nkernel="vmlinuz"\ndisk = [1, 2]\n', "disk"),
    ('type="pvh"\nkernel="vmlinuz"\nname = ["a"]\n', "name"),
    ('type="pvh"\nkernel="missing"\n', "kernel"),
    ('type="pvh"\n', "kernel"),
])
def test_invalid_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        xlcfg.load(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and f"{key}:" in msg


@pytest.mark.parametrize("text", [
    "memory = [[1]]\n",            # lists do not nest
    "memory = \"open\n",           # unterminated string
    "disk = ['a',\n 'b'\n",        # unterminated list
    "memory 64\n",                 # no '='
    "= 3\n",
    "a = 1 2\n",
    "a = \"\\q\"\n",               # unknown escape
    "a = @\n",
    "a = [1; 2]\n",
])
def test_syntax_errors_are_one_line(text):
    with pytest.raises(ConfigError) as e:
        xlcfg.parse(text)
    assert "\n" not in str(e.value) and str(e.value).startswith("line ")


def test_hostile_files(tmp_path):
    huge = tmp_path / "huge.cfg"
    huge.write_bytes(b"# x\n" * (xlcfg.MAX_FILE // 4 + 1))
    binary = tmp_path / "bin.cfg"
    binary.write_bytes(b"name = \"a\"\n\x00\xff\xfe")
    latin = tmp_path / "latin.cfg"
    latin.write_bytes(b"name = \"\xe9\"\n")
    deep = tmp_path / "deep.cfg"
    deep.write_text("a = " + "[" * 100000 + "]" * 100000 + "\n")
    many = tmp_path / "many.cfg"
    many.write_text("a = [" + "1," * (xlcfg.MAX_LIST + 1) + "]\n")
    for p in (huge, binary, latin, deep, many):
        with pytest.raises(ConfigError) as e:
            xlcfg.read(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_to_yaml_round_trips(tmp_path):
    from xenkvm.config import load_config
    cfg_path = write(tmp_path, PVH)
    yaml_path = tmp_path / "web01.yaml"
    yaml_path.write_text(xlcfg.to_yaml(xlcfg.read(cfg_path)))
    assert load_config(yaml_path) == xlcfg.load(cfg_path)


def test_is_xl(tmp_path):
    assert xlcfg.is_xl(write(tmp_path, PVH, "web01"))
    assert not xlcfg.is_xl(write(tmp_path, "name: a\nkernel: x\n", "guest"))
    assert xlcfg.is_xl(tmp_path / "x.cfg") and not xlcfg.is_xl(tmp_path / "x.yaml")


# -- xl create's trailing KEY=VALUE settings (xenkvm create FILE KEY=VALUE..., make run's vif=[]) --
def test_settings_replace_and_append(tmp_path):
    p = write(tmp_path, PVH)
    cfg = xlcfg.load(p, settings=["vif=[]", 'extra+=" quiet"', "memory = 128"])
    assert cfg.vifs == ()
    assert cfg.memory == 128 << 20
    assert cfg.cmdline.endswith(" quiet")
    plain = xlcfg.load(p)
    assert plain.vifs and plain.memory == 512 << 20 and not plain.cmdline.endswith(" quiet")


@pytest.mark.parametrize("setting", ["vif", "=[]", "vif=[", "no such thing", "a=1\nb=2", "memory='x'+3"])
def test_bad_settings_are_one_line_naming_them(tmp_path, setting):
    p = write(tmp_path, PVH)
    with pytest.raises(ConfigError) as e:
        xlcfg.load(p, settings=[setting])
    assert repr(setting) in str(e.value) and "\n" not in str(e.value)


def test_settings_are_for_xl_files_only(tmp_path):
    from xenkvm.toolstack.commands import load_guest
    y = tmp_path / "g.yaml"
    y.write_text("name: g\nkernel: vmlinuz\n")
    (tmp_path / "vmlinuz").write_bytes(b"\x7fELF")
    with pytest.raises(ConfigError, match="xl.cfg files only"):
        load_guest(str(y), ["vif=[]"])


def test_vmm_gets_the_settings():
    from xenkvm.cli import _vmm_args
    ns = _vmm_args(["-v", "_vmm", "/run/d", "/g/dom.cfg", "vif=[]", "memory=64"])
    assert (ns.dir, ns.config, ns.settings) == ("/run/d", "/g/dom.cfg", ["vif=[]", "memory=64"])
    assert _vmm_args(["_vmm", "/run/d", "/g/dom.cfg"]).settings == []
    assert _vmm_args(["_vmm", "/run/d", "--restore", "/s"]).restore == "/s"
    assert _vmm_args(["_vmm", "/run/d", "--restore", "/s"]).disk_copy is None
    assert _vmm_args(["_vmm", "/run/d", "--restore", "/s", "--disk-copy", "/c"]).disk_copy == "/c"
