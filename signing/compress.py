"""Streaming compression of OS images into target files, hashing both sides on the way.

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
from typing import IO, Protocol

import zstandard

from signing.failpoints import failpoint

CHUNK = 1024 * 1024


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Zstd:
    """zstandard's chunked compressor behind the same compress/flush shape as zlib's."""

    def __init__(self, raw_size: int) -> None:
        # The content size goes into the frame header, so a reader knows it up front.
        cctx = zstandard.ZstdCompressor(level=6, threads=-1, write_content_size=True)
        self._obj = cctx.compressobj(size=raw_size)

    def compress(self, data: bytes, /) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def _compressor(kind: str, raw_size: int) -> _Compressor:
    if kind == "zstd":
        return _Zstd(raw_size)
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


def compress_stream(src: IO[bytes], dst: IO[bytes], kind: str, raw_size: int) -> StoredImage:
    """Compress `src` into `dst` with `kind`, returning lengths and hashes of both sides."""
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
