"""The TUF repository on disk: where metadata lives, and how it is read and written.

Layout (consistent snapshots, as TUF specifies them):

    repo/metadata/N.root.json N.targets.json N.snapshot.json timestamp.json
    repo/metadata/root.json   copy of the newest root, for bootstrapping a node
    repo/targets/<dir>/<sha256>.<name>   target files
    repo/staged/root.json targets.json   changes not yet published (maybe not yet
                                         signed to threshold)

Invariants: published files are never rewritten (a new version is a new file) except
`timestamp.json` and the convenience `root.json`, which are replaced atomically;
every write is temp file + fsync + rename + directory fsync (`core.fsutil`); a
`Store` holds an exclusive lock on the repository directory for its lifetime, so two
`sign-release` runs never interleave their writes.

A command killed half-way (`publish` writes several files, `add` a large one) is
settled by the next one, when it takes the lock (`Store._recover`): its temporary files
are removed, and what a killed `publish` already made public is taken as published.
What is public follows from how a node reads the repository: N.snapshot.json only
through timestamp.json and N.targets.json only through that snapshot, so versioned
snapshot and targets files above what the current timestamp reaches were never seen
and may be written again; but nodes fetch N.root.json directly (ngclient asks for
N+1.root.json), so every N.root.json on disk is public and is never replaced - a staged
root with the same signed content is dropped as published, a different one is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from core.fsutil import atomic_write, fsync_dir, makedirs_durable, read_regular
from signing.errors import RepositoryIOError, RepositoryStateError
from signing.failpoints import failpoint, then_failpoint

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")  # staged and signed by release managers
ONLINE_ROLES = ("snapshot", "timestamp")  # signed by `publish` / `timestamp`
CONFIG_FILE = "sign-release.json"  # per-repository expiry defaults chosen at init
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
MAX_METADATA = 16 * 1024 * 1024

_VERSIONED = re.compile(r"^([1-9][0-9]*)\.(root|targets|snapshot)\.json$")
# Names of the temporary files of fsutil.temp_file (`.tmp-`) and atomic_write
# (`.<name>.`); tempfile.mkstemp appends 8 characters of [a-z0-9_].
_TEMP_FILE = re.compile(r"\.(?:tmp-|.+\.)[a-z0-9_]{8}")
_SERIALIZER = JSONSerializer(compact=False)


def now() -> datetime:
    """The current time, truncated to seconds (TUF metadata has second resolution)."""
    return datetime.now(UTC).replace(microsecond=0)


def expiry(days: int) -> datetime:
    """The expiry date `days` from now."""
    return now() + timedelta(days=days)


def to_bytes(md: Metadata[Any]) -> bytes:
    """Serialize metadata as the tools store it (indented JSON, canonical signatures)."""
    return md.to_bytes(_SERIALIZER)


@dataclass(frozen=True)
class Threshold:
    """How many valid signatures a role has, and how many it needs."""

    role: str
    signed: tuple[str, ...]
    threshold: int

    @property
    def missing(self) -> int:
        return max(0, self.threshold - len(self.signed))


def role_keys(root: Root, role: str) -> dict[str, Key]:
    """The keys `root` accepts for `role`, by keyid."""
    return {kid: root.keys[kid] for kid in root.roles[role].keyids}


def threshold_of(root: Root, role: str, md: Metadata[Any]) -> Threshold:
    """Valid signatures on `md` counted against `role`'s keys and threshold in `root`."""
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    return Threshold(role, tuple(sorted(result.signed)), result.threshold)


