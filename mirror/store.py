"""The on-disk layout of a mirror directory and its atomic publish.

    DIR/objects/<sha256>         verified target bytes, one file per content (hard-linked)
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
* Nothing is written outside the mirror directory: every relative path joined to one
  of its directories (a state's metadata names and target links, a manifest's paths)
  passes `core.release.check_target_path` first - the one rule for signed target
  paths - and every object name is 64 lowercase hex digits. A manifest is validated
  whole when it is read (`Manifest.from_json`): a damaged one is one `MirrorRejected`
  naming the file and the field, never a crash in whichever command reads it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UpdateFailed, UpdateRejected
from core.fsutil import atomic_write, fsync_dir, read_regular
from core.release import check_role, check_target_path, parse_version
from core.textparse import loads_json

# A manifest lists every image of a state; 64 MiB is ~300,000 of them.
MAX_MANIFEST_BYTES = 64 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class MirrorError(UpdateFailed):
    """The mirror directory could not be read or written, or is busy."""


class MirrorRejected(UpdateRejected):
    """A mirror directory or export is not in the expected shape or does not verify."""


def below(base: Path, relative: str, what: str = "path") -> Path:
    """`base / relative`, for a `relative` that passes `release.check_target_path`
    (relative, no empty, `.` or `..` component, no control character); otherwise
    MirrorRejected naming `what`. Every join of a path the mirror did not make itself
    goes through here, so none of them can leave `base`."""
    try:
        check_target_path(relative)
    except ValueError as e:
        raise MirrorRejected(f"refusing {what} below {base}: {e}") from e
    return base / relative


def file_in(base: Path, name: str, what: str) -> Path:
    """`base / name` for a single file name (`below`, and no `/`)."""
    if isinstance(name, str) and "/" in name:
        raise MirrorRejected(f"refusing {what} {name!r} below {base}: not a single file name")
    return below(base, name, f"{what} {name!r}")


def _kind(value: object) -> str:
    """A JSON value's type in words (never the value: it may be huge or deep)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    names |= {int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _object(value: object, keys: tuple[str, ...], field: str) -> dict[str, Any]:
    """`value` if it is a JSON object with exactly `keys`; ValueError naming `field`."""
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected an object, got {_kind(value)}")
    missing = [k for k in keys if k not in value]
    unknown = sorted(k for k in value if k not in keys)
    if missing or unknown:
        why = f"missing {missing}" if missing else f"unknown {[k[:40] for k in unknown[:3]]}"
        raise ValueError(f"{field}: {why}")
    return value


