"""The on-disk layout of a mirror directory and its atomic publish.

    DIR/objects/<sha256>         verified target bytes, one file per content (hard-linked)
    DIR/objects/.partial/        downloads in progress (never linked into a state)
    DIR/states/<n>/metadata/     verified TUF metadata bytes, exactly as upstream signed them
    DIR/states/<n>/targets/...   hard links to objects/, at their consistent-snapshot paths
    DIR/manifests/<n>.json       what state <n> holds (its own files, release info)
    DIR/current -> states/<n>    what is served; swapped with one os.replace of a symlink
    DIR/tuf/                     the mirror's private ngclient cache (rollback protection)
    DIR/.lock                    flock held by a sync (one writer at a time)

Invariants:

* A state directory is complete before `current` points to it, and is never modified
  afterwards; every file in it was fsync'd, then its directories, before the swap.
* Readers resolve `current` per request, so each request sees one whole state. A reader
  that fetched `timestamp.json` from state n-1 still finds every versioned file it names
  in state n: a new state carries the previous state's own metadata and targets (hard
  links), and the previous state directory is kept until the next sync.
* Objects are written only after their hashes were verified (the caller's job), named
  by their sha256; an object whose link count is 1 is referenced by no state and is
  removed by `collect_garbage`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from updater.errors import UpdateFailed, UpdateRejected
from updater.fsutil import fsync_dir


class MirrorError(UpdateFailed):
    """The mirror directory could not be read or written, or is busy."""


class MirrorRejected(UpdateRejected):
    """A mirror directory or export is not in the expected shape or does not verify."""


def write_file(path: Path, data: bytes) -> None:
    """Write a new file durably (fsync'd); the directory is fsync'd by the caller."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Manifest:
    """What one state holds: its own metadata names and targets (URL path -> sha256)."""

    number: int
    metadata: tuple[str, ...]
    targets: Mapping[str, str]
    releases: tuple[Mapping[str, Any], ...]
    synced_at: str
    upstream: str

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "metadata": list(self.metadata),
            "targets": dict(self.targets),
            "releases": [dict(r) for r in self.releases],
            "synced_at": self.synced_at,
            "upstream": self.upstream,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            int(data["number"]),
            tuple(data["metadata"]),
            dict(data["targets"]),
            tuple(data["releases"]),
            str(data["synced_at"]),
            str(data["upstream"]),
        )


class MirrorDir:
    """A mirror directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.partial = self.objects / ".partial"
        self.states = root / "states"
        self.manifests = root / "manifests"
        self.current_link = root / "current"
        self.tuf_cache = root / "tuf"

    def create(self) -> None:
        try:
            for d in (self.root, self.objects, self.partial, self.states, self.manifests):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MirrorError(f"cannot create mirror directory {self.root}: {e.strerror}") from e

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the writer lock (non-blocking: a second sync fails at once, clearly)."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MirrorError(f"cannot open lock {self.root / '.lock'}: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise MirrorError(f"{self.root}: another sync holds its lock") from e
            yield
        finally:
            os.close(fd)

    def current_number(self) -> int | None:
        """The state `current` points to, None before the first sync."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MirrorError(f"cannot read {self.current_link}: {e.strerror}") from e
        name = Path(target).name
        if not name.isdigit():
            raise MirrorRejected(f"{self.current_link} points to {target!r}, not a state")
        return int(name)

    def current(self) -> Path:
        """The directory of the current state; MirrorRejected if nothing was synced."""
        number = self.current_number()
        if number is None:
            raise MirrorRejected(f"{self.root} holds no synced state (run update-mirror sync)")
        return self.states / str(number)

    def manifest(self, number: int) -> Manifest:
        path = self.manifests / f"{number}.json"
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except OSError as e:
            raise MirrorError(f"cannot read manifest {path}: {e.strerror}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise MirrorRejected(f"manifest {path} is damaged: {e}") from e

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def publish(
        self,
        metadata: Mapping[str, bytes],
        targets: Mapping[str, str],
        releases: tuple[Mapping[str, Any], ...],
        synced_at: str,
        upstream: str,
    ) -> Manifest:
        """Build state n+1 from verified metadata bytes and stored objects, swap `current`.

        `targets` maps URL path (below targets/) -> sha256 of an object already stored.
        The previous state's own metadata and targets are carried over (see module doc).
        """
        previous = self.current_number()
        number = 1 + max(
            (int(p.name) for p in self.states.iterdir() if p.name.isdigit()), default=0
        )
        staging = self.states / f".staging-{number}"
        try:
            if staging.exists():
                shutil.rmtree(staging)
            meta_dir = staging / "metadata"
            meta_dir.mkdir(parents=True)
            for name, data in metadata.items():
                write_file(meta_dir / name, data)
            links: dict[str, str] = dict(targets)
            if previous is not None:
                prev_dir = self.states / str(previous)
                for name in self.manifest(previous).metadata:
                    if name not in metadata and name != "timestamp.json":
                        os.link(prev_dir / "metadata" / name, meta_dir / name)
                for path, sha in self.manifest(previous).targets.items():
                    links.setdefault(path, sha)
            fsync_dir(meta_dir)
            made: set[Path] = {staging / "targets"}
            (staging / "targets").mkdir()
            for path, sha in sorted(links.items()):
                dest = staging / "targets" / path
                if not dest.parent.exists():
                    dest.parent.mkdir(parents=True)
                    made.update(p for p in dest.parents if staging in p.parents)
                os.link(self.object_path(sha), dest)
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
            fsync_dir(staging)
            final = self.states / str(number)
            os.rename(staging, final)
            fsync_dir(self.states)
            manifest = Manifest(
                number,
                tuple(sorted(metadata)),
                dict(sorted(targets.items())),
                releases,
                synced_at,
                upstream,
            )
            tmp = self.manifests / f".{number}.json.tmp"
            write_file(tmp, json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode())
            os.replace(tmp, self.manifests / f"{number}.json")
            fsync_dir(self.manifests)
            link_tmp = self.root / ".current.tmp"
            with contextlib.suppress(FileNotFoundError):
                link_tmp.unlink()
            os.symlink(f"states/{number}", link_tmp)
            os.replace(link_tmp, self.current_link)
            fsync_dir(self.root)
        except OSError as e:
            raise MirrorError(f"cannot publish state {number} in {self.root}: {e}") from e
        return manifest

    def collect_garbage(self) -> list[str]:
        """Remove states older than the previous one, staging leftovers, unreferenced
        objects and partial downloads; returns the sha256 of the removed objects."""
        current = self.current_number()
        removed: list[str] = []
        try:
            for p in self.states.iterdir():
                keep = p.name.isdigit() and current is not None and int(p.name) >= current - 1
                if not keep:
                    shutil.rmtree(p)
                    with contextlib.suppress(FileNotFoundError):
                        (self.manifests / f"{p.name}.json").unlink()
            for p in self.partial.iterdir():
                p.unlink()
            for p in self.objects.iterdir():
                if p.is_file() and p.stat().st_nlink == 1:
                    p.unlink()
                    removed.append(p.name)
            fsync_dir(self.objects)
            fsync_dir(self.states)
        except OSError as e:
            raise MirrorError(f"cannot clean up {self.root}: {e}") from e
        return sorted(removed)
