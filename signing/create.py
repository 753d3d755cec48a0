"""Creating a repository: `init` from keys, or around an existing signed root v1.

Invariants: every check (keys, thresholds, signatures, the target directory being
absent or empty, no INSECURE example key trusted or signing unless `allow_example_keys`)
passes before the first byte is written; a repository that could
not be completely created is removed again if this call created its directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from securesystemslib.signer import Key  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError

from core.fsutil import atomic_write, makedirs_durable
from signing.errors import RepositoryIOError, RepositoryStateError, SigningError, ThresholdError
from signing.keys import Secrets
from signing.roles import (
    check_expires,
    check_threshold,
    check_trusted_keys,
    load_signers,
    sign_all,
)
from signing.store import CONFIG_FILE, DEFAULT_EXPIRY_DAYS, ROLES, expiry, role_keys, to_bytes


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
    allow_example_keys: bool = False,
) -> None:
    """Create a repository: staged root v1 (signed with `sign_with`) and empty targets v1.
    Example keys (keys-example/) may be trusted or sign only with `allow_example_keys`."""
    secrets = secrets or Secrets()
    expires = dict(expires or {})
    check_expires(expires, ROLES)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RepositoryStateError(f"{path}: exists and is not an empty directory")
    if not path.parent.is_dir():
        raise RepositoryStateError(f"{path}: parent directory does not exist")
    given = {
        "root": root_keys,
        "targets": targets_keys,
        "snapshot": snapshot_keys,
        "timestamp": timestamp_keys,
    }
    thresholds = {"root": root_threshold, "targets": targets_threshold}
    root = Root(
        expires=expiry(expires.get("root", DEFAULT_EXPIRY_DAYS["root"])), consistent_snapshot=True
    )
    for role, keys in given.items():
        check_threshold(keys, thresholds.get(role, 1), role)
        check_trusted_keys({k.keyid: k for k in keys}, f"{role} key", allow_example_keys)
        for key in keys:
            root.add_key(key, role)
        root.roles[role].threshold = thresholds.get(role, 1)
    root_md = Metadata(root)
    if not sign_with:
        raise SigningError("init needs at least one --sign-with root key")
    signers = load_signers(
        sign_with,
        role_keys(root, "root"),
        "root",
        secrets,
        allow_example_keys=allow_example_keys,
    )
    sign_all(root_md, signers)
    days = expires.get("targets", DEFAULT_EXPIRY_DAYS["targets"])
    _create(path, root_md, Metadata(Targets(expires=expiry(days))), expires)


def _create(
    path: Path, root_md: Metadata[Root], targets_md: Metadata[Targets], expires: Mapping[str, int]
) -> None:
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


def init_from_root(
    path: Path,
    root_json: Path,
    *,
    expires: Mapping[str, int] | None = None,
    allow_example_keys: bool = False,
) -> None:
    """Create a repository around an existing root v1 (e.g. from a key ceremony, or
    keys-example/root.json - that one only with `allow_example_keys`): it must be
    signed to its own threshold."""
    expires = dict(expires or {})
    check_expires(expires, ("targets", "snapshot", "timestamp"))
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
        None, root_md.signed_bytes, root_md.signatures
    )
    if not result.verified:
        raise ThresholdError(f"root {root_json}: not signed to its own threshold")
    if not root_md.signed.consistent_snapshot:
        raise SigningError(f"root {root_json}: consistent_snapshot must be true")
    check_trusted_keys(root_md.signed.keys, f"root {root_json}: key", allow_example_keys)
    days = expires.get("targets", DEFAULT_EXPIRY_DAYS["targets"])
    _create(path, root_md, Metadata(Targets(expires=expiry(days))), expires)
