"""Release images in the zstd seekable format and their chunk index (docs/delta.md):
`sign-release add` writes frames that the real `zstd -d` and the node's streaming
decoder both decompress whole, a chunk index listed in targets and named by the image's
`custom.release.index`, each of whose frames decompresses on its own to a chunk with
the indexed sha256; `sign-release verify` checks the index against its image; the
mirror syncs and exports the index with its image."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest
import zstandard
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]

import mirror
from core import chunkindex
from core.decompress import ChunkSource, raw_blocks
from core.release import ReleaseFields, served_path
from signing.verify import verify_repository
from tests.conftest import require_tool
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo


def published_targets(repo: Path) -> dict[str, TargetFile]:
    newest = max(
        (repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])
    )
    md: Metadata[Targets] = Metadata.from_file(str(newest))
    return dict(md.signed.targets)


def served_file(repo: Path, path: str, digest: str) -> Path:
    return repo / "targets" / served_path(path, digest)


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path]:
    # Random bytes, so content-defined cuts fall every ~64 KiB (a periodic image would
    # give max-size chunks or none).
    img = tmp_path / "img"
    img.write_bytes(random.Random(3).randbytes(700_000))
    return make_repo(tmp_path / "repo", [ImageSpec(img, "1.0.0")]), img


def test_image_is_seekable_zstd_with_an_index_target(repo: tuple[Path, Path]) -> None:
    path, img = repo
    raw = img.read_bytes()
    targets = published_targets(path)
    image_tf = targets["x86_64-efi/1.0.0/root.img.zst"]
    fields = ReleaseFields.from_target(image_tf.path, image_tf)
    assert fields.index == "x86_64-efi/1.0.0/root.index"
    index_tf = targets[fields.index]
    stored = served_file(path, image_tf.path, image_tf.hashes["sha256"]).read_bytes()
    index_bytes = served_file(path, fields.index, index_tf.hashes["sha256"]).read_bytes()
    assert len(index_bytes) == index_tf.length
    index = chunkindex.parse(index_bytes, fields.index)
    assert (index.raw_length, index.raw_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    # Content-defined chunks (FastCDC, 16..256 KiB) covering the image in order.
    lengths = [c.raw_length for c in index]
    assert sum(lengths) == len(raw) and len(lengths) >= 4
    assert all(16 * 1024 <= n <= 256 * 1024 for n in lengths[:-1]) and lengths[-1] <= 256 * 1024
    assert index.compressed_end <= len(stored)
    for chunk in index:  # every frame on its own
        frame = stored[chunk.compressed_offset : chunk.compressed_offset + chunk.compressed_length]
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=chunk.raw_length)
        assert out == raw[chunk.raw_offset : chunk.raw_offset + chunk.raw_length]
        assert hashlib.sha256(out).digest() == chunk.sha256
    # The whole file, through the node's streaming decoder.
    pieces = (stored[i : i + 4096] for i in range(0, len(stored), 4096))
    assert b"".join(raw_blocks(ChunkSource(pieces), "zstd", len(raw), "t")) == raw


def test_the_zstd_cli_decompresses_it_whole(repo: tuple[Path, Path], tmp_path: Path) -> None:
    path, img = repo
    image_tf = published_targets(path)["x86_64-efi/1.0.0/root.img.zst"]
    stored = served_file(path, image_tf.path, image_tf.hashes["sha256"])
    done = subprocess.run(
        [require_tool("zstd"), "-d", "-c", str(stored)], capture_output=True, timeout=60, check=True
    )
    assert done.stdout == img.read_bytes()


def test_verify_checks_the_index_against_its_image(repo: tuple[Path, Path]) -> None:
    path, _ = repo
    report = verify_repository(path, ROOT_JSON)
    assert "x86_64-efi/1.0.0/root.index" in report.targets


def test_mirror_syncs_and_exports_the_index(repo: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = repo
    with HTTPTestServer(path) as server:
        result = mirror.sync(
            f"{server.url}/metadata",
            f"{server.url}/targets",
            tmp_path / "mirror",
            ROOT_JSON,
            allow_example_keys=True,
        )
    assert result.downloaded == ["x86_64-efi/1.0.0/root.img.zst", "x86_64-efi/1.0.0/root.index"]
    (row,) = result.releases
    assert row["images"]["root"]["index"].endswith(".root.index")
    usb = tmp_path / "usb"
    mirror.export(tmp_path / "mirror", usb)
    exported = {p.name.split(".", 1)[1] for p in (usb / "targets").rglob("*") if p.is_file()}
    assert exported == {"root.img.zst", "root.index"}
    again = mirror.sync(
        f"file://{usb}/metadata", f"file://{usb}/targets", tmp_path / "inner", ROOT_JSON,
        allow_example_keys=True,
    )  # fmt: skip
    assert again.downloaded == result.downloaded
