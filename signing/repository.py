"""Repository operations of `sign-release`: init, add, sign, publish, timestamp, rotate.

Each operation validates everything first - keys, roles, thresholds, versions, expiry,
the image - and only then writes; so bad input leaves the repository as it was. Writes
are atomic file by file (`signing.fsutil`); `publish` writes versioned files first and
`timestamp.json` last, so a node sees either the old or the new repository.

Offline roles (root, targets) are edited in `staged/` and signed there, one signature
at a time if need be (`sign`); `publish` refuses until every staged role reaches its
threshold, then adds a new snapshot and timestamp signed with the online keys.

A release image becomes one target per hardware name: `<hardware>/<version>/<role>.img
<.zst|.xz|.gz>`, whose `custom.release.hardware` is `[<hardware>]`; the stored file is
written once and hard-linked into each hardware directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from signing.compress import COMPRESSIONS, SUFFIX, compress_stream
from signing.errors import (
    KeyFileError,
    RepositoryIOError,
    RepositoryStateError,
    SigningError,
    ThresholdError,
)
from signing.fsutil import atomic_write, fsync_dir, makedirs_durable, temp_file
from signing.keys import Secrets, load_signer
from signing.store import (
    CONFIG_FILE,
    DEFAULT_EXPIRY_DAYS,
    OFFLINE_ROLES,
    ONLINE_ROLES,
    ROLES,
    Store,
    Threshold,
    check_not_expired,
    expiry,
    role_keys,
    threshold_of,
    to_bytes,
)

# Semantic versions (semver.org 2.0.0), e.g. 1.2.0, 1.2.0-rc.1, 1.2.0+build.5.
_NUM = r"(?:0|[1-9][0-9]*)"
_PRE = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
VERSION_RE = re.compile(
    rf"^{_NUM}\.{_NUM}\.{_NUM}(?:-{_PRE}(?:\.{_PRE})*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Release:
    """One image of a release, as `add` records it."""

    image: Path
    version: str
    hardware: tuple[str, ...]
    role: str = "root"
    channel: str = "stable"
    compression: str = "zstd"

    def validate(self) -> None:
        if not VERSION_RE.match(self.version):
            raise SigningError(
                f"version {self.version!r} is not a version (expected semver like 1.2.0 "
                "or 1.2.0-rc.1)"
            )
        if not self.hardware:
            raise SigningError("give at least one --hardware")
        for what, value in [("role", self.role), ("channel", self.channel)] + [
            ("hardware", h) for h in self.hardware
        ]:
            if not NAME_RE.match(value):
                raise SigningError(
                    f"{what} {value!r}: use letters, digits, '.', '_' and '-' (max 64)"
                )
        if len(set(self.hardware)) != len(self.hardware):
            raise SigningError(f"--hardware repeated: {', '.join(self.hardware)}")
        if self.compression not in COMPRESSIONS:
            raise SigningError(
                f"compression {self.compression!r}: use one of {', '.join(COMPRESSIONS)}"
            )
        if not self.image.is_file():
            why = "no such file" if not self.image.exists() else "not a regular file"
            raise SigningError(f"image {self.image}: {why}")

    def target_path(self, hardware: str) -> str:
        return f"{hardware}/{self.version}/{self.role}.img{SUFFIX[self.compression]}"


@dataclass
class PublishResult:
    """Versions that a `publish` wrote, by role."""

    versions: dict[str, int] = field(default_factory=dict)


def _signers(
    specs: Sequence[str], keys: Mapping[str, Key], role: str, secrets: Secrets
) -> list[Signer]:
    signers = [load_signer(s, keys, role, secrets.passphrases, secrets.pins) for s in specs]
    seen: set[str] = set()
    for spec, signer in zip(specs, signers, strict=True):
        if signer.public_key.keyid in seen:
            raise SigningError(f"{spec}: the same key is given twice for role {role}")
        seen.add(signer.public_key.keyid)
    return signers


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    for signer in signers:
        try:
            md.sign(signer, append=True)
        except UnsignedMetadataError as e:
            # A token or KMS failing mid-way (PIN, session, network): name the key.
            cause = e.__cause__ or e
            reason = str(cause).strip() or type(cause).__name__
            raise KeyFileError(f"signing {md.signed.type} with key "
                               f"{signer.public_key.keyid[:16]} failed: {reason}") from e


def _check_expires(expires: Mapping[str, int], allowed: Sequence[str]) -> None:
    for role, days in expires.items():
        if role not in allowed:
            raise SigningError(f"--expires {role}=...: this command sets {', '.join(allowed)}")
        if days < 0:
            raise SigningError(f"--expires {role}={days}: days must be >= 0")


def _check_threshold(keys: Sequence[Key], threshold: int, role: str) -> None:
    if len({k.keyid for k in keys}) != len(keys):
        raise SigningError(f"role {role}: the same key is given twice")
    if not 1 <= threshold <= len(keys):
        raise ThresholdError(
            f"role {role}: threshold {threshold} needs between 1 and {len(keys)} "
            f"(the number of its keys)"
        )


def root_signing_keys(store: Store, root: Metadata[Root]) -> dict[str, Key]:
    """Keys that may sign `root`: its own root keys and, for a new version, the
    previous published root's keys (a rotation needs both thresholds)."""
    keys = role_keys(root.signed, "root")
    previous = store.published_root(root.signed.version - 1) if root.signed.version > 1 else None
    if previous is not None:
        keys.update(role_keys(previous.signed, "root"))
    return keys


