"""Streaming compression of OS images into target files, hashing both sides on the way.

zstd images are written in the zstd *seekable format* (pyzstd's `SeekableZstdFile`):
one independent frame per chunk, then a seek table in a skippable frame, so `zstd -d`
and any zstd stream reader (the node's `core.decompress`) still decompress the file
whole, and a node can fetch and decompress any frame on its own. Chunks are cut by
content (FastCDC, `pyfastcdc`, 16/64/256 KiB min/average/max): a file added to an ext4
image shifts the blocks allocated after it, and content-defined cuts find the shifted
content again where fixed blocks do not (docs/delta.md has the measurements). Their
chunk index (`core.chunkindex`) comes from the same pass.

The compressions and their file suffixes are the release schema's
(`core.release.COMPRESSIONS`); reading a target back is the node's decoder
(`core.decompress`), which `sign-release verify` uses too.

Invariant: an image is read once, in fixed-size chunks, and never held in memory
whole (images are GiB); the raw length/sha256 (what lands on the partition) and the
stored length/sha256 (what TUF signs) come from that same single pass.
"""

from __future__ import annotations

import hashlib
import lzma
import zlib
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol, cast

import pyzstd
from pyfastcdc.cy import FastCDC

from core import chunkindex
from signing.failpoints import failpoint

CHUNK = 1024 * 1024
# One zstd frame (and one chunk of the index) per content-defined chunk of the raw
# image: FastCDC with these sizes, measured against fixed 64/128/256 KiB blocks and other
# averages in docs/delta.md. Changing them changes every chunk: no delta across it.
CDC_MIN, CDC_AVG, CDC_MAX = 16 * 1024, 64 * 1024, 256 * 1024
ZSTD_LEVEL = 6


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(kind: str, raw_size: int) -> _Compressor:
    if kind == "xz":
        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    if kind == "gzip":
        # wbits=31: gzip framing; zlib writes mtime 0, so output is reproducible.
        return zlib.compressobj(6, zlib.DEFLATED, 31)
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


@dataclass(frozen=True)
class StoredImage:
    """Lengths and hashes of one image: raw (uncompressed) and stored (as served)."""

    raw_length: int
    raw_sha256: str
    length: int
    sha256: str
    index: bytes | None = None  # the chunk index (`core.chunkindex`) of a seekable image


class _Counting:
    """The write side of a target file that counts and hashes what passes through it
    (where each frame starts is the count before it)."""

    def __init__(self, dst: IO[bytes]) -> None:
        self._dst = dst
        self.length = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self._dst.write(data)
        self.hash.update(data)
        self.length += len(data)
        return len(data)

    def flush(self) -> None:
        self._dst.flush()

    def writable(self) -> bool:
        return True


def compress_seekable(src: IO[bytes], dst: IO[bytes]) -> StoredImage:
    """Compress `src` into `dst` as seekable zstd, one frame per FastCDC chunk; the
    lengths and hashes of both sides and the chunk index."""
    out = _Counting(dst)
    raw_hash = hashlib.sha256()
    chunks: list[tuple[int, int, int, bytes]] = []
    options: dict[int, int] = {pyzstd.CParameter.compressionLevel: ZSTD_LEVEL}
    # A write-only file object is all pyzstd writes to (its stubs say BinaryIO).
    sink = cast(BinaryIO, out)
    cutter = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
    with pyzstd.SeekableZstdFile(sink, "wb", level_or_option=options) as zf:
        for cut in cutter.cut_stream(src):
            chunk = bytes(cut.data)  # the cutter reuses its buffer for the next chunk
            raw_hash.update(chunk)
            start = out.length
            zf.write(chunk)
            zf.flush(zf.FLUSH_FRAME)
            chunks.append((len(chunk), start, out.length - start, hashlib.sha256(chunk).digest()))
            if len(chunks) % 16 == 0:
                failpoint("add-compressing")
    raw_length = sum(c[0] for c in chunks)
    index = chunkindex.build(raw_length, raw_hash.hexdigest(), chunks) if chunks else None
    return StoredImage(raw_length, raw_hash.hexdigest(), out.length, out.hash.hexdigest(), index)


def compress_stream(src: IO[bytes], dst: IO[bytes], kind: str, raw_size: int) -> StoredImage:
    """Compress `src` into `dst` with `kind`, returning lengths and hashes of both sides
    (and, for zstd, the chunk index of its seekable frames)."""
    if kind == "zstd":
        return compress_seekable(src, dst)
    comp = _compressor(kind, raw_size)
    raw_hash, out_hash = hashlib.sha256(), hashlib.sha256()
    raw_len = out_len = 0

    def emit(data: bytes) -> None:
        nonlocal out_len
        if data:
            dst.write(data)
            out_hash.update(data)
            out_len += len(data)

    while chunk := src.read(CHUNK):
        raw_hash.update(chunk)
        raw_len += len(chunk)
        emit(comp.compress(chunk))
        failpoint("add-compressing")
    emit(comp.flush())
    return StoredImage(raw_len, raw_hash.hexdigest(), out_len, out_hash.hexdigest())
