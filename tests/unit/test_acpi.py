"""ACPI tables: layouts against the spec, checksums, contents, and iasl's opinion."""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from xenkvm.machine import acpi, layout
from xenkvm.machine.acpi import AcpiError, build_acpi

NEEDS_IASL = pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")


@pytest.fixture
def built(mem):
    return mem, build_acpi(mem, 4)


def _table(mem, tables, name) -> bytes:
    gpa, length = tables.tables[name]
    return mem.read(gpa, length)


def test_layout_sizes_match_the_spec():
    assert acpi.RSDP.size == 36 and acpi.SDT_HEADER.size == 36 and acpi.GAS.size == 12
    assert acpi.SDT_HEADER.size + acpi.FADT_BODY.size == 276           # FADT revision 6
    assert acpi.FACS.size == 64
    assert (acpi.MADT_LAPIC.size, acpi.MADT_IOAPIC.size, acpi.MADT_ISO.size) == (8, 12, 10)
    assert acpi.SDT_HEADER.size + acpi.MADT_BODY.size == 44


def test_rsdp(built):
    mem, t = built
    raw = _table(mem, t, "RSDP")
    assert t.rsdp_gpa == layout.ACPI_BASE and t.rsdp_gpa % 16 == 0
    assert 0xE0000 <= t.rsdp_gpa < 0x100000                           # legacy scan area
    sig, _, oem, rev, rsdt, length, xsdt, _ = acpi.RSDP.unpack(raw)
    assert (sig, oem, rev, length) == (b"RSD PTR ", b"XENKVM", 2, 36)
    assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
    assert xsdt == t.tables["XSDT"][0] and rsdt == t.tables["RSDT"][0]


def test_every_table_checksums_and_fits(built):
    mem, t = built
    for name, (gpa, length) in t.tables.items():
        assert layout.ACPI_BASE <= gpa and gpa + length <= layout.ACPI_BASE + layout.ACPI_SIZE
        if name in ("RSDP", "FACS"):
            continue
        raw = mem.read(gpa, length)
        sig, hdr_len, *_ = acpi.SDT_HEADER.unpack_from(raw)
        assert sig.decode() == name and hdr_len == length
        assert sum(raw) % 256 == 0, name
        assert raw[10:16] == b"XENKVM"


def test_xsdt_and_rsdt_point_at_fadt_and_madt(built):
    mem, t = built
    want = [t.tables["FACP"][0], t.tables["APIC"][0]]
    assert list(struct.unpack_from("<2Q", _table(mem, t, "XSDT"), 36)) == want
    assert list(struct.unpack_from("<2I", _table(mem, t, "RSDT"), 36)) == want


def _gas(raw: bytes, off: int) -> tuple:
    return acpi.GAS.unpack_from(raw, off)


def test_fadt_fields_at_spec_offsets(built):
    mem, t = built
    f = _table(mem, t, "FACP")
    assert len(f) == 276 and f[8] == 6
    u32 = lambda o: struct.unpack_from("<I", f, o)[0]  # noqa: E731
    assert u32(36) == t.tables["FACS"][0] and u32(40) == t.tables["DSDT"][0]
    assert struct.unpack_from("<H", f, 46)[0] == 9                    # SCI_INT
    assert u32(48) == 0                                              # no SMI_CMD
    assert (u32(56), u32(64), u32(76)) == (layout.PM1A_EVT, layout.PM1A_CNT, layout.PM_TMR)
    assert tuple(f[88:92]) == (4, 2, 0, 4)                             # PM1_EVT/CNT, PM2, PM_TMR lengths
    flags = u32(112)
    want = acpi.FadtFlags.WBINVD | acpi.FadtFlags.PROC_C1 | acpi.FadtFlags.SLP_BUTTON | acpi.FadtFlags.RESET_REG_SUP
    assert flags == want and not flags & (1 << 20)                     # not hardware-reduced
    assert _gas(f, 116) == (1, 8, 0, 1, layout.RESET_PORT) and f[128] == layout.RESET_VALUE
    assert struct.unpack_from("<QQ", f, 132) == (0, t.tables["DSDT"][0])
    assert _gas(f, 148)[:2] == (1, 32) and _gas(f, 148)[4] == layout.PM1A_EVT
    assert _gas(f, 172)[:2] == (1, 16) and _gas(f, 172)[4] == layout.PM1A_CNT
    assert _gas(f, 208)[:2] == (1, 32) and _gas(f, 208)[4] == layout.PM_TMR


def test_facs(built):
    mem, t = built
    gpa, _ = t.tables["FACS"]
    raw = _table(mem, t, "FACS")
    assert gpa % 64 == 0 and raw[:4] == b"FACS" and struct.unpack_from("<I", raw, 4)[0] == 64


def test_dsdt_is_the_s5_package_and_pci0(built):
    mem, t = built
    body = _table(mem, t, "DSDT")[36:]
    assert body[:14] == bytes.fromhex("08 5F53355F 12 08 04 0A05 0A05 00 00")
    assert body[14:] == acpi.pci0_aml()
    assert body[14:23] == bytes.fromhex("10 4C07 5F53425F 5B82")       # Scope (_SB_) { Device (