def init_repository(
    path: Path,
    *,
    root_keys: Sequence[Key],
    targets_keys: Sequence[Key],
    snapshot_keys: Sequence[Key],
    timestamp_keys: Sequence[Key],
    sign_with: Sequence[str],
    root_threshold: int = 1,
    targets_threshold: int = 1,
    expires: Mapping[str, int] | None = None,
    secrets: Secrets | None = None,
) -> None:
    """Create a repository: staged root v1 (signed with `sign_with`) and empty targets v1."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    _check_expires(expires, ROLES)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RepositoryStateError(f"{path}: exists and is not an empty directory")
    if not path.parent.is_dir():
        raise RepositoryStateError(f"{path}: parent directory does not exist")
    given = {"root": root_keys, "targets": targets_keys, "snapshot": snapshot_keys,
             "timestamp": timestamp_keys}
    thresholds = {"root": root_threshold, "targets": targets_threshold}
    root = Root(expires=expiry(expires.get("root", DEFAULT_EXPIRY_DAYS["root"])),
                consistent_snapshot=True)
    for role, keys in given.items():
        _check_threshold(keys, thresholds.get(role, 1), role)
        for key in keys:
            root.add_key(key, role)
        root.roles[role].threshold = thresholds.get(role, 1)
    root_md = Metadata(root)
    if not sign_with:
        raise SigningError("init needs at least one --sign-with root key")
    _sign(root_md, _signers(sign_with, role_keys(root, "root"), "root", secrets))
    days = expires.get("targets", DEFAULT_EXPIRY_DAYS["targets"])
    _create(path, root_md, Metadata(Targets(expires=expiry(days))), expires)


def _create(path: Path, root_md: Metadata[Root], targets_md: Metadata[Targets],
            expires: Mapping[str, int]) -> None:
    # Later versions take their default expiry from here (see Store.expiry_days).
    config = {"expires": dict(expires)}
    created = not path.exists()
    try:
        for sub in ("metadata", "targets", "staged"):
            makedirs_durable(path / sub)
        atomic_write(path / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        atomic_write(path / "staged" / "root.json", to_bytes(root_md))
        atomic_write(path / "staged" / "targets.json", to_bytes(targets_md))
    except OSError as e:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise RepositoryIOError(f"{path}: cannot create repository: {e.strerror}") from e


def init_from_root(path: Path, root_json: Path, *, expires: Mapping[str, int] | None = None
                   ) -> None:
    """Create a repository around an existing root v1 (e.g. from a key ceremony, or
    keys-example/root.json): it must be signed to its own threshold."""
    expires = dict(expires or {})
    _check_expires(expires, ("targets", "snapshot", "timestamp"))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RepositoryStateError(f"{path}: exists and is not an empty directory")
    try:
        root_md: Metadata[Root] = Metadata.from_bytes(root_json.read_bytes())
    except OSError as e:
        raise SigningError(f"root {root_json}: cannot read: {e.strerror}") from e
    except DeserializationError as e:
        raise SigningError(f"root {root_json}: not TUF metadata: {e}") from e
    if root_md.signed.type != "root" or root_md.signed.version != 1:
        raise SigningError(f"root {root_json}: must be root metadata version 1")
    result = root_md.signed.get_root_verification_result(
        None, root_md.signed_bytes, root_md.signatures)
    if not result.verified:
        raise ThresholdError(f"root {root_json}: not signed to its own threshold")
    if not root_md.signed.consistent_snapshot:
        raise SigningError(f"root {root_json}: consistent_snapshot must be true")
    days = expires.get("targets", DEFAULT_EXPIRY_DAYS["targets"])
    _create(path, root_md, Metadata(Targets(expires=expiry(days))), expires)


def add_release(
    path: Path,
    release: Release,
    sign_with: Sequence[str],
    *,
    expires_days: int | None = None,
    secrets: Secrets | None = None,
) -> list[TargetFile]:
    """Compress `release.image` into the repository and stage it in targets metadata."""
    secrets = secrets or Secrets()
    release.validate()
    if expires_days is not None and expires_days < 0:
        raise SigningError(f"--expires {expires_days}: days must be >= 0")
    with Store(path) as store:
        root = store.current_root()
        signers = _signers(sign_with, role_keys(root.signed, "targets"), "targets", secrets)
        if not signers:
            raise SigningError("add needs at least one --sign-with targets key")
        targets, _ = store.editable("targets", expires_days)
        published = store.published_targets()
        published_paths = set(published.signed.targets) if published else set()
        for hw in release.hardware:
            for tpath, tf in targets.signed.targets.items():
                info = (tf.custom or {}).get("release", {})
                if (tpath == release.target_path(hw) or (
                        info.get("version") == release.version and info.get("role") == release.role
                        and hw in info.get("hardware", []))):
                    where = "published" if tpath in published_paths else "staged"
                    raise RepositoryStateError(
                        f"version {release.version} of role {release.role} for hardware {hw} "
                        f"is already {where} ({tpath}); versions are immutable, use a new one"
                    )
        # Compression changes the content: every earlier signature becomes invalid.
        targets.signatures.clear()
        if expires_days is None:
            targets.signed.expires = expiry(store.expiry_days("targets"))
        created: list[Path] = []
        try:
            files = _store_image(store, release, created)
            for tf in files:
                targets.signed.targets[tf.path] = tf
            _sign(targets, signers)
            store.write_staged(targets)
        except BaseException:
            for p in created:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return files


def _store_image(store: Store, release: Release, created: list[Path]) -> list[TargetFile]:
    """Compress the image once, then link it into each hardware's target directory."""
    try:
        with release.image.open("rb") as src, temp_file(store.targets_dir) as (dst, tmp):
            raw_size = os.fstat(src.fileno()).st_size
            stored = compress_stream(src, dst, release.compression, raw_size)
            dst.flush()
            os.fsync(dst.fileno())
            files = []
            for hw in release.hardware:
                tpath = release.target_path(hw)
                directory, name = os.path.split(tpath)
                final = store.targets_dir / directory / f"{stored.sha256}.{name}"
                makedirs_durable(final.parent)
                if not final.exists():
                    os.link(tmp, final)
                    created.append(final)
                    fsync_dir(final.parent)
                custom = {"release": {
                    "version": release.version, "hardware": [hw], "channel": release.channel,
                    "role": release.role, "compression": release.compression,
                    "raw_length": stored.raw_length, "raw_sha256": stored.raw_sha256,
                }}
                files.append(TargetFile(stored.length, {"sha256": stored.sha256}, tpath,
                                        {"custom": custom}))
            return files
    except OSError as e:
        raise RepositoryIOError(f"adding {release.image}: {e.strerror or e}") from e


