"""Compression into target files: every format round-trips through the standard
decompressors and through the node's (`core.decompress`, what `sign-release verify`
uses), the recorded raw/stored lengths and hashes are right, and truncated streams are
detected. Also the version and name rules of `add`."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest
import pyzstd
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from core.decompress import ChunkSource, CorruptStream, raw_blocks
from core.release import COMPRESSIONS
from signing.compress import CHUNK, compress_stream
from signing.errors import SigningError
from signing.repository import Release


def node_decompress(blob: bytes, kind: str, raw_length: int) -> bytes:
    """The node's decoder, fed in CHUNK-sized pieces as `sign-release verify` feeds it."""
    chunks = (blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK))
    return b"".join(raw_blocks(ChunkSource(chunks), kind, raw_length, "test image"))


STDLIB: dict[str, Callable[[bytes], bytes]] = {
    # Seekable zstd is many frames and a skippable one: read across frames, as `zstd -d`
    # does (tests/integration/test_seekable_release.py runs the real CLI).
    "zstd": lambda b: (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b), read_across_frames=True).read()
    ),
    "xz": lzma.decompress,
    "gzip": gzip.decompress,
    "none": lambda b: b,
}


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=20_000), kind=st.sampled_from(COMPRESSIONS))
def test_round_trip(data: bytes, kind: str) -> None:
    out = io.BytesIO()
    stored = compress_stream(io.BytesIO(data), out, kind, len(data))
    blob = out.getvalue()
    assert STDLIB[kind](blob) == data
    assert node_decompress(blob, kind, len(data)) == data
    assert (stored.raw_length, stored.raw_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (stored.length, stored.sha256) == (len(blob), hashlib.sha256(blob).hexdigest())


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_larger_than_one_chunk_and_reproducible(kind: str) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"
    first, second = io.BytesIO(), io.BytesIO()
    compress_stream(io.BytesIO(data), first, kind, len(data))
    compress_stream(io.BytesIO(data), second, kind, len(data))
    assert first.getvalue() == second.getvalue()
    assert node_decompress(first.getvalue(), kind, len(data)) == data
    if kind == "zstd":  # seekable: pyzstd reads it back at any offset
        with pyzstd.SeekableZstdFile(io.BytesIO(first.getvalue())) as zf:
            zf.seek(CHUNK + 5)
            assert zf.read(100) == data[CHUNK + 5 : CHUNK + 105]


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd"])
def test_truncated_stream_is_detected(kind: str) -> None:
    data = bytes(range(256)) * 400
    out = io.BytesIO()
    compress_stream(io.BytesIO(data), out, kind, len(data))
    cut = out.getvalue()[: len(out.getvalue()) // 2]
    with pytest.raises(CorruptStream, match="truncated"):
        node_decompress(cut, kind, len(data))


@pytest.mark.parametrize(
    "version",
    [
        "0.0.0",
        "1.2.0",
        "1.2.0-rc.1",
        "10.20.30-alpha.beta",
    ],
)
def test_versions_accepted(tmp_path: Path, version: str) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x")
    Release(image, version, ("hw",)).validate()


@pytest.mark.parametrize(
    "version",
    [
        "1.2",
        "1",
        "v1.2.0",
        "1.2.0-",
        "01.2.0",
        "1.02.0",
        "1.2.0-01",
        "1.2.0 ",
        "1.2.0/x",
        "../1.2.0",
        "",
        "1.0.0+build.5",
        "1.0.0-rc.1+exp.sha.5114f85",
        "1.2.0\n",
    ],
)
def test_versions_refused(tmp_path: Path, version: str) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x")
    with pytest.raises(SigningError, match="--version"):
        Release(image, version, ("hw",)).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hardware", ("../etc",)),
        ("hardware", ()),
        ("role", "a/b"),
        ("channel", ""),
        ("hardware", ("a", "a")),
        ("compression", "lz4"),
    ],
)
def test_release_fields_refused(tmp_path: Path, field: str, value: object) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"x")
    fields: dict[str, object] = {"image": image, "version": "1.0.0", "hardware": ("hw",)}
    fields[field] = value
    with pytest.raises(SigningError):
        Release(**fields).validate()  # type: ignore[arg-type]
    assert Release(image, "1.0.0", ("hw",)).target_path("hw") == "hw/1.0.0/root.img.zst"
