"""An in-memory TUF repository that is itself an ngclient fetcher (tests only).

Modelled on python-tuf's tests/repository_simulator.py: the metadata objects are plain
attributes a test mutates (`sim.timestamp.version = 1`), every fetch is signed at fetch
time with the current signers and recorded in `sim.fetches`, so an attack is a few
lines: mutate, refresh, assert the error, assert the client cache is unchanged.

Like python-tuf's simulator, a versioned request (`3.snapshot.json`) is answered with
the *current* metadata whatever its version: that is what lets tests serve a
mismatched or rolled-back version. `write_to()` lays the repository out on disk in the
consistent-snapshot layout, to be served by tests/httpserver.py.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib import parse

from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    TOP_LEVEL_ROLE_NAMES,
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient.fetcher import FetcherInterface

from core import release

HOST = "http://reposim.invalid"
METADATA_URL = f"{HOST}/metadata/"
TARGETS_URL = f"{HOST}/targets/"


def release_custom(
    version: str,
    *,
    role: str = "root",
    hardware: tuple[str, ...] = ("x86_64-generic",),
    channel: str = "stable",
    compression: str = "none",
    raw: bytes = b"image",
    rollout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `custom` field of a release image (the schema's `core.release.build_custom`,
    unchecked, so a test may describe what nodes refuse); `raw` is the image content it
    describes, `rollout` its plan (`RolloutPlan.to_custom()`, or anything to refuse)."""
    return release.build_custom(
        version=version,
        hardware=hardware,
        channel=channel,
        role=role,
        compression=compression,
        raw_length=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        rollout=rollout,
    )