def sign_role(
    path: Path,
    role: str,
    sign_with: Sequence[str],
    *,
    expires_days: int | None = None,
    secrets: Secrets | None = None,
) -> Threshold:
    """Add signatures to staged `role`; with nothing staged, stage a new version (new
    expiry) of the published one first. Returns where the role stands afterwards."""
    secrets = secrets or Secrets()
    if role not in OFFLINE_ROLES:
        raise SigningError(
            f"role {role!r}: sign root or targets here; snapshot and timestamp are signed "
            "by `publish` and `timestamp`"
        )
    if not sign_with:
        raise SigningError("give at least one --sign-with key")
    if expires_days is not None and expires_days < 0:
        raise SigningError(f"--expires {expires_days}: days must be >= 0")
    with Store(path) as store:
        md, _ = store.editable(role, expires_days)
        check_not_expired(md, f"staged {role}")
        root = md if role == "root" else store.current_root()
        keys = root_signing_keys(store, root) if role == "root" else role_keys(
            root.signed, role)
        _sign(md, _signers(sign_with, keys, role, secrets))
        store.write_staged(md)
        return threshold_of(root.signed, role, md)


def _require_threshold(store: Store, root: Metadata[Root], role: str,
                       md: Metadata[Any]) -> None:
    version = md.signed.version
    if role == "root":
        previous = store.published_root(version - 1) if version > 1 else None
        prev_signed = previous.signed if previous is not None else None
        result = root.signed.get_root_verification_result(
            prev_signed, md.signed_bytes, md.signatures)
        if not result.verified:
            parts = [f"{r.missing} more from the keys of root v{v} (has {len(r.signed)} of "
                     f"{r.threshold})" for r, v in ((result.first, version - 1),
                                                    (result.second, version)) if r.missing]
            if result.first is result.second or version == 1:
                parts = parts[:1]
            raise ThresholdError(
                f"root v{version} lacks signatures: needs {'; '.join(parts)}; "
                f"add them with `sign-release sign REPO root --sign-with KEY`")
        return
    t = threshold_of(root.signed, role, md)
    if t.missing:
        hint = (f"; add them with `sign-release sign REPO {role} --sign-with KEY`"
                if role in OFFLINE_ROLES else "")
        raise ThresholdError(
            f"{role} v{version} has {len(t.signed)} of {t.threshold} signatures needed "
            f"from its keys in root v{root.signed.version}, lacks {t.missing}{hint}")


