"""Signed TUF repositories from the INSECURE example keys of keys-example/, for the demo,
the virtual node's scenarios and the benchmarks.

Built with the real signing library (`signing.create`, `signing.repository`, what
`sign-release` runs). The library refuses the example keys unless told that this is a
demo or a test, so every call here says so (`allow_example_keys=True`). Every
repository's `metadata/1.root.json` is exactly `ROOT_JSON`, so a client bootstrapped
with `ROOT_JSON` (and `allow_example_keys`) trusts every one of them.

    repo = make_repo(work / "repo", [ImageSpec(image, "1.2.0")])
    add_release(repo, [ImageSpec(image2, "1.3.0")])
    publish(repo)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from signing import create
from signing import repository as ops

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS_DIR = REPO_ROOT / "keys-example"
ROOT_JSON = KEYS_DIR / "root.json"  # trusted root v1 of every repository made here
TARGETS_KEY = KEYS_DIR / "targets"
SNAPSHOT_KEY = KEYS_DIR / "snapshot"
TIMESTAMP_KEY = KEYS_DIR / "timestamp"


@dataclass(frozen=True)
class ImageSpec:
    """One image to add: a raw image file and its release fields."""

    path: Path
    version: str
    role: str = "root"
    hardware: tuple[str, ...] = ("x86_64-efi",)
    channel: str = "stable"
    compression: str = "zstd"  # zstd, xz, gzip or none

    def release(self) -> ops.Release:
        return ops.Release(
            self.path, self.version, tuple(self.hardware), self.role, self.channel, self.compression
        )


def add_release(repo: Path, images: Sequence[ImageSpec]) -> list[str]:
    """Stage `images` (signed with the example targets key); returns the target paths.
    Call `publish(repo)` to make them visible to clients."""
    paths: list[str] = []
    for spec in images:
        files = ops.add_release(repo, spec.release(), [str(TARGETS_KEY)], allow_example_keys=True)
        paths.extend(tf.path for tf in files)
    return paths


def publish(repo: Path, expires: Mapping[str, int] | None = None) -> dict[str, int]:
    """Publish what is staged with a new snapshot and timestamp; returns the versions.
    `expires` may set {"snapshot": days, "timestamp": days} (0 = already expired)."""
    result = ops.publish(
        repo,
        [str(SNAPSHOT_KEY)],
        [str(TIMESTAMP_KEY)],
        expires=expires,
        allow_example_keys=True,
    )
    return result.versions


def make_repo(
    dest: Path, images: Sequence[ImageSpec] = (), expires: Mapping[str, int] | None = None
) -> Path:
    """Create a published repository at `dest` (absent or empty) holding `images`."""
    create.init_from_root(dest, ROOT_JSON, allow_example_keys=True)
    add_release(dest, images)
    publish(dest, expires)
    return dest
