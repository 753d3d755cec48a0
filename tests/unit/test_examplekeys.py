"""The example-key set compiled into the package is exactly keys-example/*.pub."""

from __future__ import annotations

import json

from core.examplekeys import EXAMPLE_PUBLIC_KEYS, example_key_name, example_keys_among
from tests.signing_helpers import KEYS_DIR


def test_compiled_set_matches_keys_example() -> None:
    on_disk = {
        p.stem: json.loads(p.read_text())["keyval"]["public"] for p in KEYS_DIR.glob("*.pub")
    }
    assert on_disk == dict(EXAMPLE_PUBLIC_KEYS)


def test_recognised_by_value_whatever_the_keyid() -> None:
    root = json.loads((KEYS_DIR / "root.json").read_text())["signed"]
    found = example_keys_among((kid, key["keyval"]) for kid, key in root["keys"].items())
    assert sorted(name for _, name in found) == [
        "keys-example/root",
        "keys-example/snapshot",
        "keys-example/targets",
        "keys-example/timestamp",
    ]
    upper = {"public": EXAMPLE_PUBLIC_KEYS["targets"].upper()}
    assert example_key_name(upper) == "keys-example/targets"
    assert example_key_name({"public": "00" * 32}) is None
    assert example_key_name("not a mapping") is None
    assert example_key_name({"public": 5}) is None
