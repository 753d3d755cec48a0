"""Signing keys: generation, key files, and signers from files or private key URIs.

Key files (see docs/signing.md):

* private key `NAME`: PEM PKCS#8, encrypted with a passphrase unless generated with
  `--no-passphrase`, mode 0600;
* public key `NAME.pub`: the securesystemslib key as JSON - `SSlibKey.to_dict()` plus
  its `keyid` - exactly what goes into root metadata.

Wherever a private key is accepted, a securesystemslib private key URI is accepted too
(`hsm:2?label=tok`, `file2:/path`, `gcpkms:...`, `awskms:...`, ...). For `hsm:` the
public key is read from the token; for other schemes the key is found among the keys
the role accepts by signing a probe with each candidate.

Invariants: a private key never leaves this module except as a `Signer`; a signer is
only returned for a key the caller's role accepts (`candidates`), so nothing is ever
signed with a key the repository would not count.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib import parse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from securesystemslib.signer import (  # type: ignore[attr-defined]
    SIGNER_FOR_URI_SCHEME,
    CryptoSigner,
    HSMSigner,
    Key,
    Signer,
    SSlibKey,
)

from core.fsutil import atomic_write, makedirs_durable
from signing.errors import KeyFileError

KEY_TYPES = ("ed25519", "ecdsa-p256", "rsa-3072")
PASSPHRASE_ENV = "SIGN_RELEASE_PASSPHRASE"
PIN_ENV = "SIGN_RELEASE_PIN"
MAX_KEY_FILE = 64 * 1024  # a key file is small; refuse to read anything huge

# Asked for the passphrase of an encrypted key file: gets a description of the key,
# returns the passphrase, or None when no source has one.
PassphraseSource = Callable[[str], bytes | None]
# Asked for a token PIN (securesystemslib's SecretsHandler signature).
PinSource = Callable[[str], str]

_URI_RE = re.compile(r"^([a-z][a-z0-9+.-]*):")


def _scheme_for(private: PrivateKeyTypes) -> str:
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        return "ecdsa-sha2-nistp256"
    if isinstance(private, rsa.RSAPrivateKey):
        return "rsassa-pss-sha256"
    raise KeyFileError(f"unsupported key type {type(private).__name__}")


def generate_key(path: Path, key_type: str, passphrase: bytes | None) -> SSlibKey:
    """Write a new private key to `path` (0600) and its public key to `path.pub`."""
    pub_path = public_path(path)
    for p in (path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p}: already exists; refusing to overwrite a key")
    private: PrivateKeyTypes
    if key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa-3072":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise KeyFileError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
    if passphrase is not None and not passphrase:
        raise KeyFileError(f"{path}: empty passphrase; use --no-passphrase for no encryption")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    key = SSlibKey.from_crypto(private.public_key(), scheme=_scheme_for(private))
    if path.parent.exists() and not path.parent.is_dir():
        raise KeyFileError(f"{path}: {path.parent} is not a directory")
    if not path.parent.exists():
        # `sign-release keygen keys/root` in an empty directory: a key directory is
        # private (0700), like ~/.ssh.
        try:
            makedirs_durable(path.parent)
            os.chmod(path.parent, 0o700)
        except OSError as e:
            raise KeyFileError(f"{path}: cannot create {path.parent}: {e.strerror}") from e
    # Public key first: a crash between the two writes leaves no orphan secret.
    write_public_key(pub_path, key)
    atomic_write(path, pem, mode=0o600)
    return key


def public_path(path: Path) -> Path:
    """The `.pub` file that belongs to private key file `path`."""
    return path.with_name(path.name + ".pub")


def write_public_key(path: Path, key: Key) -> None:
    """Write `key` as `{"keyid": ..., <SSlibKey.to_dict()>}` JSON."""
    data = {"keyid": key.keyid, **key.to_dict()}
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise KeyFileError(f"{what} {path}: cannot read: {e.strerror}") from e
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{what} {path}: larger than {MAX_KEY_FILE} bytes, not a key")
    return data


def load_public_key(path: Path) -> Key:
    """Read a `.pub` file written by `write_public_key` (or by `sign-release pubkey`)."""
    data = _read_small(path, "public key")
    try:
        doc: Any = json.loads(data)
        keyid = doc.pop("keyid")
        key = Key.from_dict(str(keyid), doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        hint = " (that is a private key; give the .pub file)" if b"PRIVATE KEY" in data else ""
        raise KeyFileError(f"public key {path}: not a sign-release .pub key file{hint}") from e
    return key


def load_private_key_file(path: Path, passphrases: PassphraseSource) -> PrivateKeyTypes:
    """The private key in a PEM file, decrypted if it is encrypted."""
    data = _read_small(path, "private key")
    if b"PRIVATE KEY-----" not in data:
        hint = " (that looks like a public key)" if data.lstrip().startswith(b"{") else ""
        raise KeyFileError(f"private key {path}: not a PEM private key{hint}")
    password: bytes | None = None
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        password = passphrases(str(path))
        if password is None:
            raise KeyFileError(
                f"private key {path} is encrypted: give --passphrase-file, set "
                f"{PASSPHRASE_ENV}, or run on a terminal to be asked"
            )
    try:
        private = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as e:
        if password is not None:
            raise KeyFileError(f"private key {path}: wrong passphrase") from e
        raise KeyFileError(f"private key {path}: cannot load PEM private key") from e
    return private


def hsm_public_key(uri: str, pins: PinSource) -> SSlibKey:
    parsed = parse.urlparse(uri)
    try:
        keyid = int(parsed.path) if parsed.path else None
    except ValueError:
        raise KeyFileError(f"{uri}: the key id after 'hsm:' must be a number") from None
    label = dict(parse.parse_qsl(parsed.query)).get("label")
    if not os.environ.get("PYKCS11LIB"):
        raise KeyFileError(f"{uri}: set PYKCS11LIB to the PKCS#11 module of the token")
    try:
        _, key = HSMSigner.import_(keyid, label, pins)
    except Exception as e:
        # python-pkcs11 raises many unrelated classes; all mean "this token/key is unusable".
        raise KeyFileError(f"{uri}: cannot read the public key from the token: {e}") from e
    return key


def _why(err: BaseException) -> str:
    """A one-line reason; PKCS#11 errors often have an empty message but a telling name."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_key_uri(spec: str) -> bool:
    """Is `spec` a private key URI (`hsm:...`) rather than a key file? A file of
    that name wins."""
    match = _URI_RE.match(spec)
    return match is not None and match.group(1) in SIGNER_FOR_URI_SCHEME and not Path(spec).exists()