def publish(
    path: Path,
    snapshot_keys: Sequence[str],
    timestamp_keys: Sequence[str],
    *,
    expires: Mapping[str, int] | None = None,
    secrets: Secrets | None = None,
) -> PublishResult:
    """Publish staged root/targets (if signed to threshold) with a new snapshot and
    timestamp."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    _check_expires(expires, ONLINE_ROLES)
    with Store(path) as store:
        root = store.current_root()
        staged_root = store.staged("root")
        targets = store.staged("targets") or store.published_targets()
        if targets is None:
            raise RepositoryStateError(f"{path}: no targets metadata to publish")
        for role, md in (("root", root), ("targets", targets)):
            check_not_expired(md, role)
            _require_threshold(store, root, role, md)
        snap_signers = _signers(snapshot_keys, role_keys(root.signed, "snapshot"),
                                "snapshot", secrets)
        ts_signers = _signers(timestamp_keys, role_keys(root.signed, "timestamp"),
                              "timestamp", secrets)
        old_snapshot = store.published_snapshot()
        snapshot = Metadata(Snapshot(
            version=old_snapshot.signed.version + 1 if old_snapshot else 1,
            expires=expiry(expires.get("snapshot", store.expiry_days("snapshot"))),
            meta={"targets.json": MetaFile(targets.signed.version)},
        ))
        _sign(snapshot, snap_signers)
        _require_threshold(store, root, "snapshot", snapshot)
        timestamp = _new_timestamp(store, snapshot, expires.get("timestamp",
                                                                store.expiry_days("timestamp")))
        _sign(timestamp, ts_signers)
        _require_threshold(store, root, "timestamp", timestamp)
        staged_targets = store.staged("targets") is not None
        if staged_root is not None:
            store.write_published(staged_root)
        if staged_targets:
            store.write_published(targets)
        store.write_published(snapshot)
        store.write_published(timestamp)  # last: it makes the new versions visible
        for role in OFFLINE_ROLES:
            store.drop_staged(role)
        return PublishResult({"root": root.signed.version, "targets": targets.signed.version,
                              "snapshot": snapshot.signed.version,
                              "timestamp": timestamp.signed.version})


def _new_timestamp(store: Store, snapshot: Metadata[Snapshot],
                   days: int) -> Metadata[Timestamp]:
    old = store.published_timestamp()
    meta = MetaFile.from_data(snapshot.signed.version, to_bytes(snapshot), ["sha256"])
    return Metadata(Timestamp(
        version=old.signed.version + 1 if old else 1,
        expires=expiry(days),
        snapshot_meta=meta,
    ))


def refresh_timestamp(
    path: Path,
    timestamp_keys: Sequence[str],
    *,
    expires: Mapping[str, int] | None = None,
    secrets: Secrets | None = None,
) -> int:
    """Re-sign the timestamp (new version and expiry) for the published snapshot.
    Needs only the timestamp key; returns the new timestamp version."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    _check_expires(expires, ("timestamp",))
    with Store(path) as store:
        root = store.published_root()
        snapshot = store.published_snapshot()
        old = store.published_timestamp()
        if root is None or snapshot is None or old is None:
            raise RepositoryStateError(f"{path}: nothing published yet; run `publish` first")
        check_not_expired(snapshot, "published snapshot")
        signers = _signers(timestamp_keys, role_keys(root.signed, "timestamp"),
                           "timestamp", secrets)
        timestamp = Metadata(Timestamp(
            version=old.signed.version + 1,
            expires=expiry(expires.get("timestamp", store.expiry_days("timestamp"))),
            snapshot_meta=old.signed.snapshot_meta,
        ))
        _sign(timestamp, signers)
        _require_threshold(store, root, "timestamp", timestamp)
        store.write_published(timestamp)
        return timestamp.signed.version


