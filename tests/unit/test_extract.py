"""vmlinux extraction from a bzImage payload, for every compression Linux builds."""
from __future__ import annotations

import bz2
import gzip
import lzma
import pathlib
import shutil
import struct
import subprocess

import lz4.block
import pytest
import zstandard

from xenkvm.machine.boot import BootError
from xenkvm.machine.boot.bzimage import parse_setup_header
from xenkvm.machine.boot.elf import XenElfNote, parse_elf
from xenkvm.machine.boot.extract import (Compression, decompress_payload, detect_compression,
                                         extract_vmlinux)

MiB = 1 << 20
LZ4_MAGIC = struct.pack("<I", 0x184C2102)


def lz4_legacy(data: bytes, chunk: int = 8 * MiB) -> bytes:
    """The LZ4 legacy frame as `lz4 -l` writes it: magic, then (size, block) pairs."""
    out = bytearray(LZ4_MAGIC)
    for i in range(0, len(data), chunk):
        block = lz4.block.compress(data[i:i + chunk], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, 9, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "zstd": lambda d: zstandard.ZstdCompressor(level=19).compress(d),
    "lz4": lz4_legacy,
    "none": lambda d: d,
}


@pytest.fixture
def vmlinux(build_elf):
    return build_elf([(16 * MiB, bytes(range(256)) * 64, 0x8000)], entry=16 * MiB,
                     notes=[(b"Xen", 18, (16 * MiB).to_bytes(4, "little")), (b"Xen", 6, b"linux\0")])


def size_append(data: bytes, raw_len: int) -> bytes:
    """What Linux's build appends after the compressed kernel: its size, LE u32."""
    return data + struct.pack("<I", raw_len)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_extract_each_compression(build_bzimage, vmlinux, kind):
    payload = COMPRESSORS[kind](vmlinux)
    if kind != "none":
        payload = size_append(payload, len(vmlinux))
    image = build_bzimage(payload)
    out = extract_vmlinux(image)
    assert out == vmlinux
    assert parse_elf(out).pvh_entry == 16 * MiB


TOOLS = {
    "gzip": ["gzip", "-n", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "zstd": ["zstd", "-19", "-q", "-c"],
    "lz4": ["lz4", "-l", "-9", "-q", "-c"],
}


@pytest.mark.parametrize("kind", sorted(TOOLS))
def test_extract_from_system_tool_output(build_bzimage, vmlinux, kind):
    """The command-line tools Linux's build uses (same flags where it matters)."""
    if shutil.which(TOOLS[kind][0]) is None:
        pytest.skip(f"{TOOLS[kind][0]} not installed")
    packed = subprocess.run(TOOLS[kind], input=vmlinux, capture_output=True, check=True).stdout
    assert extract_vmlinux(build_bzimage(size_append(packed, len(vmlinux)))) == vmlinux


def test_lz4_multiple_blocks_and_frames(vmlinux):
    big = vmlinux + bytes(9 * MiB) + b"tail"
    stream = lz4_legacy(big)
    assert decompress_payload(stream) == big
    # two concatenated legacy frames, then Linux's appended size
    half = len(big) // 2
    two = lz4_legacy(big[:half], chunk=1 * MiB) + lz4_legacy(big[half:], chunk=1 * MiB)
    assert decompress_payload(size_append(two, len(big))) == big
    # padding shorter than a size word, and a zero size word, end the stream too
    assert decompress_payload(stream + b"\0\0") == big
    assert decompress_payload(stream + bytes(8)) == big


def test_detect_compression():
    assert detect_compression(b"\x1f\x8b\x08") is Compression.GZIP
    assert detect_compression(b"\xfd7zXZ\x00..") is Compression.XZ
    assert detect_compression(LZ4_MAGIC) is Compression.LZ4
    with pytest.raises(BootError, match="unknown"):
        detect_compression(b"\x00\x01\x02\x03")


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "zstd"])
def test_truncated_payload(vmlinux, kind):
    packed = COMPRESSORS[kind](vmlinux + bytes(range(256)) * 512)
    with pytest.raises(BootError):
        decompress_payload(packed[:len(packed) // 2])


def test_corrupt_lz4(vmlinux):
    stream = bytearray(lz4_legacy(vmlinux))
    with pytest.raises(BootError, match="past the payload"):
        decompress_payload(bytes(stream[:-10]) + b"\0" * 4)
    stream[4:8] = struct.pack("<I", 0x7FFF_FFFF)
    with pytest.raises(BootError, match="past the payload"):
        decompress_payload(bytes(stream))
    bad = LZ4_MAGIC + struct.pack("<I", 8) + b"\xff" * 8 + b"\0\0\0\0"
    with pytest.raises(BootError, match="LZ4"):
        decompress_payload(bad)


@pytest.mark.parametrize("kind", sorted(k for k in COMPRESSORS if k != "none"))
def test_decompression_bomb_capped(vmlinux, kind):
    packed = COMPRESSORS[kind](vmlinux + bytes(4 * MiB))
    with pytest.raises(BootError, match="exceeds"):
        decompress_payload(packed, max_size=1 * MiB)


def test_payload_that_is_not_elf(build_bzimage):
    with pytest.raises(BootError, match="ELF"):
        extract_vmlinux(build_bzimage(gzip.compress(b"MZ not an elf")))


def test_no_payload(build_bzimage):
    with pytest.raises(BootError, match="no payload"):
        extract_vmlinux(build_bzimage(b""))


REAL_KERNEL = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "linux" / "vmlinuz"


@pytest.mark.skipif(not REAL_KERNEL.is_file(), reason="no downloaded kernel in .cache/linux")
def test_real_debian_kernel():
    """The kernel `make` downloads for the Linux boot tests: payload -> vmlinux -> PVH entry."""
    image = REAL_KERNEL.read_bytes()
    hdr = parse_setup_header(image)
    assert hdr.version >= 0x020C and hdr.relocatable
    elf = parse_elf(extract_vmlinux(image))
    assert elf.pvh_entry is not None and elf.lowest_paddr <= elf.pvh_entry < elf.end_paddr
    assert elf.xen_notes[XenElfNote.GUEST_OS] == "linux"
