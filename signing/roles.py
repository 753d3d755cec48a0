"""Signing a role: which keys count for it, loading signers, and threshold checks.

Invariants: a signer is only ever built for a key the role accepts in the root that
will be in force (for a new root: its own keys or the previous root's); thresholds
are counted by python-tuf (`get_verification_result` / `get_root_verification_result`),
never by hand; no signer is returned for an INSECURE example key of keys-example/
(recognised by its public key value, `core.examplekeys`) unless the caller says this
is a demo or test (`allow_example_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]

from core.examplekeys import WHY, example_key_name
from signing.errors import ExampleKeyError, KeyFileError, SigningError, ThresholdError
from signing.keys import Secrets, is_key_uri, load_signer
from signing.store import OFFLINE_ROLES, Store, role_keys, threshold_of

ALLOW_EXAMPLE_KEYS_ENV = "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS"


def check_example_key(what: str, key: Key, allow_example_keys: bool) -> None:
    """Refuse `key` (described by `what`) if it is an example key, unless allowed."""
    name = example_key_name(key.keyval)
    if name is not None and not allow_example_keys:
        raise ExampleKeyError(
            f"{what} is the example key {name}: {WHY}; give --allow-example-keys "
            f"(or {ALLOW_EXAMPLE_KEYS_ENV}=1) only for a demo or test"
        )


def check_trusted_keys(keys: Mapping[str, Key], what: str, allow_example_keys: bool) -> None:
    """Refuse to make a root trust an example key: anyone could sign for that role."""
    for keyid, key in keys.items():
        check_example_key(f"{what} {keyid[:16]}", key, allow_example_keys)


def load_signers(
    specs: Sequence[str],
    keys: Mapping[str, Key],
    role: str,
    secrets: Secrets,
    *,
    allow_example_keys: bool,
) -> list[Signer]:
    signers = [load_signer(s, keys, role, secrets.passphrases, secrets.pins) for s in specs]
    seen: set[str] = set()
    for spec, signer in zip(specs, signers, strict=True):
        # A key file or a URI: name it as the user gave it.
        what = f"{'key' if is_key_uri(spec) else 'private key'} {spec}"
        check_example_key(what, signer.public_key, allow_example_keys)
        if signer.public_key.keyid in seen:
            raise SigningError(f"{spec}: the same key is given twice for role {role}")
        seen.add(signer.public_key.keyid)
    return signers


def sign_all(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    for signer in signers:
        try:
            md.sign(signer, append=True)
        except UnsignedMetadataError as e:
            # A token or KMS failing mid-way (PIN, session, network): name the key.
            cause = e.__cause__ or e
            reason = str(cause).strip() or type(cause).__name__
            raise KeyFileError(
                f"signing {md.signed.type} with key {signer.public_key.keyid[:16]} failed: {reason}"
            ) from e


def check_expires(expires: Mapping[str, int], allowed: Sequence[str]) -> None:
    for role, days in expires.items():
        if role not in allowed:
            raise SigningError(f"--expires {role}=...: this command sets {', '.join(allowed)}")
        if days < 0:
            raise SigningError(f"--expires {role}={days}: days must be >= 0")


def check_threshold(keys: Sequence[Key], threshold: int, role: str) -> None:
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


def require_threshold(store: Store, root: Metadata[Root], role: str, md: Metadata[Any]) -> None:
    version = md.signed.version
    if role == "root":
        previous = store.published_root(version - 1) if version > 1 else None
        prev_signed = previous.signed if previous is not None else None
        result = root.signed.get_root_verification_result(
            prev_signed, md.signed_bytes, md.signatures
        )
        if not result.verified:
            # Root v1 is checked against itself only; later ones also against v(N-1).
            checks = [(result.second, version)]
            if version > 1:
                checks.insert(0, (result.first, version - 1))
            parts = [
                f"{r.missing} more from the keys of root v{v} (has {len(r.signed)} of "
                f"{r.threshold})"
                for r, v in checks
                if r.missing
            ]
            raise ThresholdError(
                f"root v{version} lacks signatures: needs {'; '.join(parts)}; "
                f"add them with `sign-release sign REPO root --sign-with KEY`"
            )
        return
    t = threshold_of(root.signed, role, md)
    if t.missing:
        hint = (
            f"; add them with `sign-release sign REPO {role} --sign-with KEY`"
            if role in OFFLINE_ROLES
            else ""
        )
        raise ThresholdError(
            f"{role} v{version} has {len(t.signed)} of {t.threshold} signatures needed "
            f"from its keys in root v{root.signed.version}, lacks {t.missing}{hint}"
        )
