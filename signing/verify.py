"""`sign-release verify`: check a published repository exactly as a node would.

A real python-tuf `ngclient.Updater`, bootstrapped with the given root.json, refreshes
the repository through a fetcher that reads the repository directory (no server
needed), then downloads every target - ngclient checks length and hashes against the
signed metadata. Each target's `custom.release` is parsed with the node's parser
(`core.release.ReleaseFields.from_target`: a target a node would skip does not
verify), and its content is decompressed with the node's decoder (`core.decompress`:
streaming, every frame or member, bounded output) and compared with `raw_length` /
`raw_sha256`, as the agent does while writing a partition. A chunk index target is
parsed with the node's parser (`core.chunkindex`) and must describe the image that
names it (raw length and sha256, frames inside the image file).

Invariants: nothing is trusted that ngclient did not verify; at most `raw_length + 1`
raw bytes of a target are ever decompressed, one bounded block at a time (a
decompression bomb costs one block); the working copy of metadata and targets lives in
a temporary directory that is always removed.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from core import chunkindex
from core.decompress import ChunkSource, raw_blocks
from core.errors import UpdateRejected
from core.release import ReleaseFields, is_index_path
from signing.compress import CHUNK
from signing.errors import SigningError, VerificationError


class DirectoryFetcher(FetcherInterface):
    """Serves `file://` URLs below one directory; anything else is a 404, as from HTTP."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urlparse(url)
        path = Path(unquote(parsed.path)).resolve()
        if parsed.scheme != "file" or not path.is_relative_to(self._root) or not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"not found: {url}", 404)
        return self._chunks(path)

    @staticmethod
    def _chunks(path: Path) -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


@dataclass(frozen=True)
class VerifyReport:
    """What a successful verification covered."""

    root_version: int
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    targets: tuple[str, ...]
    bytes_verified: int


def _check_index(local: Path, path: str) -> chunkindex.ChunkIndex:
    """A chunk index target, parsed as a node parses it."""
    try:
        data = local.read_bytes()
    except OSError as e:
        raise VerificationError(f"target {path}: cannot read the downloaded copy: {e}") from e
    try:
        return chunkindex.parse(data, path)
    except UpdateRejected as e:
        raise VerificationError(str(e)) from e


def _check_indexes(
    images: dict[str, tuple[ReleaseFields, int]], indexes: dict[str, chunkindex.ChunkIndex]
) -> None:
    """Each image's index exists and describes it."""
    for path, (fields, length) in images.items():
        if fields.index is None:
            continue
        index = indexes.get(fields.index)
        if index is None:
            raise VerificationError(f"target {path}: its index {fields.index} is not a target")
        if (index.raw_length, index.raw_sha256) != (fields.raw_length, fields.raw_sha256):
            raise VerificationError(
                f"target {path}: its index {fields.index} describes {index.raw_length} raw "
                f"bytes with sha256 {index.raw_sha256}, not the image"
            )
        if index.compressed_end > length:
            raise VerificationError(
                f"target {path}: its index {fields.index} has frames up to byte "
                f"{index.compressed_end}, past the image's {length} bytes"
            )


def _check_target(local: Path, target: TargetFile, path: str) -> ReleaseFields:
    """Refuse a target a node would skip or whose raw content is not what it says."""
    try:
        fields = ReleaseFields.from_target(path, target)
    except ValueError as e:
        raise VerificationError(f"target {path}: nodes skip it: {e}") from e
    what = f"target {path}"
    digest = hashlib.sha256()
    try:
        with local.open("rb") as f:
            source = ChunkSource(iter(lambda: f.read(CHUNK), b""))
            for block in raw_blocks(source, fields.compression, fields.raw_length, what):
                digest.update(block)
    except OSError as e:
        raise VerificationError(f"{what}: cannot read the downloaded copy: {e.strerror}") from e
    except UpdateRejected as e:  # CorruptStream, RawLengthMismatch: the node's refusals
        raise VerificationError(str(e)) from e
    if digest.hexdigest() != fields.raw_sha256:
        raise VerificationError(
            f"{what}: decompressed content has sha256 {digest.hexdigest()}, "
            f"its raw_sha256 is {fields.raw_sha256}"
        )
    return fields


def verify_repository(repo: Path, root_json: Path) -> VerifyReport:
    """Refresh `repo` with ngclient trusting `root_json`; download and check all targets."""
    if not (repo / "metadata").is_dir():
        raise SigningError(f"{repo}: not a repository (no metadata/ directory)")
    try:
        bootstrap = root_json.read_bytes()
    except OSError as e:
        raise SigningError(f"trusted root {root_json}: cannot read: {e.strerror}") from e
    try:
        if Metadata.from_bytes(bootstrap).signed.type != "root":
            raise SigningError(f"trusted root {root_json}: not root metadata")
    except DeserializationError as e:
        raise SigningError(f"trusted root {root_json}: not TUF root metadata ({e})") from e
    base = repo.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="sign-release-verify-") as tmp:
        meta_dir, target_dir = Path(tmp) / "metadata", Path(tmp) / "targets"
        meta_dir.mkdir()
        target_dir.mkdir()
        try:
            updater = Updater(
                str(meta_dir),
                f"{base}/metadata/",
                str(target_dir),
                f"{base}/targets/",
                fetcher=DirectoryFetcher(repo),
                bootstrap=bootstrap,
            )
            updater.refresh()
            # ngclient persists only metadata it verified: list targets from that copy.
            targets_md: Metadata[Targets] = Metadata.from_file(str(meta_dir / "targets.json"))
            paths = sorted(targets_md.signed.targets)
            total = 0
            images: dict[str, tuple[ReleaseFields, int]] = {}
            indexes: dict[str, chunkindex.ChunkIndex] = {}
            for tpath in paths:
                info = updater.get_targetinfo(tpath)
                if info is None:
                    raise VerificationError(f"target {tpath}: not found by the client")
                local = Path(updater.download_target(info, str(target_dir / "t")))
                if is_index_path(tpath):
                    indexes[tpath] = _check_index(local, tpath)
                else:
                    images[tpath] = (_check_target(local, info, tpath), info.length)
                total += info.length
                local.unlink()
            _check_indexes(images, indexes)
        except tuf_exc.RepositoryError as e:
            raise VerificationError(f"{repo}: {type(e).__name__}: {e}") from e
        except tuf_exc.DownloadError as e:
            raise VerificationError(f"{repo}: download failed: {e}") from e
        except ValueError as e:
            # Bootstrap root that is not TUF root metadata.
            raise VerificationError(f"trusted root {root_json}: {e}") from e
        versions = {
            role: Metadata.from_file(str(meta_dir / f"{role}.json")).signed.version
            for role in ("root", "targets", "snapshot", "timestamp")
        }
    return VerifyReport(
        versions["root"],
        versions["targets"],
        versions["snapshot"],
        versions["timestamp"],
        tuple(paths),
        total,
    )