class RepositorySimulator(FetcherInterface):
    """Top-level roles with one ed25519 key each, consistent snapshots by default."""

    def __init__(self, *, consistent_snapshot: bool = True) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        self.safe_expiry = now + timedelta(days=30)
        self.past = now - timedelta(days=1)
        self.signers: dict[str, dict[str, Signer]] = {}
        self.signed_roots: list[bytes] = []
        self.root = Root(expires=self.safe_expiry, consistent_snapshot=consistent_snapshot)
        self.timestamp = Timestamp(expires=self.safe_expiry)
        self.snapshot = Snapshot(expires=self.safe_expiry)
        self.targets = Targets(expires=self.safe_expiry)
        self.delegated: dict[str, Targets] = {}  # delegated role name -> its targets
        self.target_files: dict[str, bytes] = {}
        # What is served for a target path, when it differs from the signed content.
        self.served_override: dict[str, bytes] = {}
        # role -> bytes of whitespace appended to the served metadata ("endless data").
        self.padding: dict[str, int] = {}
        self.fetches: list[str] = []
        for role in TOP_LEVEL_ROLE_NAMES:
            self.add_key(role)
        self.publish_root()

    # --- keys and signing ------------------------------------------------------

    def add_key(self, role: str) -> CryptoSigner:
        """A new key for a top-level role, listed in root and used for signing."""
        signer = CryptoSigner.generate_ed25519()
        self.root.add_key(signer.public_key, role)
        self.signers.setdefault(role, {})[signer.public_key.keyid] = signer
        return signer

    def rotate_key(self, role: str) -> None:
        """Replace every key of `role` in root (publish a new root afterwards)."""
        for keyid in list(self.root.roles[role].keyids):
            self.root.revoke_key(keyid, role)
        self.signers[role] = {}
        self.add_key(role)

    def publish_root(self, *, extra_signers: tuple[Signer, ...] = ()) -> None:
        """Sign the current root (version as set) and make it fetchable."""
        md = Metadata(self.root)
        for signer in (*self.signers[Root.type].values(), *extra_signers):
            md.sign(signer, append=True)
        self.signed_roots.append(md.to_bytes(JSONSerializer()))

    def next_root(self) -> None:
        """Bump root's version and publish it."""
        self.root.version += 1
        self.publish_root()

    def signed_bytes(self, role: str) -> bytes:
        md: Metadata[Timestamp] | Metadata[Snapshot] | Metadata[Targets]
        if role == Timestamp.type:
            md = Metadata(self.timestamp)
        elif role == Snapshot.type:
            md = Metadata(self.snapshot)
        else:
            md = Metadata(self.delegated.get(role, self.targets))
        for signer in self.signers[role].values():
            md.sign(signer, append=True)
        return md.to_bytes(JSONSerializer()) + b" " * self.padding.get(role, 0)

    # --- publishing ------------------------------------------------------------

    def update_timestamp(self) -> None:
        self.timestamp.snapshot_meta = MetaFile(version=self.snapshot.version)
        self.timestamp.version += 1

    def update_snapshot(self) -> None:
        self.snapshot.meta["targets.json"] = MetaFile(version=self.targets.version)
        for name, delegated in self.delegated.items():
            self.snapshot.meta[f"{name}.json"] = MetaFile(version=delegated.version)
        self.snapshot.version += 1
        self.update_timestamp()

    def add_target(self, path: str, data: bytes, custom: dict[str, Any] | None = None) -> None:
        """List a target in top-level targets (call `publish_targets` afterwards)."""
        info = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            info.unrecognized_fields["custom"] = custom
        self.targets.targets[path] = info
        self.target_files[path] = data

    def add_delegation(self, name: str, paths: list[str]) -> None:
        """Delegate `paths` (glob patterns) from top-level targets to a new role."""
        if self.targets.delegations is None:
            self.targets.delegations = Delegations(keys={}, roles={})
        assert self.targets.delegations.roles is not None
        self.targets.delegations.roles[name] = DelegatedRole(name, [], 1, False, paths)
        signer = CryptoSigner.generate_ed25519()
        self.targets.add_key(signer.public_key, name)
        self.signers[name] = {signer.public_key.keyid: signer}
        self.delegated[name] = Targets(expires=self.safe_expiry)

    def add_delegated_target(
        self, role: str, path: str, data: bytes, custom: dict[str, Any] | None = None
    ) -> None:
        """List a target in a delegated role (whatever its allowed paths say)."""
        info = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            info.unrecognized_fields["custom"] = custom
        self.delegated[role].targets[path] = info
        self.delegated[role].version += 1
        self.target_files[path] = data

    def _info(self, path: str) -> TargetFile:
        for role in (self.targets, *self.delegated.values()):
            if path in role.targets:
                return role.targets[path]
        raise KeyError(path)

    def publish_targets(self) -> None:
        self.targets.version += 1
        self.update_snapshot()

    def stored_target_path(self, path: str) -> str:
        """Where a target's bytes live: `<dir>/<sha256>.<basename>` when consistent."""
        if not self.root.consistent_snapshot:
            return path
        return release.served_path(path, self._info(path).hashes["sha256"])

    # --- FetcherInterface ------------------------------------------------------

    def _fetch(self, url: str) -> Any:
        path = parse.unquote(parse.urlsplit(url).path)
        self.fetches.append(path)
        if path.startswith("/metadata/") and path.endswith(".json"):
            return iter([self._metadata(path[len("/metadata/") : -len(".json")])])
        if path.startswith("/targets/"):
            return iter([self._target(path[len("/targets/") :])])
        raise DownloadHTTPError(f"unknown path {path}", 404)

    def _metadata(self, name: str) -> bytes:
        version_text, dot, role = name.partition(".")
        if not (dot and version_text.isdigit()):
            role = name
        if role == Root.type:
            version = int(version_text) if version_text.isdigit() else len(self.signed_roots)
            if not 1 <= version <= len(self.signed_roots):
                raise DownloadHTTPError(f"no root version {version}", 404)
            return self.signed_roots[version - 1] + b" " * self.padding.get("root", 0)
        if role not in (Timestamp.type, Snapshot.type, Targets.type, *self.delegated):
            raise DownloadHTTPError(f"unknown role {role}", 404)
        return self.signed_bytes(role)

    def _target(self, stored: str) -> bytes:
        for path in self.target_files:
            if self.stored_target_path(path) == stored:
                return self.served_override.get(path, self.target_files[path])
        raise DownloadHTTPError(f"unknown target {stored}", 404)

    # --- on disk ---------------------------------------------------------------

    def write_to(self, directory: Path) -> None:
        """The repository in the consistent-snapshot layout: metadata/ and targets/."""
        meta = directory / "metadata"
        meta.mkdir(parents=True, exist_ok=True)
        for version, data in enumerate(self.signed_roots, start=1):
            (meta / f"{version}.root.json").write_bytes(data)
        (meta / "timestamp.json").write_bytes(self.signed_bytes(Timestamp.type))
        prefix = self.root.consistent_snapshot
        roles = [(Snapshot.type, self.snapshot.version), (Targets.type, self.targets.version)]
        roles += [(name, d.version) for name, d in self.delegated.items()]
        for role, version in roles:
            name = f"{version}.{role}.json" if prefix else f"{role}.json"
            (meta / name).write_bytes(self.signed_bytes(role))
        for path, data in self.target_files.items():
            out = directory / "targets" / self.stored_target_path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(self.served_override.get(path, data))
