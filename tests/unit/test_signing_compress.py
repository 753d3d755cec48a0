"""Compression into target files: every format round-trips through the standard
decompressors, the recorded raw/stored lengths and hashes are right, and truncated
streams are detected. Also the version and name rules of `add`."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from signing.compress import CHUNK, COMPRESSIONS, compress_stream, decompress_chunks
from signing.errors import SigningError
from signing.repository import Release

STDLIB: dict[str, Callable[[bytes], bytes]] = {
    "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b),
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
    assert b"".join(decompress_chunks(io.BytesIO(blob), kind)) == data
    assert (stored.raw_length, stored.raw_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (stored.length, stored.sha256) == (len(blob), hashlib.sha256(blob).hexdigest())


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_larger_than_one_chunk_and_reproducible(kind: str) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"
    first, second = io.BytesIO(), io.BytesIO()
    compress_stream(io.BytesIO(data), first, kind, len(data))
    compress_stream(io.BytesIO(data), second, kind, len(data))
    assert first.getvalue() == second.getvalue()
    assert b"".join(decompress_chunks(io.BytesIO(first.getvalue()), kind)) == data
    if kind == "zstd":  # the frame header carries the raw size for the agent
        params = zstandard.get_frame_parameters(first.getvalue())
        assert params.content_size == len(data)


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd"])
def test_truncated_stream_is_detected(kind: str) -> None:
    data = bytes(range(256)) * 400
    out = io.BytesIO()
    compress_stream(io.BytesIO(data), out, kind, len(data))
    cut = io.BytesIO(out.getvalue()[: len(out.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated"):
        b"".join(decompress_chunks(cut, kind))


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
