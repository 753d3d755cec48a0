"""`update-mirror`: the verified sync of an air-gapped mirror, and the library facade of
the command (verify, export, status and the expiry report live in `mirror.state`
and are re-exported here).

The mirror holds no keys. It runs the agent's own TUF path (`core.repository.
Repository`, python-tuf ngclient) against upstream into a private cache, copies the
metadata bytes ngclient verified and persisted, streams each chosen image through
`Repository.stream_target` (trusted length and hashes, Range resume) into the object
store, and publishes a new state atomically (`mirror.store`).

Invariants:

* Nothing unverified is ever published: metadata comes only from ngclient's cache after
  a successful refresh (each file's version checked against the trusted set), an object
  is renamed into the store only after `stream_target` returned (all hashes matched).
* A failed sync (bad signature, rollback, expiry, tampered image, network) raises before
  the publish step, so `current` keeps pointing to the previous good state.
* Expiry is never bypassed: sync and verify refuse expired metadata (ngclient), and
  `expiry()` reports the days each role has left.
* `plan_targets` is pure: which targets to mirror from the verified targets, the
  hardware/channel filter and `--keep`.
* A signed target path is still untrusted: one that fails `release.check_target_path`
  is never planned, fetched or linked, and sync reports it (`SyncResult.skipped`).
* A stored object is reused only after its bytes were hashed again and matched the
  trusted sha256 and length; otherwise it is downloaded again and replaced.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api.metadata import Metadata, TargetFile  # type: ignore[attr-defined]

from core import release
from core.errors import ConfigError
from core.fsutil import replacing
from core.repository import Repository, TargetRejected
from mirror.state import expiry, metadata_files
from mirror.store import MirrorDir, MirrorError, MirrorRejected

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (hardware, role)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Wanted:
    """One mirrored image: its target path, release fields and trusted TargetFile."""

    path: str
    target: TargetFile
    hardware: str
    channel: str
    role: str
    version: str
    index: bool = False  # the chunk index of the image of `role`, not the image

    def url_path(self) -> str:
        """Where the image is below targets/ in a consistent-snapshot repository."""
        return release.served_path(self.path, sha256_of(self.target))


def sha256_of(target: TargetFile) -> str:
    """The trusted sha256 of a target, which names its object and its served file."""
    digest = target.hashes.get("sha256")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest.lower()):
        raise TargetRejected(
            f"target {target.path} has no sha256 hash of 64 hex digits; the mirror needs one"
        )
    return digest.lower()


def unsafe_targets(targets: Mapping[str, TargetFile]) -> dict[str, str]:
    """{path: why} of the targets whose path fails `release.check_target_path`: they
    are never planned (`release.releases` skips them), so a sync reports them. Pure."""
    unsafe: dict[str, str] = {}
    for path in sorted(targets):
        try:
            release.check_target_path(path)
        except ValueError as e:
            unsafe[path] = str(e)
    return unsafe


def _pairs(targets: Mapping[str, TargetFile]) -> set[tuple[str, str]]:
    """(hardware, channel) pairs named by the targets a node accepts (the schema's
    parser; `release.releases` logs the others when planning)."""
    pairs: set[tuple[str, str]] = set()
    for path, target in targets.items():
        try:
            fields = release.ReleaseFields.from_target(path, target)
        except ValueError:
            continue
        pairs.update((hw, fields.channel) for hw in fields.hardware)
    return pairs


def plan_targets(
    targets: Mapping[str, TargetFile],
    hardware: Sequence[str] = (),
    channel: str | None = None,
    keep: int | None = None,
) -> list[Wanted]:
    """The images to mirror, each followed by its chunk index if it names one that the
    verified targets list (a node fetches only the frames it lacks with it). Pure.

    Every release for the chosen hardware (all when empty) and channel (all when None).
    With `keep`, only the `keep` newest versions per (hardware, role) - and always the
    newest release of each (hardware, channel), the one a node following that channel
    installs, so pruning never removes what the current metadata says nodes need.
    """
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep {keep}: must be at least 1")
    chosen: dict[str, Wanted] = {}
    by_key: dict[Key, list[Wanted]] = {}
    newest: list[Wanted] = []
    for hw, ch in sorted(_pairs(targets)):
        if (hardware and hw not in hardware) or (channel is not None and ch != channel):
            continue
        rels = release.releases(targets, hw, ch)
        for rel in rels:
            for role, image in rel.images.items():
                wanted = [Wanted(image.path, image.target, hw, ch, role, rel.version)]
                if image.index is not None and image.index in targets:
                    index = targets[image.index]
                    wanted.append(Wanted(image.index, index, hw, ch, role, rel.version, True))
                by_key.setdefault((hw, role), []).extend(wanted)
                if rel is rels[-1]:
                    newest.extend(wanted)
    for items in by_key.values():
        # An image and its index are one version: `keep` counts versions.
        versions = sorted({w.version for w in items}, key=release.parse_version)
        kept = set(versions if keep is None else versions[-keep:])
        for w in items:
            if w.version in kept:
                chosen[w.path + "\0" + w.hardware] = w
    for w in newest:
        chosen[w.path + "\0" + w.hardware] = w
    return sorted(chosen.values(), key=lambda w: (w.hardware, w.role, w.path))


def verified_metadata(repo: Repository) -> dict[str, bytes]:
    """The metadata files a node fetches, named as served, from ngclient's cache.

    Only bytes of the versions in ngclient's trusted set are taken (each file is parsed
    and its version compared), so a stale cache file can never be published.
    """
    trusted = repo.trusted_set()
    root = trusted.root
    if not root.consistent_snapshot:
        raise MirrorRejected(f"{repo.metadata_url}: upstream does not use consistent snapshots")
    cache = repo.cache_dir
    files: dict[str, bytes] = {}

    def read(path: Path, role: str, version: int) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise MirrorError(f"cannot read verified {role} metadata {path}: {e}") from e
        if Metadata.from_bytes(data).signed.version != version:
            raise MirrorRejected(f"{path}: not the verified version {version} of {role}")
        return data

    for v in range(1, root.version + 1):
        path = cache / "root_history" / f"{v}.root.json"
        if path.exists():
            files[f"{v}.root.json"] = read(path, "root", v)
    files["root.json"] = files[f"{root.version}.root.json"]
    files["timestamp.json"] = read(cache / "timestamp.json", "timestamp", trusted.timestamp.version)
    snap = trusted.snapshot
    files[f"{snap.version}.snapshot.json"] = read(cache / "snapshot.json", "snapshot", snap.version)
    for name, meta in snap.meta.items():
        role = name[: -len(".json")]
        quoted = parse.quote(role, "")
        path = cache / f"{quoted}.json"
        if path.exists():
            data = path.read_bytes()
            if Metadata.from_bytes(data).signed.version == meta.version:
                files[f"{meta.version}.{quoted}.json"] = data
    if f"{snap.meta['targets.json'].version}.targets.json" not in files:
        raise MirrorRejected(f"{cache}: verified targets metadata missing after refresh")
    return files


@dataclass
class SyncResult:
    state: int
    downloaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed_objects: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target path -> why
    bytes_downloaded: int = 0
    releases: list[dict[str, Any]] = field(default_factory=list)
    expiry: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fetch_object(
    repo: Repository, store: MirrorDir, wanted: Wanted, retries: int, backoff: float
) -> int:
    """Stream one target into the object store (replacing a damaged object of the
    same name); returns bytes written."""
    sha = sha256_of(wanted.target)
    obj = store.object_path(sha)
    written = 0
    try:
        with replacing(obj) as f:
            for chunk in repo.stream_target(wanted.target, retries=retries, backoff=backoff):
                f.write(chunk)
                written += len(chunk)
            # stream_target returned: length and every hash matched; only now is the
            # temporary file renamed over `obj`.
    except OSError as e:
        raise MirrorError(f"cannot store {wanted.path} as {obj}: {e}") from e
    return written


def _holds(obj: Path, target: TargetFile) -> bool:
    """Whether `obj` is a regular file of the trusted length whose sha256 matches (read
    whole: a bit flipped on disk keeps the size). A symlink is never trusted."""
    try:
        fd = os.open(obj, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            return False
        raise MirrorError(f"cannot read stored object {obj}: {e.strerror}") from e
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != target.length:
                return False
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise MirrorError(f"cannot read stored object {obj}: {e.strerror}") from e
    return digest.hexdigest() == sha256_of(target)


def sync(
    metadata_url: str,
    targets_url: str,
    directory: Path,
    trusted_root: Path,
    *,
    hardware: Sequence[str] = (),
    channel: str | None = None,
    keep: int | None = None,
    repository: Repository | None = None,
    now: dt.datetime | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    allow_example_keys: bool = False,
) -> SyncResult:
    """Refresh upstream, fetch what is new, publish a new state atomically.

    `retries`/`backoff` are `stream_target`'s in-process resume budget per image;
    `allow_example_keys` trusts a root naming a key of keys-example/ (demos, tests)."""
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep {keep}: must be at least 1")
    store = MirrorDir(directory)
    store.create()
    with store.locked():
        repo = repository or Repository(
            metadata_url,
            targets_url,
            trusted_root,
            store.tuf_cache,
            allow_example_keys=allow_example_keys,
        )
        repo.refresh()
        targets = repo.targets()
        metadata = verified_metadata(repo)
        skipped = unsafe_targets(targets)
        plan = plan_targets(targets, hardware, channel, keep)
        if not plan:
            raise ConfigError(
                f"{metadata_url}: no release for hardware {list(hardware) or 'any'} "
                f"and channel {channel or 'any'}; nothing to mirror"
            )
        result = SyncResult(state=0, skipped=skipped)
        links: dict[str, str] = {}
        for wanted in plan:
            sha = sha256_of(wanted.target)
            obj = store.object_path(sha)
            if _holds(obj, wanted.target):
                result.reused.append(wanted.path)
            else:
                if obj.exists() or obj.is_symlink():
                    logger.warning("%s does not match its sha256; downloading it again", obj)
                result.bytes_downloaded += _fetch_object(repo, store, wanted, retries, backoff)
                result.downloaded.append(wanted.path)
            links[wanted.url_path()] = sha
        rels = _release_rows(plan)
        stamp = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
        manifest = store.publish(metadata, links, tuple(rels), stamp, metadata_url)
        result.state = manifest.number
        result.releases = rels
        result.removed_objects = store.collect_garbage()
        result.expiry = expiry(metadata_files(store.current()), now)
        return result


def _release_rows(plan: Iterable[Wanted]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    indexes = {(w.hardware, w.version, w.role): w.url_path() for w in plan if w.index}
    for w in plan:
        if w.index:
            continue  # named by its image's row (exported with it), not a row itself
        row = rows.setdefault(
            (w.hardware, w.channel, w.version),
            {"hardware": w.hardware, "channel": w.channel, "version": w.version, "images": {}},
        )
        image = {"target": w.path, "file": w.url_path()}
        index = indexes.get((w.hardware, w.version, w.role))
        if index is not None:
            image["index"] = index
        row["images"][w.role] = image
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], release.parse_version(k[2])))]
