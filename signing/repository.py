"""Repository operations of `sign-release`: add, sign, publish, timestamp, rotate
(creating one is `signing.create`).

Each operation validates everything first - keys, roles, thresholds, versions, expiry,
the image - and only then writes; so bad input leaves the repository as it was. A
release is refused unless a node would install it: `add` signs only a custom it parsed
back with the node's own parser (`core.release`, the release schema). The INSECURE
keys of keys-example/ sign, or are added to a root, only with `allow_example_keys=True`
(demos and tests; `signing.roles`). Writes are atomic file by file (`core.fsutil`);
`publish` writes versioned files first and `timestamp.json` last, so a node sees either
the old or the new repository; a publish killed half-way is completed by the next
command (`signing.store`).

Offline roles (root, targets) are edited in `staged/` and signed there, one signature
at a time if need be (`sign`); `publish` refuses until every staged role reaches its
threshold, then adds a new snapshot and timestamp signed with the online keys.

A release image becomes one target per hardware name (`core.release.target_path`:
`<hardware>/<version>/<role>.img<.zst|.xz|.gz>`), whose `custom.release.hardware` is
`[<hardware>]`, and `custom.rollout` its plan if it has one (`signing.rollout`, which
also keeps published targets immutable but for that plan); the stored file is written
once and hard-linked into each hardware directory, at the path a consistent-snapshot
repository serves (`core.release.served_path`). A zstd image is seekable and comes
with its chunk index (`signing.compress`, `core.chunkindex`), listed as a target of its
own (`core.release.index_path`) and named by the image's `custom.release.index`, so a
node can fetch only the frames it does not hold (docs/delta.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from securesystemslib.signer import Key  # type: ignore[attr-defined]
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Snapshot,
    TargetFile,
    Timestamp,
)

from core.fsutil import fsync_dir, makedirs_durable, temp_file
from core.release import (
    FieldError,
    ReleaseFields,
    RolloutPlan,
    build_custom,
    index_path,
    served_path,
    target_path,
)
from signing.compress import StoredImage, compress_stream
from signing.errors import (
    RepositoryIOError,
    RepositoryStateError,
    SigningError,
    ThresholdError,
)
from signing.failpoints import failpoint
from signing.keys import Secrets
from signing.roles import (
    check_expires,
    check_trusted_keys,
    load_signers,
    require_threshold,
    root_signing_keys,
    sign_all,
)
from signing.rollout import add_plans, check_only_plans_changed
from signing.store import (
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

# A stand-in raw_sha256 while only the image's size is known: a valid value, so the
# check before compressing refuses exactly what the final custom would be refused for.
_UNKNOWN_SHA256 = "0" * 64
# The `sign-release add` option that sets each release field.
_OPTIONS = {
    "version": "--version",
    "hardware": "--hardware",
    "channel": "--channel",
    "role": "--role",
    "compression": "--compress",
}


@dataclass(frozen=True)
class Release:
    """One image of a release, as `add` records it."""

    image: Path
    version: str
    hardware: tuple[str, ...]
    role: str = "root"
    channel: str = "stable"
    compression: str = "zstd"
    rollout: RolloutPlan | None = None  # `--waves`; None: keep the version's plan

    def validate(self) -> None:
        """Refuse anything a node would not install: each target `add` would sign is
        built (with the image's size) and parsed back with the node's own parser
        (`core.release.ReleaseFields.from_target`), so what `add` accepts is what a
        node accepts, by construction. One line names the option and the rule."""
        if not self.hardware:
            raise SigningError("give at least one --hardware")
        if len(set(self.hardware)) != len(self.hardware):
            raise SigningError(f"--hardware repeated: {', '.join(self.hardware)}")
        if not self.image.is_file():
            why = "no such file" if not self.image.exists() else "not a regular file"
            raise SigningError(f"image {self.image}: {why}")
        size = self.image.stat().st_size
        for hw in self.hardware:
            stored = StoredImage(size, _UNKNOWN_SHA256, 0, _UNKNOWN_SHA256)
            self.target_file(hw, stored, self.rollout)

    def target_file(
        self, hardware: str, stored: StoredImage, rollout: RolloutPlan | None
    ) -> TargetFile:
        """The target `add` signs for `hardware` with plan `rollout`, once the node's
        parser accepted it."""
        custom = build_custom(
            version=self.version,
            hardware=[hardware],
            channel=self.channel,
            role=self.role,
            compression=self.compression,
            raw_length=stored.raw_length,
            raw_sha256=stored.raw_sha256,
            rollout=None if rollout is None else rollout.to_custom(),
            index=None if stored.index is None else self.index_path(hardware),
        )
        try:
            path = ReleaseFields.from_custom(custom).target_path(hardware)
            target = TargetFile(stored.length, {"sha256": stored.sha256}, path, {"custom": custom})
            ReleaseFields.from_target(target.path, target)
        except FieldError as e:
            if e.field in _OPTIONS:
                raise SigningError(e.named(_OPTIONS[e.field])) from e
            raise SigningError(f"image {self.image}: {e}") from e
        return target

    def target_path(self, hardware: str) -> str:
        return target_path(hardware, self.version, self.role, self.compression)

    def index_path(self, hardware: str) -> str:
        return index_path(hardware, self.version, self.role)


@dataclass
class PublishResult:
    """Versions that a `publish` wrote, by role."""

    versions: dict[str, int] = field(default_factory=dict)


def add_release(
    path: Path,
    release: Release,
    sign_with: Sequence[str],
    *,
    expires_days: int | None = None,
    secrets: Secrets | None = None,
    allow_example_keys: bool = False,
) -> list[TargetFile]:
    """Compress `release.image` into the repository and stage it in targets metadata."""
    secrets = secrets or Secrets()
    release.validate()
    if expires_days is not None and expires_days < 0:
        raise SigningError(f"--expires {expires_days}: days must be >= 0")
    with Store(path) as store:
        root = store.current_root()
        signers = load_signers(
            sign_with,
            role_keys(root.signed, "targets"),
            "targets",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        if not signers:
            raise SigningError("add needs at least one --sign-with targets key")
        targets, _ = store.editable("targets", expires_days)
        published = store.published_targets()
        published_paths = set(published.signed.targets) if published else set()
        for hw in release.hardware:
            for tpath, tf in targets.signed.targets.items():
                if tpath == release.target_path(hw) or _same_image(tpath, tf, release, hw):
                    where = "published" if tpath in published_paths else "staged"
                    raise RepositoryStateError(
                        f"version {release.version} of role {release.role} for hardware {hw} "
                        f"is already {where} ({tpath}); versions are immutable, use a new one"
                    )
        plans = add_plans(
            targets.signed.targets, release.hardware, release.version, release.rollout
        )
        # Compression changes the content: every earlier signature becomes invalid.
        targets.signatures.clear()
        if expires_days is None:
            targets.signed.expires = expiry(store.expiry_days("targets"))
        created: list[Path] = []
        try:
            files = _store_image(store, release, created, plans)
            for tf in files:
                targets.signed.targets[tf.path] = tf
            sign_all(targets, signers)
            store.write_staged(targets)
        except BaseException:
            for p in created:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return files


def _same_image(path: str, target: TargetFile, release: Release, hardware: str) -> bool:
    """Whether a listed target is the image of `release`'s version and role for `hardware`
    (as a node reads it: a target a node skips is no release)."""
    try:
        fields = ReleaseFields.from_target(path, target)
    except ValueError:
        return False
    return (
        fields.version.text == release.version
        and fields.role == release.role
        and hardware in fields.hardware
    )


def _store_image(
    store: Store,
    release: Release,
    created: list[Path],
    plans: Mapping[str, RolloutPlan | None],
) -> list[TargetFile]:
    """Compress the image once, then link it into each hardware's target directory."""
    try:
        with release.image.open("rb") as src, temp_file(store.targets_dir) as (dst, tmp):
            raw_size = os.fstat(src.fileno()).st_size
            stored = compress_stream(src, dst, release.compression, raw_size)
            # Parsed again with what was really read (the image may have changed).
            files = [release.target_file(hw, stored, plans[hw]) for hw in release.hardware]
            # Targets are public (every node and mirror reads them): world-readable, as
            # metadata is, so a web server's unprivileged worker can serve the tree.
            os.fchmod(dst.fileno(), 0o644)
            dst.flush()
            os.fsync(dst.fileno())
            failpoint("add-compressed")
            _link_each(store, tmp, [(tf.path, stored.sha256) for tf in files], created)
            if stored.index is not None:
                files += _store_index(store, release, stored.index, created)
            failpoint("add-linked")
            return files
    except OSError as e:
        raise RepositoryIOError(f"adding {release.image}: {e.strerror or e}") from e


def _link_each(
    store: Store, tmp: Path, paths: Sequence[tuple[str, str]], created: list[Path]
) -> None:
    """Hard-link the written file `tmp` at each (target path, sha256)'s served path."""
    for tpath, digest in paths:
        final = store.targets_dir / served_path(tpath, digest)
        makedirs_durable(final.parent)
        if not final.exists():
            os.link(tmp, final)
            created.append(final)
            fsync_dir(final.parent)


def _store_index(
    store: Store, release: Release, index: bytes, created: list[Path]
) -> list[TargetFile]:
    """Write the chunk index once, link it per hardware; its targets (no custom: an
    index is no image, `core.release.is_index_path`)."""
    digest = hashlib.sha256(index).hexdigest()
    files = [
        TargetFile(len(index), {"sha256": digest}, release.index_path(hw))
        for hw in release.hardware
    ]
    with temp_file(store.targets_dir) as (dst, tmp):
        dst.write(index)
        os.fchmod(dst.fileno(), 0o644)
        dst.flush()
        os.fsync(dst.fileno())
        _link_each(store, tmp, [(tf.path, digest) for tf in files], created)
    return files


def sign_role(
    path: Path,
    role: str,
    sign_with: Sequence[str],
    *,
    expires_days: int | None = None,
    secrets: Secrets | None = None,
    allow_example_keys: bool = False,
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
        keys = root_signing_keys(store, root) if role == "root" else role_keys(root.signed, role)
        sign_all(
            md, load_signers(sign_with, keys, role, secrets, allow_example_keys=allow_example_keys)
        )
        store.write_staged(md)
        return threshold_of(root.signed, role, md)


def publish(
    path: Path,
    snapshot_keys: Sequence[str],
    timestamp_keys: Sequence[str],
    *,
    expires: Mapping[str, int] | None = None,
    secrets: Secrets | None = None,
    allow_example_keys: bool = False,
) -> PublishResult:
    """Publish staged root/targets (if signed to threshold) with a new snapshot and
    timestamp."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    check_expires(expires, ONLINE_ROLES)
    with Store(path) as store:
        root = store.current_root()
        staged_root = store.staged("root")
        targets = store.staged("targets") or store.published_targets()
        if targets is None:
            raise RepositoryStateError(f"{path}: no targets metadata to publish")
        for role, md in (("root", root), ("targets", targets)):
            check_not_expired(md, role)
            require_threshold(store, root, role, md)
        snap_signers = load_signers(
            snapshot_keys,
            role_keys(root.signed, "snapshot"),
            "snapshot",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        ts_signers = load_signers(
            timestamp_keys,
            role_keys(root.signed, "timestamp"),
            "timestamp",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        old_snapshot = store.published_snapshot()
        snapshot = Metadata(
            Snapshot(
                version=old_snapshot.signed.version + 1 if old_snapshot else 1,
                expires=expiry(expires.get("snapshot", store.expiry_days("snapshot"))),
                meta={"targets.json": MetaFile(targets.signed.version)},
            )
        )
        sign_all(snapshot, snap_signers)
        require_threshold(store, root, "snapshot", snapshot)
        timestamp = _new_timestamp(
            store, snapshot, expires.get("timestamp", store.expiry_days("timestamp"))
        )
        sign_all(timestamp, ts_signers)
        require_threshold(store, root, "timestamp", timestamp)
        staged_targets = store.staged("targets") is not None
        if staged_targets:
            check_only_plans_changed(store.published_targets(), targets)
        # In this order: timestamp.json last, as it makes the new versions visible.
        writes = [staged_root] if staged_root is not None else []
        writes += [targets] if staged_targets else []
        writes += [snapshot, timestamp]
        for md in writes:
            store.check_publishable(md)
        for md in writes:
            store.write_published(md)
        store.drop_staged("root")
        failpoint("publish-dropped-root")
        store.drop_staged("targets")
        return PublishResult(
            {
                "root": root.signed.version,
                "targets": targets.signed.version,
                "snapshot": snapshot.signed.version,
                "timestamp": timestamp.signed.version,
            }
        )


def _new_timestamp(store: Store, snapshot: Metadata[Snapshot], days: int) -> Metadata[Timestamp]:
    old = store.published_timestamp()
    meta = MetaFile.from_data(snapshot.signed.version, to_bytes(snapshot), ["sha256"])
    return Metadata(
        Timestamp(
            version=old.signed.version + 1 if old else 1,
            expires=expiry(days),
            snapshot_meta=meta,
        )
    )


def refresh_timestamp(
    path: Path,
    timestamp_keys: Sequence[str],
    *,
    expires: Mapping[str, int] | None = None,
    secrets: Secrets | None = None,
    allow_example_keys: bool = False,
) -> int:
    """Re-sign the timestamp (new version and expiry) for the published snapshot.
    Needs only the timestamp key; returns the new timestamp version."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    check_expires(expires, ("timestamp",))
    with Store(path) as store:
        root = store.published_root()
        snapshot = store.published_snapshot()
        old = store.published_timestamp()
        if root is None or snapshot is None or old is None:
            raise RepositoryStateError(f"{path}: nothing published yet; run `publish` first")
        check_not_expired(snapshot, "published snapshot")
        signers = load_signers(
            timestamp_keys,
            role_keys(root.signed, "timestamp"),
            "timestamp",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        timestamp = Metadata(
            Timestamp(
                version=old.signed.version + 1,
                expires=expiry(expires.get("timestamp", store.expiry_days("timestamp"))),
                snapshot_meta=old.signed.snapshot_meta,
            )
        )
        sign_all(timestamp, signers)
        require_threshold(store, root, "timestamp", timestamp)
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
    allow_example_keys: bool = False,
) -> Threshold:
    """Stage a new root that changes `role`'s keys (and threshold), signed with
    `sign_with`. When the keys of targets change, targets is staged too, to be
    re-signed by its new keys. Returns where the staged root stands."""
    secrets = secrets or Secrets()
    if role not in ROLES:
        raise SigningError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if not (add_keys or remove_keyids or threshold is not None):
        raise SigningError("rotate needs --add-key, --remove-key or --threshold")
    check_trusted_keys({k.keyid: k for k in add_keys}, "--add-key", allow_example_keys)
    with Store(path) as store:
        root, _ = store.editable("root", expires_days)
        root.signatures.clear()
        signed = root.signed
        current = set(signed.roles[role].keyids)
        for kid in remove_keyids:
            matches = [k for k in current if k.startswith(kid)] if len(kid) >= 8 else []
            if len(matches) != 1:
                raise SigningError(
                    f"--remove-key {kid}: not {'a' if not matches else 'one'} key of role {role}"
                )
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
            raise ThresholdError(
                f"role {role}: threshold {new_threshold} needs between 1 and "
                f"{len(current)} keys (it would have {len(current)})"
            )
        signers = load_signers(
            sign_with,
            root_signing_keys(store, root),
            "root",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        sign_all(root, signers)
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