class Store:
    """An opened repository directory; use as a context manager to hold its lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata_dir = path / "metadata"
        self.targets_dir = path / "targets"
        self.staged_dir = path / "staged"
        self._lock_fd: int | None = None
        if not path.is_dir():
            raise RepositoryStateError(f"{path}: not a directory, so not a repository")
        if not self.metadata_dir.is_dir() or not (
            self.published_root_version() or (self.staged_dir / "root.json").is_file()
        ):
            raise RepositoryStateError(
                f"{path}: not a sign-release repository (no metadata/ with a root; "
                "create one with `sign-release init`)"
            )

    def __enter__(self) -> Store:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RepositoryStateError(
                f"{self.path}: another sign-release command is using this repository"
            ) from None
        self._lock_fd = fd
        try:
            self._recover()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # --- settling what a killed command left -------------------------------------

    def _recover(self) -> None:
        """Remove temporary files and settle an interrupted publish (lock held)."""
        try:
            self._remove_temp_files()
            self._settle_publish()
        except OSError as e:
            raise RepositoryIOError(
                f"{self.path}: cannot clean up after an interrupted command: {e.strerror}"
            ) from e

    def _remove_temp_files(self) -> None:
        for directory in (self.metadata_dir, self.targets_dir, self.staged_dir):
            if not directory.is_dir():
                continue
            removed = False
            for p in directory.iterdir():
                if _TEMP_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed = True
            if removed:
                fsync_dir(directory)

    def _settle_publish(self) -> None:
        """A publish killed after writing N.root.json, the root.json copy or
        timestamp.json, but before dropping what it published from staged/: finish
        those steps. (Snapshot and targets files it wrote but did not make reachable
        are simply written again by the next publish; see `check_publishable`.)"""
        newest = self.published_root_version()
        if newest:
            data = read_regular(self.metadata_dir / f"{newest}.root.json", MAX_METADATA)
            copy = self.metadata_dir / "root.json"
            if not copy.is_file() or read_regular(copy, MAX_METADATA) != data:
                atomic_write(copy, data)
        root = self.staged("root")
        if root is not None:
            public = self.metadata_dir / f"{root.signed.version}.root.json"
            if public.exists() and self._read(public).signed_bytes == root.signed_bytes:
                self.drop_staged("root")
        targets = self.staged("targets")
        if targets is not None:
            published = self.published_targets()
            if published is not None and published.signed_bytes == targets.signed_bytes:
                self.drop_staged("targets")

    def _reachable_version(self, role: str) -> int:
        """The version of snapshot or targets that the published timestamp leads a
        node to (0: none); higher versioned files were never visible."""
        if role == "snapshot":
            ts = self.published_timestamp()
            return ts.signed.snapshot_meta.version if ts is not None else 0
        snapshot = self.published_snapshot()
        return snapshot.signed.meta["targets.json"].version if snapshot is not None else 0

    # --- reading -----------------------------------------------------------------

    def _read(self, path: Path) -> Metadata[Any]:
        try:
            size = path.stat().st_size
            if size > MAX_METADATA:
                raise RepositoryStateError(f"{path}: larger than {MAX_METADATA} bytes")
            return Metadata.from_bytes(path.read_bytes())
        except DeserializationError as e:
            raise RepositoryStateError(f"{path}: not valid TUF metadata: {e}") from e
        except OSError as e:
            raise RepositoryIOError(f"{path}: cannot read: {e.strerror}") from e

    def published_root_version(self) -> int:
        """Highest N of the published N.root.json files (0 when none)."""
        versions = [
            int(m.group(1))
            for p in self.metadata_dir.iterdir()
            if (m := _VERSIONED.match(p.name)) and m.group(2) == "root"
        ]
        return max(versions, default=0)

    def published_root(self, version: int | None = None) -> Metadata[Root] | None:
        v = version or self.published_root_version()
        return self._read(self.metadata_dir / f"{v}.root.json") if v else None

    def published_timestamp(self) -> Metadata[Timestamp] | None:
        path = self.metadata_dir / "timestamp.json"
        return self._read(path) if path.exists() else None

    def published_snapshot(self) -> Metadata[Snapshot] | None:
        ts = self.published_timestamp()
        if ts is None:
            return None
        return self._read(self.metadata_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json")

    def published_targets(self) -> Metadata[Targets] | None:
        snap = self.published_snapshot()
        if snap is None:
            return None
        version = snap.signed.meta["targets.json"].version
        return self._read(self.metadata_dir / f"{version}.targets.json")

    def published(self, role: str) -> Metadata[Any] | None:
        if role == "root":
            return self.published_root()
        if role == "targets":
            return self.published_targets()
        if role == "snapshot":
            return self.published_snapshot()
        return self.published_timestamp()

    def staged(self, role: str) -> Metadata[Any] | None:
        path = self.staged_dir / f"{role}.json"
        return self._read(path) if path.exists() else None

    def current_root(self) -> Metadata[Root]:
        """The root that will be in force after the next publish."""
        md = self.staged("root") or self.published_root()
        if md is None:  # excluded by __init__
            raise RepositoryStateError(f"{self.path}: has no root metadata")
        return md

    def editable(self, role: str, expires_days: int | None) -> tuple[Metadata[Any], bool]:
        """The staged metadata of an offline role, or a new version started from the
        published one (signatures dropped, expiry reset). Second item: was it staged."""
        staged = self.staged(role)
        if staged is not None:
            if expires_days is not None:
                staged.signed.expires = expiry(expires_days)
                staged.signatures.clear()
            return staged, True
        published = self.published(role)
        if published is None:
            raise RepositoryStateError(f"{self.path}: role {role} has no metadata to edit")
        published.signed.version += 1
        days = expires_days if expires_days is not None else self.expiry_days(role)
        published.signed.expires = expiry(days)
        published.signatures.clear()
        return published, False

    def expiry_days(self, role: str) -> int:
        """Default expiry of `role` in days: init's --expires, else DEFAULT_EXPIRY_DAYS."""
        path = self.path / CONFIG_FILE
        try:
            config = json.loads(path.read_bytes()) if path.exists() else {}
            days = config.get("expires", {}).get(role, DEFAULT_EXPIRY_DAYS[role])
        except (ValueError, AttributeError, OSError) as e:
            raise RepositoryStateError(f"{path}: not a valid sign-release config") from e
        if not isinstance(days, int) or days < 0:
            raise RepositoryStateError(f"{path}: expires.{role} must be a number of days")
        return days

    # --- writing -----------------------------------------------------------------

    def write_staged(self, md: Metadata[Any]) -> None:
        try:
            makedirs_durable(self.staged_dir)
            role = md.signed.type
            data = then_failpoint(to_bytes(md), f"staged-{role}-temp")
            atomic_write(self.staged_dir / f"{role}.json", data)
            failpoint(f"staged-{role}")
        except OSError as e:
            raise RepositoryIOError(f"{self.staged_dir}: cannot write: {e.strerror}") from e

    def _published_path(self, md: Metadata[Any]) -> Path:
        role = md.signed.type
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        return self.metadata_dir / name

    def check_publishable(self, md: Metadata[Any]) -> None:
        """Refuse to publish `md` over a file a node may have seen: any N.root.json
        (nodes fetch them directly; one equal to the staged root was settled as
        published when the lock was taken, so this one differs), and snapshot or
        targets files up to the versions the timestamp reaches. Higher ones were written
        by a killed publish and never seen: publishing writes them again."""
        role = md.signed.type
        path = self._published_path(md)
        if role == "root" and path.exists():
            raise RepositoryStateError(
                f"{path}: already published and differs from staged root "
                f"v{md.signed.version}; nodes fetch every N.root.json, so it is never "
                f"replaced: remove {self.staged_dir / 'root.json'} and stage the change again"
            )
        reachable = self._reachable_version(role) if role in ("targets", "snapshot") else 0
        if path.exists() and md.signed.version <= reachable:
            raise RepositoryStateError(f"{path}: already published; refusing to overwrite")

    def write_published(self, md: Metadata[Any]) -> None:
        """Publish one metadata file (see `check_publishable`)."""
        self.check_publishable(md)
        role = md.signed.type
        path = self._published_path(md)
        try:
            atomic_write(path, then_failpoint(to_bytes(md), f"metadata-{role}-temp"))
            failpoint(f"metadata-{role}")
            if role == "root":
                copy = then_failpoint(to_bytes(md), "metadata-root-copy-temp")
                atomic_write(self.metadata_dir / "root.json", copy)
                failpoint("metadata-root-copy")
        except OSError as e:
            raise RepositoryIOError(f"{path}: cannot write: {e.strerror}") from e

    def drop_staged(self, role: str) -> None:
        path = self.staged_dir / f"{role}.json"
        if path.exists():
            path.unlink()
            fsync_dir(self.staged_dir)


def check_not_expired(md: Metadata[Any], what: str) -> None:
    """Refuse to sign or publish `md` if it has already expired."""
    if md.signed.is_expired(now()):
        raise RepositoryStateError(
            f"{what} v{md.signed.version} expired on {md.signed.expires:%Y-%m-%d %H:%M}Z; "
            "give a new expiry (--expires) to re-sign it"
        )
