"""The INSECURE example keys of keys-example/, recognised wherever keys are trusted or used.

The private halves of these keys are published in this repository, so anyone can sign
with them: a node whose trusted root names one of them trusts anyone, and a release
signed with one of them is signed by no one. The agent refuses such a trusted root and
`sign-release` refuses to sign with such a key, unless the caller says explicitly that
this is a demo or a test (the agent's `[repository] allow_example_keys = true`,
`sign-release --allow-example-keys`).

Keys are recognised by their public key value, whatever keyid or scheme a metadata file
gives them. Invariant: this set equals the public keys in keys-example/*.pub
(tests/unit/test_examplekeys.py checks it), so the installed package needs no
keys-example/ directory to recognise them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# role -> ed25519 public key (hex) of keys-example/<role>.pub
EXAMPLE_PUBLIC_KEYS: Mapping[str, str] = {
    "root": "b84aef9737b54be6d191f84e45dbdfeb21dff5934901979346baced5fca6c35c",
    "targets": "125e0606a36b928ccce9fba2c6cdb13cc432018b12f9acae8e50dc2186e83106",
    "snapshot": "29fdf0d28bed7c678883ec5823ab20050ac20e40b87ddb3615fba55728ae8e17",
    "timestamp": "996e138915854ac1a592fc3b93226e01472a316895e7cb92a718accca2e2a9c5",
}
_BY_VALUE = {value: role for role, value in EXAMPLE_PUBLIC_KEYS.items()}

WHY = (
    "its private key is published in keys-example/ for demos and tests, so anyone can sign with it"
)


def example_key_name(keyval: Any) -> str | None:
    """`keys-example/<role>` if `keyval` (a key's `keyval` mapping) is an example key."""
    if not isinstance(keyval, Mapping):
        return None
    public = keyval.get("public")
    if not isinstance(public, str):
        return None
    role = _BY_VALUE.get(public.strip().lower())
    return None if role is None else f"keys-example/{role}"


def example_keys_among(keyvals: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """(keyid, example key name) for each (keyid, keyval) that is an example key."""
    found = []
    for keyid, keyval in keyvals:
        name = example_key_name(keyval)
        if name is not None:
            found.append((keyid, name))
    return found