def test_aml_encodings():
    assert acpi.aml_pkg_length(0) == b"\x01" and acpi.aml_pkg_length(62) == b"\x3f"
    assert acpi.aml_pkg_length(63) == bytes.fromhex("4104")             # 65 = 0x41: nibble 1, then 4
    assert acpi.aml_pkg_length(5000) == bytes.fromhex("8b3801")
    assert acpi.aml_pkg_length((1 << 28) - 5) == bytes.fromhex("cfffffff")
    with pytest.raises(AcpiError):
        acpi.aml_pkg_length(1 << 28)
    assert [acpi.aml_integer(v) for v in (0, 1, 2, 0x100, 0x10000, 1 << 32)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x00\x01", b"\x0c\x00\x00\x01\x00", b"\x0e" + (1 << 32).to_bytes(8, "little")]
    assert acpi.aml_eisa_id("PNP0A03") == bytes.fromhex("0c 41d0 0a03")
    assert len(acpi.res_word_address(1, 3, 0, 0xCF7)) == 16 and len(acpi.res_dword_memory(0, 1)) == 26


def test_madt(built):
    mem, t = built
    m = _table(mem, t, "APIC")
    assert struct.unpack_from("<II", m, 36) == (layout.LAPIC_BASE, 1)
    entries, off = [], 44
    while off < len(m):
        etype, elen = m[off], m[off + 1]
        entries.append((etype, m[off:off + elen]))
        off += elen
    assert off == len(m)
    lapics = [acpi.MADT_LAPIC.unpack(e) for ty, e in entries if ty == 0]
    assert lapics == [(0, 8, i, i, 1) for i in range(4)]
    ioapics = [acpi.MADT_IOAPIC.unpack(e) for ty, e in entries if ty == 1]
    assert ioapics == [(1, 12, 4, layout.IOAPIC_BASE, 0)]
    isos = [acpi.MADT_ISO.unpack(e) for ty, e in entries if ty == 2]
    assert isos == [(2, 10, 0, 0, 2, 0), (2, 10, 0, 9, 9, 0b1101)]


@pytest.mark.parametrize("n", [0, 255, -1, 1.5])
def test_bad_vcpu_counts(mem, n):
    with pytest.raises(AcpiError):
        build_acpi(mem, n)


def test_max_vcpus_fit(mem):
    t = build_acpi(mem, acpi.MAX_VCPUS)
    assert t.tables["APIC"][1] == 44 + 8 * acpi.MAX_VCPUS + 12 + 20


@NEEDS_IASL
def test_iasl_decompiles_the_tables(built, tmp_path):
    mem, t = built
    for name in ("DSDT", "FACP", "APIC", "FACS", "XSDT", "RSDT"):
        dat = tmp_path / f"{name.lower()}.dat"
        dat.write_bytes(_table(mem, t, name))
        subprocess.run(["iasl", "-d", str(dat)], cwd=tmp_path, capture_output=True, check=True)
    dsdt = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in dsdt
    assert "Device (PCI0)" in dsdt and 'EisaId ("PNP0A03")' in dsdt
    assert "0xE0000000,         // Range Minimum" in dsdt and "0xFEAFFFFF,         // Range Maximum" in dsdt
    assert "0xD000,             // Range Minimum" in dsdt and "0xDFFF,             // Range Maximum" in dsdt
    fadt = (tmp_path / "facp.dsl").read_text()
    assert "PM1A Event Block Address : 00000600" in fadt
    assert "Reset Register Supported (V2) : 1" in fadt and "Hardware Reduced (V5) : 0" in fadt
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("[Processor Local APIC]") == 4 and "[I/O APIC]" in madt


@NEEDS_IASL
def test_hand_assembled_aml_matches_iasl(tmp_path):
    """Compile the same ASL with iasl; its AML body must equal ours byte for byte."""
    src = tmp_path / "s5.asl"
    src.write_text('DefinitionBlock ("", "DSDT", 2, "XENKVM", "XENKVM  ", 1)\n'
                   '{\n    Name (_S5, Package () { 5, 5, 0, 0 })\n}\n')
    subprocess.run(["iasl", "-p", str(tmp_path / "s5"), str(src)], cwd=tmp_path,
                   capture_output=True, check=True)
    aml = (tmp_path / "s5.aml").read_bytes()
    assert aml[36:] == acpi.S5_AML


@NEEDS_IASL
def test_pci0_aml_matches_iasl(tmp_path):
    """\\_SB.PCI0 written in ASL and compiled by iasl: the same bytes as pci0_aml()."""
    src = tmp_path / "pci.asl"
    src.write_text('''DefinitionBlock ("", "DSDT", 2, "XENKVM", "XENKVM  ", 1)
{
    Scope (\\_SB)
    {
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A03"))
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                    0x0000, 0x0000, 0x00FF, 0x0000, 0x0100)
                IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0xD000, 0xDFFF, 0x0000, 0x1000)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                    0x00000000, 0xE0000000, 0xFEAFFFFF, 0x00000000, 0x1EB00000)
            })
        }
    }
}
''')
    subprocess.run(["iasl", "-p", str(tmp_path / "pci"), str(src)], cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "pci.aml").read_bytes()[36:] == acpi.pci0_aml()
