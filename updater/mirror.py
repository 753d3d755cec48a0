"""`update-mirror`: verified sync, verify, export and expiry report of an air-gapped mirror.

The mirror holds no keys. It runs the agent's own TUF path (`updater.repository.
Repository`, python-tuf ngclient) against upstream into a private cache, copies the
metadata bytes ngclient verified and persisted, streams each chosen image through
`Repository.stream_target` (trusted length and hashes, Range resume) into the object
store, and publishes a new state atomically (`updater.mirror_store`).

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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api.metadata import Metadata, TargetFile  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError

from updater import release
from updater.errors import ConfigError
from updater.fsutil import atomic_write, fsync_dir
from updater.mirror_store import MirrorDir, MirrorError, MirrorRejected
from updater.repository import Repository, TargetRejected

Key = tuple[str, str]  # (hardware, role)


@dataclass(frozen=True)
class Wanted:
    """One mirrored image: its target path, release fields and trusted TargetFile."""

    path: str
    target: TargetFile
    hardware: str
    channel: str
    role: str
    version: str

    def url_path(self) -> str:
        """Where the image is below targets/ in a consistent-snapshot repository."""
        dirname, sep, basename = self.path.rpartition("/")
        return f"{dirname}{sep}{sha256_of(self.target)}.{basename}"


def sha256_of(target: TargetFile) -> str:
    digest = target.hashes.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise TargetRejected(f"target {target.path} has no sha256 hash; the mirror needs one")
    return digest.lower()


def _pairs(targets: Mapping[str, TargetFile]) -> set[tuple[str, str]]:
    """(hardware, channel) pairs named by targets; validation is left to release.releases."""
    pairs: set[tuple[str, str]] = set()
    for target in targets.values():
        rel = target.custom.get("release") if isinstance(target.custom, dict) else None
        if not isinstance(rel, dict) or not isinstance(rel.get("channel"), str):
            continue
        hardware = rel.get("hardware")
        if isinstance(hardware, list):
            pairs.update((hw, rel["channel"]) for hw in hardware if isinstance(hw, str))
    return pairs


def plan_targets(
    targets: Mapping[str, TargetFile],
    hardware: Sequence[str] = (),
    channel: str | None = None,
    keep: int | None = None,
) -> list[Wanted]:
    """The images to mirror. Pure.

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
                wanted = Wanted(image.path, image.target, hw, ch, role, rel.version)
                by_key.setdefault((hw, role), []).append(wanted)
                if rel is rels[-1]:
                    newest.append(wanted)
    for items in by_key.values():
        items.sort(key=lambda w: release.parse_version(w.version))
        for w in items if keep is None else items[-keep:]:
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
    bytes_downloaded: int = 0
    releases: list[dict[str, Any]] = field(default_factory=list)
    expiry: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fetch_object(
    repo: Repository, store: MirrorDir, wanted: Wanted, retries: int, backoff: float
) -> int:
    """Stream one target into the object store; returns bytes written."""
    sha = sha256_of(wanted.target)
    fd, tmp = tempfile.mkstemp(dir=store.partial, prefix=f"{sha}.")
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in repo.stream_target(wanted.target, retries=retries, backoff=backoff):
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        # stream_target returned: length and every hash matched.
        os.rename(tmp, store.object_path(sha))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


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
) -> SyncResult:
    """Refresh upstream, fetch what is new, publish a new state atomically.

    `retries`/`backoff` are `stream_target`'s in-process resume budget per image."""
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep {keep}: must be at least 1")
    store = MirrorDir(directory)
    store.create()
    with store.locked():
        repo = repository or Repository(metadata_url, targets_url, trusted_root, store.tuf_cache)
        repo.refresh()
        targets = repo.targets()
        metadata = verified_metadata(repo)
        plan = plan_targets(targets, hardware, channel, keep)
        if not plan:
            raise ConfigError(
                f"{metadata_url}: no release for hardware {list(hardware) or 'any'} "
                f"and channel {channel or 'any'}; nothing to mirror"
            )
        result = SyncResult(state=0)
        links: dict[str, str] = {}
        for wanted in plan:
            sha = sha256_of(wanted.target)
            obj = store.object_path(sha)
            if obj.exists() and obj.stat().st_size == wanted.target.length:
                result.reused.append(wanted.path)
            else:
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
    for w in plan:
        row = rows.setdefault(
            (w.hardware, w.channel, w.version),
            {"hardware": w.hardware, "channel": w.channel, "version": w.version, "images": {}},
        )
        row["images"][w.role] = {"target": w.path, "file": w.url_path()}
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], release.parse_version(k[2])))]


def metadata_files(state: Path) -> dict[str, Path]:
    """The newest served file of each role in a state's metadata/ (by version prefix)."""
    best: dict[str, tuple[int, Path]] = {}
    for p in (state / "metadata").iterdir():
        version, _, rest = p.name.partition(".")
        if version.isdigit():
            role, n = rest[: -len(".json")], int(version)
        elif p.name == "timestamp.json":
            role, n = "timestamp", 0
        else:
            continue
        if role not in best or n > best[role][0]:
            best[role] = (n, p)
    return {role: p for role, (_, p) in sorted(best.items())}