def rotate(
    path: Path,
    role: str,
    *,
    add_keys: Sequence[Key] = (),
    remove_keyids: Sequence[str] = (),
    threshold: int | None = None,
    sign_with: Sequence[str] = (),
    expires_days: int | None = None,
    secrets: Secrets | None = None,
) -> Threshold:
    """Stage a new root that changes `role`'s keys (and threshold), signed with
    `sign_with`. When the keys of targets change, targets is staged too, to be
    re-signed by its new keys. Returns where the staged root stands."""
    secrets = secrets or Secrets()
    if role not in ROLES:
        raise SigningError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if not (add_keys or remove_keyids or threshold is not None):
        raise SigningError("rotate needs --add-key, --remove-key or --threshold")
    with Store(path) as store:
        root, _ = store.editable("root", expires_days)
        root.signatures.clear()
        signed = root.signed
        current = set(signed.roles[role].keyids)
        for kid in remove_keyids:
            matches = [k for k in current if k.startswith(kid)] if len(kid) >= 8 else []
            if len(matches) != 1:
                raise SigningError(f"--remove-key {kid}: not {'a' if not matches else 'one'} "
                                   f"key of role {role}")
            signed.revoke_key(matches[0], role)
            current.discard(matches[0])
        for key in add_keys:
            if key.keyid in current:
                raise SigningError(f"--add-key {key.keyid[:16]}: already a key of role {role}")
            signed.add_key(key, role)
            current.add(key.keyid)
        if threshold is not None:
            signed.roles[role].threshold = threshold
        new_threshold = signed.roles[role].threshold
        if not 1 <= new_threshold <= len(current):
            raise ThresholdError(f"role {role}: threshold {new_threshold} needs between 1 and "
                                 f"{len(current)} keys (it would have {len(current)})")
        signers = _signers(sign_with, root_signing_keys(store, root), "root", secrets)
        _sign(root, signers)
        staged_targets = None
        if role == "targets" and (add_keys or remove_keyids):
            staged_targets, _ = store.editable("targets", None)
            kept = set(signed.roles["targets"].keyids)
            for kid in list(staged_targets.signatures):
                if kid not in kept:
                    del staged_targets.signatures[kid]
        store.write_staged(root)
        if staged_targets is not None:
            store.write_staged(staged_targets)
        return threshold_of(signed, "root", root)
