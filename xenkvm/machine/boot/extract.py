"""Extract the ELF ``vmlinux`` from a bzImage (to boot it as PVH, or to inspect it).

The boot protocol (2.08+) says where the compressed kernel is: ``payload_offset``
and ``payload_length`` inside the protected-mode part.  Linux's build appends
the uncompressed size (4 bytes, little-endian) after most formats, so every
decompressor here stops at the end of its first stream and ignores what follows.
Output is capped (``max_size``) so a hostile image cannot exhaust memory.
"""
from __future__ import annotations

import bz2
import io
import logging
import lzma
import struct
import zlib
from enum import Enum
from typing import Callable

from xenkvm.machine.boot import BootError
from xenkvm.machine.boot.bzimage import parse_setup_header, protected_mode_kernel
from xenkvm.machine.boot.elf import ELF_MAGIC

log = logging.getLogger(__name__)

#: No kernel is this big uncompressed; a larger output is a decompression bomb.
DEFAULT_MAX_SIZE = 1 << 30
#: LZ4 legacy frame: each block decompresses to at most 8 MiB.
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
_U32 = struct.Struct("<I")


class Compression(Enum):
    """Payload formats Linux can build, keyed by their leading magic bytes."""

    GZIP = b"\x1f\x8b"
    XZ = b"\xfd7zXZ\x00"
    LZMA = b"\x5d\x00\x00"
    BZIP2 = b"BZh"
    ZSTD = b"\x28\xb5\x2f\xfd"
    LZ4 = _U32.pack(LZ4_LEGACY_MAGIC)
    NONE = ELF_MAGIC


def detect_compression(payload: bytes | memoryview) -> Compression:
    """The payload's format, from its magic bytes."""
    head = bytes(payload[:8])
    for kind in Compression:
        if head.startswith(kind.value):
            return kind
    raise BootError(f"unknown kernel payload compression (magic {head[:6].hex()})")


def _too_big(max_size: int) -> BootError:
    return BootError(f"decompressed kernel exceeds {max_size:#x} bytes")


def _stream(decomp, data: bytes, max_size: int) -> bytes:
    """Run a zlib/lzma/bz2-style decompressor to the end of its first stream."""
    try:
        out = decomp.decompress(data, max_size + 1)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise BootError(f"corrupt kernel payload: {exc}") from exc
    if len(out) > max_size:
        raise _too_big(max_size)
    if not decomp.eof:
        raise BootError("kernel payload is truncated")
    return out


def _gunzip(data: bytes, max_size: int) -> bytes:
    return _stream(zlib.decompressobj(wbits=31), data, max_size)


def _unxz(data: bytes, max_size: int) -> bytes:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data, max_size)


def _unlzma(data: bytes, max_size: int) -> bytes:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data, max_size)


def _bunzip2(data: bytes, max_size: int) -> bytes:
    return _stream(bz2.BZ2Decompressor(), data, max_size)


def _unzstd(data: bytes, max_size: int) -> bytes:
    """Decompress the first zstd frame.

    A bounded ``stream_reader`` pass measures the output first (zstd has no
    ``max_length``); only then does ``decompressobj`` decode it again, which
    also tells whether the frame was complete.
    """
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
        if len(reader.read(max_size + 1)) > max_size:
            raise _too_big(max_size)
        decomp = zstandard.ZstdDecompressor().decompressobj()
        out = decomp.decompress(data)
    except zstandard.ZstdError as exc:
        raise BootError(f"corrupt zstd kernel payload: {exc}") from exc
    if not decomp.eof:
        raise BootError("zstd kernel payload is truncated")
    return out


def _unlz4(data: bytes, max_size: int) -> bytes:
    """Decode the LZ4 legacy frame format: magic, then (LE u32 size, block) pairs.

    The stream ends at the end of input, at a zero size, or at a final 4-byte
    word (Linux appends the uncompressed size); a repeated magic starts another
    frame, as Linux's own decompressor accepts.
    """
    import lz4.block

    out, off = bytearray(), 4
    while len(data) - off >= 4:
        (size,) = _U32.unpack_from(data, off)
        off += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size == 0 or off == len(data):
            break
        if size > len(data) - off:
            raise BootError(f"LZ4 block of {size:#x} bytes at {off - 4:#x} runs past the payload")
        out += _lz4_block(lz4.block, data[off:off + size])
        off += size
        if len(out) > max_size:
            raise _too_big(max_size)
    return bytes(out)


def _lz4_block(block_mod, chunk: bytes) -> bytes:
    try:
        return block_mod.decompress(chunk, uncompressed_size=LZ4_LEGACY_BLOCK)
    except block_mod.LZ4BlockError as exc:
        raise BootError(f"corrupt LZ4 kernel block: {exc}") from exc


def _plain(data: bytes, max_size: int) -> bytes:
    if len(data) > max_size:
        raise _too_big(max_size)
    return data


_DECOMPRESSORS: dict[Compression, Callable[[bytes, int], bytes]] = {
    Compression.GZIP: _gunzip, Compression.XZ: _unxz, Compression.LZMA: _unlzma,
    Compression.BZIP2: _bunzip2, Compression.ZSTD: _unzstd, Compression.LZ4: _unlz4,
    Compression.NONE: _plain,
}


def decompress_payload(payload: bytes | memoryview, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Decompress a kernel payload of any supported format; the result must be an ELF file."""
    kind = detect_compression(payload)
    out = _DECOMPRESSORS[kind](bytes(payload), max_size)
    if not out.startswith(ELF_MAGIC):
        raise BootError(f"{kind.name} payload does not decompress to an ELF file")
    log.info("extracted %s kernel payload: %#x -> %#x bytes", kind.name, len(payload), len(out))
    return out


def payload(image: bytes | bytearray | memoryview) -> memoryview:
    """The compressed payload of a bzImage (validated against the image)."""
    hdr = parse_setup_header(image)
    if hdr.payload_length == 0:
        raise BootError("bzImage has no payload (payload_length is 0)")
    pm = protected_mode_kernel(image, hdr)
    return pm[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]


def extract_vmlinux(image: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """The ELF vmlinux inside a bzImage."""
    return decompress_payload(payload(image), max_size)