def _string(value: object, field: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {_kind(value)}")
    if nonempty and not value:
        raise ValueError(f"{field}: is empty")
    return value


def _checked(check: Callable[[str], object], value: object, field: str) -> str:
    """`value`, a string passing `check` (a rule of `core.release`); its ValueError
    is prefixed by `field`."""
    text = _string(value, field)
    try:
        check(text)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from e
    return text


def _sha256(value: object, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"{field}: expected a sha256 (64 lowercase hex digits)")
    return value


def _file_name(value: object, field: str) -> str:
    name = _checked(check_target_path, value, field)
    if "/" in name:
        raise ValueError(f"{field}: {name!r} is not a single file name")
    return name


def _release_row(value: object, field: str, targets: Mapping[str, str]) -> dict[str, Any]:
    row = _object(value, ("channel", "hardware", "images", "version"), field)
    _string(row["hardware"], f"{field}.hardware", nonempty=True)
    _string(row["channel"], f"{field}.channel", nonempty=True)
    _checked(parse_version, row["version"], f"{field}.version")
    images = row["images"]
    if not isinstance(images, dict) or not images:
        raise ValueError(f"{field}.images: expected a non-empty object, got {_kind(images)}")
    for role, image in images.items():
        where = f"{field}.images.{_checked(check_role, role, f'{field}.images')}"
        # An image with a chunk index (docs/delta.md) names its file too.
        keys = ("file", "target", "index") if isinstance(image, dict) and "index" in image else ()
        _object(image, keys or ("file", "target"), where)
        _checked(check_target_path, image["target"], f"{where}.target")
        for name in ("file", "index") if keys else ("file",):
            file = _checked(check_target_path, image[name], f"{where}.{name}")
            if file not in targets:
                raise ValueError(f"{where}.{name}: {file!r} is not one of the state's targets")
    return row


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
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and validate a manifest written by `to_json`; `source` names it (the
        file) in the one-line MirrorRejected raised for anything else."""
        try:
            doc = _object(loads_json(text), _MANIFEST_KEYS, "the manifest")
            number = doc["number"]
            if not isinstance(number, int) or isinstance(number, bool):
                raise ValueError(f"number: expected an integer, got {_kind(number)}")
            if number < 1:
                raise ValueError(f"number: {number} is not a state number (1 or more)")
            metadata = doc["metadata"]
            if not isinstance(metadata, list):
                raise ValueError(f"metadata: expected an array, got {_kind(metadata)}")
            names = tuple(_file_name(n, f"metadata[{i}]") for i, n in enumerate(metadata))
            targets = doc["targets"]
            if not isinstance(targets, dict):
                raise ValueError(f"targets: expected an object, got {_kind(targets)}")
            for path, sha in targets.items():
                _sha256(sha, f"targets[{_checked(check_target_path, path, 'targets')!r}]")
            rows = doc["releases"]
            if not isinstance(rows, list):
                raise ValueError(f"releases: expected an array, got {_kind(rows)}")
            releases = tuple(_release_row(r, f"releases[{i}]", targets) for i, r in enumerate(rows))
            synced_at = _string(doc["synced_at"], "synced_at")
            upstream = _string(doc["upstream"], "upstream")
        except ValueError as e:
            raise MirrorRejected(f"manifest {source} is damaged: {e}") from e
        return cls(number, names, dict(targets), releases, synced_at, upstream)


_MANIFEST_KEYS = ("metadata", "number", "releases", "synced_at", "targets", "upstream")


class MirrorDir:
    """A mirror directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.states = root / "states"
        self.manifests = root / "manifests"
        self.current_link = root / "current"
        self.tuf_cache = root / "tuf"

    def create(self) -> None:
        try:
            for d in (self.root, self.objects, self.states, self.manifests):
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
        """The validated manifest of state `number` (MirrorRejected if damaged)."""
        path = self.manifests / f"{number}.json"
        try:
            data = read_regular(path, MAX_MANIFEST_BYTES)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EFBIG):  # not a regular file, too large
                raise MirrorRejected(f"manifest {path} is damaged: {e.strerror}") from e
            raise MirrorError(f"cannot read manifest {path}: {e.strerror}") from e
        manifest = Manifest.from_json(data, str(path))
        if manifest.number != number:
            raise MirrorRejected(
                f"manifest {path} is damaged: number: {manifest.number}, not {number}"
            )
        return manifest

    def object_path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise MirrorRejected(
                f"refusing object name {str(sha256)[:80]!r} in {self.objects}: "
                "not a sha256 (64 lowercase hex digits)"
            )
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
        old = self.manifest(previous) if previous is not None else None
        number = 1 + max(
            (int(p.name) for p in self.states.iterdir() if p.name.isdigit()), default=0
        )
        staging = self.states / f".staging-{number}"
        meta_dir, targets_dir = staging / "metadata", staging / "targets"
        # Every path is checked before the first byte is written.
        files = {
            file_in(meta_dir, name, "metadata file name"): data for name, data in metadata.items()
        }
        carried: dict[Path, Path] = {}
        links: dict[str, str] = dict(targets)
        if old is not None:
            prev_meta = self.states / str(old.number) / "metadata"
            for name in old.metadata:
                if name not in metadata and name != "timestamp.json":
                    what = "metadata file name"
                    carried[file_in(meta_dir, name, what)] = file_in(prev_meta, name, what)
            for path, sha in old.targets.items():
                links.setdefault(path, sha)
        linked = {
            below(targets_dir, path, "target link"): self.object_path(sha)
            for path, sha in sorted(links.items())
        }
        manifest = Manifest(
            number,
            tuple(sorted(metadata)),
            dict(sorted(targets.items())),
            releases,
            synced_at,
            upstream,
        )
        text = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode()
        # Never write a manifest that the next reader would refuse.
        Manifest.from_json(text, f"new manifest of state {number}")
        try:
            if staging.exists():
                shutil.rmtree(staging)
            meta_dir.mkdir(parents=True)
            for dest, data in files.items():
                atomic_write(dest, data)
            for dest, src in carried.items():
                os.link(src, dest)
            fsync_dir(meta_dir)
            made: set[Path] = {targets_dir}
            targets_dir.mkdir()
            for dest, obj in linked.items():
                if not dest.parent.exists():
                    dest.parent.mkdir(parents=True)
                    made.update(p for p in dest.parents if staging in p.parents)
                os.link(obj, dest)
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
            fsync_dir(staging)
            os.rename(staging, self.states / str(number))
            fsync_dir(self.states)
            atomic_write(self.manifests / f"{number}.json", text)
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
        objects and what an interrupted download left (a temporary file beside the objects,
        or the `.partial/` directory older mirrors had); returns the sha256 of the
        removed objects."""
        current = self.current_number()
        removed: list[str] = []
        try:
            for p in self.states.iterdir():
                keep = p.name.isdigit() and current is not None and int(p.name) >= current - 1
                if not keep:
                    shutil.rmtree(p)
                    with contextlib.suppress(FileNotFoundError):
                        (self.manifests / f"{p.name}.json").unlink()
            shutil.rmtree(self.objects / ".partial", ignore_errors=True)
            for p in self.objects.iterdir():
                if p.is_file() and p.stat().st_nlink == 1:
                    p.unlink()
                    if not p.name.startswith("."):  # not a download's temporary file
                        removed.append(p.name)
            fsync_dir(self.objects)
            fsync_dir(self.states)
        except OSError as e:
            raise MirrorError(f"cannot clean up {self.root}: {e}") from e
        return sorted(removed)