def expiry(files: Mapping[str, Path], now: dt.datetime | None = None) -> dict[str, dict[str, Any]]:
    """{role: {version, expires, days_left}} of served metadata (a report, not a check)."""
    now = now or dt.datetime.now(dt.UTC)
    report: dict[str, dict[str, Any]] = {}
    for role, path in files.items():
        try:
            signed = Metadata.from_bytes(path.read_bytes()).signed
        except OSError as e:
            raise MirrorError(f"cannot read {path}: {e.strerror}") from e
        except DeserializationError as e:
            raise MirrorRejected(f"{path}: not TUF metadata: {e}") from e
        left = signed.expires - now
        report[role] = {
            "version": signed.version,
            "expires": signed.expires.isoformat(timespec="seconds"),
            "days_left": round(left.total_seconds() / 86400, 1),
        }
    return report


def verify(directory: Path, trusted_root: Path) -> dict[str, Any]:
    """Verify the served state as a node would: a fresh ngclient over file:// from
    `trusted_root`, then every image the state serves against the trusted metadata."""
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    with tempfile.TemporaryDirectory(prefix="update-mirror-verify-") as cache:
        repo = Repository(
            f"file://{state}/metadata", f"file://{state}/targets", trusted_root, Path(cache)
        )
        repo.refresh()
        targets = repo.targets()
        checked = 0
        for row in manifest.releases:
            for image in row["images"].values():
                if image["target"] not in targets:
                    raise MirrorRejected(
                        f"{state}: {image['target']} is not in the trusted targets metadata"
                    )
                target = repo.get_targetinfo(image["target"])
                for _ in repo.stream_target(target, retries=0):
                    pass
                checked += 1
    return {
        "state": manifest.number,
        "images_verified": checked,
        "releases": list(manifest.releases),
        "expiry": expiry(metadata_files(state)),
    }


EXPORT_README = """\
Update medium exported by update-mirror
=======================================

This disk holds a signed update repository (metadata/ and targets/) copied from a
verified mirror. It holds no keys: every node verifies it against the root.json in
its own OS image, exactly as it verifies its online update server.

To update a node:

    mount -o ro LABEL=UPDATES /mnt        # or whichever device this disk is
    updater install --from /mnt
    umount /mnt

Releases on this disk:
{releases}
Metadata expiry (days left when exported on {date}):
{expiry}
A node refuses expired metadata: use this disk before the timestamp expires, or ask
for a fresh export.
"""


def export(
    directory: Path, dest: Path, hardware: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Copy the current state's metadata and the chosen images, and a README, to `dest`.

    Images are hashed while copied and compared with their sha256 name; every file is
    written temp + fsync + rename, the metadata last and `timestamp.json` very last.
    """
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    rows = [
        r
        for r in manifest.releases
        if (hardware is None or r["hardware"] == hardware)
        and (version is None or r["version"] == version)
    ]
    if not rows:
        raise ConfigError(
            f"{directory}: no mirrored release matches hardware "
            f"{hardware or 'any'} and version {version or 'any'}"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MirrorError(f"cannot create {dest}: {e.strerror}") from e
    copied = 0
    for url_path in sorted({i["file"] for r in rows for i in r["images"].values()}):
        copied += _copy_verified(state / "targets" / url_path, dest / "targets" / url_path)
    meta = sorted((state / "metadata").iterdir(), key=lambda p: p.name == "timestamp.json")
    for p in meta:
        _copy_verified(p, dest / "metadata" / p.name)
    report = expiry(metadata_files(state))
    text = EXPORT_README.format(
        releases="".join(
            f"  {r['hardware']}  {r['channel']}  {r['version']}  "
            f"({', '.join(sorted(r['images']))})\n"
            for r in rows
        ),
        date=dt.datetime.now(dt.UTC).date().isoformat(),
        expiry="".join(
            f"  {role:10} {e['days_left']:>7} days (until {e['expires']})\n"
            for role, e in report.items()
        ),
    )
    _write_new(dest / "README.txt", text.encode())
    return {"dest": str(dest), "releases": rows, "bytes": copied, "expiry": report}


def _copy_verified(src: Path, dest: Path) -> int:
    """Copy src -> dest atomically; an image's sha256 must match its name's prefix."""
    expect = src.name.split(".", 1)[0] if src.parent.name != "metadata" else None
    h = hashlib.sha256()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        try:
            with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if expect is not None and h.hexdigest() != expect:
                raise MirrorRejected(f"{src}: sha256 {h.hexdigest()} does not match its name")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(dest.parent)
        return dest.stat().st_size
    except OSError as e:
        raise MirrorError(f"cannot copy {src} to {dest}: {e}") from e


def _write_new(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as e:
        raise MirrorError(f"cannot write {path}: {e.strerror}") from e


def status(directory: Path) -> dict[str, Any]:
    """The current state, its releases and each role's days left (unverified read)."""
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    return {
        "state": manifest.number,
        "synced_at": manifest.synced_at,
        "upstream": manifest.upstream,
        "releases": list(manifest.releases),
        "expiry": expiry(metadata_files(state)),
    }