def load_signer(
    spec: str,
    candidates: Mapping[str, Key],
    role: str,
    passphrases: PassphraseSource,
    pins: PinSource,
) -> Signer:
    """A signer for key file or URI `spec`, whose key must be one of `candidates`."""
    if is_key_uri(spec):
        return _load_uri_signer(spec, candidates, role, pins)
    private = load_private_key_file(Path(spec), passphrases)
    keyid = SSlibKey.from_crypto(private.public_key(), scheme=_scheme_for(private)).keyid
    if keyid not in candidates:
        raise KeyFileError(f"private key {spec} (keyid {keyid[:16]}) is not a key of role {role}")
    # Use the role's own Key object, so keyid and scheme are what verifiers expect.
    return CryptoSigner(private, _as_sslib(candidates[keyid], spec))


def _as_sslib(key: Key, spec: str) -> SSlibKey:
    if not isinstance(key, SSlibKey):
        raise KeyFileError(f"{spec}: key type {type(key).__name__} is not supported")
    return key


def _load_uri_signer(uri: str, candidates: Mapping[str, Key], role: str, pins: PinSource) -> Signer:
    if uri.startswith("hsm:"):
        pub = hsm_public_key(uri, pins)
        if pub.keyid not in candidates:
            raise KeyFileError(f"{uri} (keyid {pub.keyid[:16]}) is not a key of role {role}")
        try:
            signer = Signer.from_priv_key_uri(uri, candidates[pub.keyid], pins)
            # Sign a probe now, so a wrong PIN fails before anything is written.
            probe = b"sign-release key probe"
            signer.public_key.verify_signature(signer.sign(probe), probe)
        except KeyFileError:
            raise
        except Exception as e:
            raise KeyFileError(f"{uri}: cannot sign with the token key: {_why(e)}") from e
        return signer
    # Other schemes cannot tell us their public key: try each key the role accepts.
    probe = b"sign-release key probe"
    for key in candidates.values():
        try:
            signer = Signer.from_priv_key_uri(uri, key, pins)
            key.verify_signature(signer.sign(probe), probe)
        except Exception:
            # A mismatching key fails in scheme-specific ways; it is simply not this one.
            continue
        return signer
    raise KeyFileError(f"{uri}: not usable as any key of role {role}")


def env_passphrase(what: str) -> bytes | None:
    """Passphrase source that only looks at SIGN_RELEASE_PASSPHRASE."""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value is not None else None


def env_pin(what: str) -> str:
    """PIN source that only looks at SIGN_RELEASE_PIN."""
    value = os.environ.get(PIN_ENV)
    if value is None:
        raise KeyFileError(f"the token asks for its {what}: set {PIN_ENV} or use a terminal")
    return value


@dataclass(frozen=True)
class Secrets:
    """Where passphrases of key files and PINs of tokens come from."""

    passphrases: PassphraseSource = env_passphrase
    pins: PinSource = env_pin
