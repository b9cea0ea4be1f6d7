"""The xl.cfg(5) vif spellings of ``vifs:`` (xenkvm/vifspec.py) and their one-line errors."""
from __future__ import annotations

import pytest

from xenkvm.config import ConfigError, load_config
from xenkvm.vifspec import generated_mac, parse_vif, parse_vifs


def test_keys():
    v = parse_vif("mac=00:16:3E:01:02:03, bridge=br0, vifname=web0, ip=10.0.0.2, script=vif-bridge", 0, "d")
    assert (v.mac, v.bridge, v.vifname, v.ip, v.devid) == ("00:16:3e:01:02:03", "br0", "web0", "10.0.0.2", 0)


def test_generated_mac_is_xen_prefix_and_stable():
    a, b = parse_vifs(["", "bridge=br0"], "web")
    assert a.mac.startswith("00:16:3e:") and b.mac.startswith("00:16:3e:") and a.mac != b.mac
    assert int(a.mac.split(":")[3], 16) < 0x80                     # libxl clears the top bit
    assert parse_vifs(["", ""], "web")[0].mac == a.mac == generated_mac("web", 0)   # a reboot keeps it
    assert generated_mac("other", 0) != a.mac


@pytest.mark.parametrize("spec,needle", [
    ("mac=00:16:3e:01:02", "mac="), ("mac=01:16:3e:01:02:03", "multicast"), ("macc=00:16:3e:01:02:03", "'macc'"),
    ("vifname=a/b", "vifname="), ("vifname=abcdefghijklmnop", "vifname="), ("bridge=br 0", "bridge="),
    ("type=tap", "type="), ("offload=no", "offload="), ("txcoalesce=-1", "txcoalesce="), ("txcoalesce=100001", "0 to 100000"),
    ("txcoalesce=1ms", "microseconds"), ("bridge", "key=value"), ("bridge=a, bridge=b", "twice"), (42, "expected a string"),
])
def test_bad_specs_name_the_key(spec, needle):
    with pytest.raises(ConfigError) as e:
        parse_vif(spec, 0, "d")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_offload_key():
    assert parse_vif("", 0, "d").offload and parse_vif("offload=on", 0, "d").offload
    assert not parse_vif("offload=off, bridge=br0", 0, "d").offload


def test_txcoalesce_key():
    assert parse_vif("", 0, "d").tx_coalesce_us == 0
    assert parse_vif("txcoalesce=250, bridge=br0", 0, "d").tx_coalesce_us == 250


def test_duplicates_and_list():
    with pytest.raises(ConfigError, match="mac '00:16:3e:01:02:03' used twice"):
        parse_vifs(["mac=00:16:3e:01:02:03", "mac=00:16:3e:01:02:03"], "d")
    with pytest.raises(ConfigError, match="vifname 'x0' used twice"):
        parse_vifs(["vifname=x0", "vifname=x0"], "d")
    with pytest.raises(ConfigError, match="expected a list"):
        parse_vifs("bridge=br0", "d")


def test_guest_definition(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    y = tmp_path / "g.yaml"
    y.write_text(f"name: web\nkernel: {k}\nxen: {{domid: 3}}\nvifs: ['bridge=br0', 'vifname=v1']\n")
    cfg = load_config(y)
    assert [v.devid for v in cfg.vifs] == [0, 1] and cfg.vifs[0].mac == generated_mac("web", 0)
    y.write_text(f"kernel: {k}\nvifs: ['bridge=br0']\n")
    with pytest.raises(ConfigError, match="need the Xen personality"):
        load_config(y)
