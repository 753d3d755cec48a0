"""Key files and signers: generation per type, encryption, the .pub format, and the rule
that a signer is only built for a key the role accepts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from securesystemslib.signer import Key, SSlibKey  # type: ignore[attr-defined]

from signing.errors import KeyFileError
from signing.keys import (
    KEY_TYPES,
    generate_key,
    load_private_key_file,
    load_public_key,
    load_signer,
)


def no_pin(what: str) -> str:
    raise AssertionError("no PIN expected")


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_generated_key_files(tmp_path: Path, key_type: str) -> None:
    key = generate_key(tmp_path / "k", key_type, b"pw")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    doc = json.loads((tmp_path / "k.pub").read_text())
    assert doc["keyid"] == key.keyid
    loaded = load_public_key(tmp_path / "k.pub")
    assert loaded == key
    # The keyid is the one securesystemslib computes for that public key.
    private = load_private_key_file(tmp_path / "k", lambda _: b"pw")
    assert SSlibKey.from_crypto(private.public_key(), scheme=key.scheme).keyid == key.keyid
    signer = load_signer(str(tmp_path / "k"), {key.keyid: key}, "targets", lambda _: b"pw", no_pin)
    sig = signer.sign(b"payload")
    key.verify_signature(sig, b"payload")
    assert sig.keyid == key.keyid


def test_unencrypted_key(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", "ed25519", None)
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # No passphrase is asked for a plain key.
    load_private_key_file(tmp_path / "k", lambda _: pytest.fail("asked for a passphrase"))


def test_passphrase_errors(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", "ecdsa-p256", b"right")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key_file(tmp_path / "k", lambda _: b"wrong")
    with pytest.raises(KeyFileError, match="is encrypted: give --passphrase-file"):
        load_private_key_file(tmp_path / "k", lambda _: None)
    with pytest.raises(KeyFileError, match="empty passphrase"):
        generate_key(tmp_path / "k2", "ed25519", b"")


def test_refuses_to_overwrite_or_misplace(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", "ed25519", None)
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(tmp_path / "k", "ed25519", None)
    assert (tmp_path / "k").read_bytes() == before
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(KeyFileError, match="is not a directory"):
        generate_key(tmp_path / "file" / "k", "ed25519", None)
    with pytest.raises(KeyFileError, match="unknown key type"):
        generate_key(tmp_path / "x", "dsa", None)


def test_a_missing_key_directory_is_created_private(tmp_path: Path) -> None:
    generate_key(tmp_path / "keys" / "root", "ed25519", None)
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "keys" / "root").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "root.pub").exists()


def test_public_and_private_files_are_told_apart(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", "ed25519", None)
    with pytest.raises(KeyFileError, match="that is a private key"):
        load_public_key(tmp_path / "k")
    with pytest.raises(KeyFileError, match="looks like a public key"):
        load_private_key_file(tmp_path / "k.pub", lambda _: None)
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(KeyFileError, match=r"not a sign-release \.pub"):
        load_public_key(tmp_path / "junk")
    (tmp_path / "big").write_bytes(b"x" * 100_000)
    with pytest.raises(KeyFileError, match="not a key"):
        load_public_key(tmp_path / "big")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_public_key(tmp_path)


def test_signer_only_for_a_key_of_the_role(tmp_path: Path) -> None:
    a = generate_key(tmp_path / "a", "ed25519", None)
    b = generate_key(tmp_path / "b", "ed25519", None)
    role: dict[str, Key] = {b.keyid: b}
    with pytest.raises(KeyFileError, match=rf"keyid {a.keyid[:16]}\) is not a key of role root"):
        load_signer(str(tmp_path / "a"), role, "root", lambda _: None, no_pin)


def test_private_key_uri_is_matched_against_the_role(tmp_path: Path) -> None:
    # file2: URIs go through securesystemslib's Signer.from_priv_key_uri; the key is
    # found among the role's keys by a probe signature.
    a = generate_key(tmp_path / "a", "ecdsa-p256", None)
    b = generate_key(tmp_path / "b", "ecdsa-p256", None)
    signer = load_signer(
        f"file2:{tmp_path / 'b'}", {a.keyid: a, b.keyid: b}, "targets", lambda _: None, no_pin
    )
    assert signer.public_key.keyid == b.keyid
    with pytest.raises(KeyFileError, match="not usable as any key of role targets"):
        load_signer(f"file2:{tmp_path / 'b'}", {a.keyid: a}, "targets", lambda _: None, no_pin)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyFileError, match="PYKCS11LIB"):
        mp.delenv("PYKCS11LIB", raising=False)
        load_signer("hsm:2", {a.keyid: a}, "targets", lambda _: None, no_pin)
