"""`[repository]` options through the agent's console script, on a simulated node
(tests/agentnode.py): the slow-retrieval limits and the example-key refusal.

The node's repository is signed with keys-example/, so its generated config says
`allow_example_keys = true`; the tests here remove that line or change a limit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.agentnode import BIN, Node, node
from tests.configedit import edited_config, one_line_error, run_updater
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import ROOT_JSON

__all__ = ["node"]


def check(config: Path, *args: str) -> dict[str, object]:
    done = run_updater("--config", config, "--json", "check", *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- example keys ---------------------------------------------------------------------


def test_a_root_of_example_keys_is_refused_without_the_option(node: Node) -> None:
    done = run_updater("--config", edited_config(node, drop=("allow_example_keys",)), "check")
    line = one_line_error(done, f"trusted root {ROOT_JSON}: names the example key keys-example/")
    assert "anyone can sign with it" in line and "allow_example_keys = true" in line
    assert done.returncode == 3
    assert node.server.requests == []  # refused before anything was fetched


def test_a_root_of_example_keys_is_trusted_with_the_option(node: Node) -> None:
    assert check(edited_config(node))["version"] == "2.0.0"


def test_a_root_of_fresh_keys_needs_no_option(node: Node, tmp_path: Path) -> None:
    """The README's first steps with `sign-release`: fresh keys, no option anywhere."""
    keys, repo = tmp_path / "keys", tmp_path / "fresh"
    roles = ("root", "targets", "snapshot", "timestamp")
    for role in roles:
        sign_release("keygen", keys / role, "--no-passphrase")
    public = [arg for role in roles for arg in (f"--{role}-key", keys / f"{role}.pub")]
    sign_release("init", repo, *public, "--sign-with", keys / "root")
    image = node.images["2.0.0"]
    sign_release(
        "add", repo, image, "--version", "2.0.0", "--hardware", "x86_64-efi",
        "--sign-with", keys / "targets",
    )  # fmt: skip
    sign_release(
        "publish", repo, "--snapshot-key", keys / "snapshot", "--timestamp-key", keys / "timestamp"
    )
    with HTTPTestServer(repo) as server:
        config = edited_config(
            node,
            drop=("allow_example_keys",),
            trusted_root=str(repo / "metadata" / "1.root.json"),
            metadata_url=f"{server.url}/metadata",
            targets_url=f"{server.url}/targets",
        )
        assert check(config)["version"] == "2.0.0"


def sign_release(*args: str | Path) -> None:
    """The real `sign-release` console script, without any example-key option."""
    argv = [str(BIN / "sign-release"), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- slow retrieval -------------------------------------------------------------------


def test_check_refuses_dripped_metadata_at_the_deadline(node: Node) -> None:
    node.server.drip("/metadata/timestamp.json", interval=0.2)
    config = edited_config(node, add="metadata_deadline = 1")
    done = run_updater("--config", config, "check")
    one_line_error(
        done,
        f"fetching {node.server.url}/metadata/timestamp.json: "
        "not received within metadata_deadline = 1 s",
    )
    assert done.returncode == 4


def test_install_refuses_an_image_below_the_minimum_rate(node: Node) -> None:
    (target,) = (p for p in (node.repo / "targets").rglob("*.img*"))
    path = "/" + str(target.relative_to(node.repo))
    node.server.drip(path, interval=0.01)
    config = edited_config(node, retries=0, add="min_rate = 4096\nrate_window = 0.5")
    done = run_updater("--config", config, "install")
    one_line_error(done, "slower than min_rate = 4096 bytes/s over rate_window = 0.5 s")
    assert done.returncode == 4
    assert node.env()["ORDER"] == "A B"  # nothing activated
