"""Bad input to `sign-release`: one clear line on stderr, a non-zero exit, no traceback,
and the repository byte-for-byte as it was (every file hashed before and after)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.release import COMPRESSIONS
from signing.cli import cli
from signing.create import init_repository
from signing.keys import generate_key, load_public_key
from signing.repository import Release, add_release, publish
from tests.signing_helpers import tree_digest, write_image

PASS = "s3cret passphrase"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published repository (1.0.0 for x86_64-efi) with an encrypted targets key."""
    d = tmp_path_factory.mktemp("base")
    keys = d / "keys"
    keys.mkdir()
    for role in ("root", "snapshot", "timestamp", "other"):
        generate_key(keys / role, "ed25519", None)
    generate_key(keys / "targets", "ed25519", PASS.encode())
    (d / "pass").write_text(PASS + "\n")
    (d / "wrongpass").write_text("not it\n")
    pub = {
        r: [load_public_key(keys / f"{r}.pub")]
        for r in ("root", "targets", "snapshot", "timestamp")
    }
    repo = d / "repo"
    init_repository(
        repo,
        root_keys=pub["root"],
        targets_keys=pub["targets"],
        snapshot_keys=pub["snapshot"],
        timestamp_keys=pub["timestamp"],
        sign_with=[str(keys / "root")],
    )
    os.environ["SIGN_RELEASE_PASSPHRASE"] = PASS
    try:
        add_release(
            repo,
            Release(write_image(d / "img", 20_000), "1.0.0", ("x86_64-efi",)),
            [str(keys / "targets")],
        )
    finally:
        del os.environ["SIGN_RELEASE_PASSPHRASE"]
    publish(repo, [str(keys / "snapshot")], [str(keys / "timestamp")])
    return d


@pytest.fixture
def env(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base directory: keys/, repo/, img, pass, wrongpass."""
    monkeypatch.delenv("SIGN_RELEASE_PASSPHRASE", raising=False)
    shutil.copytree(base, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def fails(args: Sequence[str | Path], exit_code: int, *needles: str) -> str:
    """Run the CLI in-process; assert one error line, the exit code, no traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="sign-release")
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sign-release: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def unchanged(args: Sequence[str | Path], exit_code: int, *needles: str) -> str:
    before = tree_digest(Path("repo"))
    line = fails(args, exit_code, *needles)
    assert tree_digest(Path("repo")) == before
    return line


ADD = ["add", "repo", "img", "--version", "1.1.0", "--hardware", "x86_64-efi"]


def test_wrong_passphrase(env: Path) -> None:
    unchanged(
        [*ADD, "--sign-with", "keys/targets", "--passphrase-file", "wrongpass"],
        2,
        "keys/targets",
        "wrong passphrase",
    )


def test_encrypted_key_without_any_passphrase_source(env: Path) -> None:
    unchanged([*ADD, "--sign-with", "keys/targets"], 2, "encrypted", "--passphrase-file")


def test_missing_key_file(env: Path) -> None:
    unchanged([*ADD, "--sign-with", "keys/nope"], 2, "keys/nope", "no such file")


def test_key_of_another_role(env: Path) -> None:
    unchanged(
        [*ADD, "--sign-with", "keys/snapshot"], 2, "keys/snapshot", "not a key of role targets"
    )


def test_unknown_key(env: Path) -> None:
    unchanged(
        ["publish", "repo", "--snapshot-key", "keys/other", "--timestamp-key", "keys/timestamp"],
        2,
        "keys/other",
        "not a key of role snapshot",
    )


def test_public_key_given_as_private_key(env: Path) -> None:
    unchanged([*ADD, "--sign-with", "keys/root.pub"], 2, "not a PEM private key")


def test_private_key_given_as_public_key(env: Path, tmp_path: Path) -> None:
    fails(
        [
            "init",
            tmp_path / "new",
            "--root-key",
            "keys/root",
            "--targets-key",
            "keys/targets.pub",
            "--snapshot-key",
            "keys/snapshot.pub",
            "--timestamp-key",
            "keys/timestamp.pub",
            "--sign-with",
            "keys/root",
        ],
        2,
        "private key",
    )
    assert not (tmp_path / "new").exists()


def test_image_path_missing(env: Path) -> None:
    unchanged(
        [
            "add",
            "repo",
            "missing.img",
            "--version",
            "1.1.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            "keys/targets",
            "--passphrase-file",
            "pass",
        ],
        2,
        "image missing.img",
        "no such file",
    )


def test_version_already_published(env: Path) -> None:
    unchanged(
        [
            "add",
            "repo",
            "img",
            "--version",
            "1.0.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            "keys/targets",
            "--passphrase-file",
            "pass",
        ],
        2,
        "1.0.0",
        "x86_64-efi",
        "already published",
    )


def add_args(image: str = "img", **fields: str) -> list[str]:
    """`add` of `image` with `fields` (version, hardware, role, channel) overriding a
    valid release, signed with the (encrypted) targets key."""
    values = {"version": "1.1.0", "hardware": "x86_64-efi", **fields}
    args = ["add", "repo", image]
    for name, value in values.items():
        args += [f"--{name}", value]
    return [*args, "--sign-with", "keys/targets", "--passphrase-file", "pass"]


# Everything a node would not install (core.release's rules) is refused by `add`.
BAD_VERSIONS = ["1.2", "v1.2.0", "1.2.0-", "01.2.0", "1.0", "01.0.0", "latest", ""]
BAD_VERSIONS += ["1.2.0+build.5", "1.0.0-rc.1+exp", "3.0.1\n", "3.0.1\r", " 3.0.1", "1.2.0/x"]


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_version_that_nodes_refuse(env: Path, version: str) -> None:
    unchanged(add_args(version=version), 2, "--version", repr(version), "MAJOR.MINOR.PATCH[-PRE]")


@pytest.mark.parametrize("role", ["ROOT", "Root", "root.img", "root.fs", "1root", "a/b", "root\n"])
def test_role_that_nodes_refuse(env: Path, role: str) -> None:
    unchanged(add_args(role=role), 2, "--role", repr(role), "a lowercase letter")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hardware", "x86_64-efi\n"),
        ("hardware", "../etc"),
        ("hardware", "a/b"),
        ("hardware", ".hidden"),
        ("hardware", "x" * 65),
        ("channel", "stable\n"),
        ("channel", ""),
        ("channel", "a b"),
    ],
)
def test_hardware_or_channel_name_refused(env: Path, field: str, value: str) -> None:
    unchanged(add_args(**{field: value}), 2, f"--{field} {value!r}", "letters, digits")


def test_empty_image_refused(env: Path) -> None:
    Path("empty.img").write_bytes(b"")
    unchanged(add_args("empty.img"), 2, "image empty.img", "empty", "raw_length")


def test_target_paths_follow_the_node_rule(tmp_path: Path) -> None:
    """Whatever passes validate() makes target paths that release.check_target_path
    accepts (the one rule the agent and mirror apply to signed paths)."""
    from core.release import check_target_path

    image = tmp_path / "img"
    image.write_bytes(b"x")
    tried = 0
    for hw in ("a", "a..b", "A.1", "x_-.", "9" * 64):
        for version in ("0.0.0", "1.2.3-rc.1", "10.0.0-x-y.0"):
            for compression in COMPRESSIONS:
                release = Release(image, version, (hw,), "boot_2", "c", compression)
                release.validate()
                assert check_target_path(release.target_path(hw)) == release.target_path(hw)
                tried += 1
    assert tried == 60


def test_expired_role_when_signing(env: Path) -> None:
    # Stage targets that expire at once, then try to add a signature to them.
    result = CliRunner().invoke(
        cli, [*ADD, "--expires", "0", "--sign-with", "keys/targets", "--passphrase-file", "pass"]
    )
    assert result.exit_code == 0, result.stderr
    unchanged(
        ["sign", "repo", "targets", "--sign-with", "keys/targets", "--passphrase-file", "pass"],
        2,
        "staged targets v2 expired",
    )
    unchanged(
        ["publish", "repo", "--snapshot-key", "keys/snapshot", "--timestamp-key", "keys/timestamp"],
        2,
        "targets v2 expired",
    )


@pytest.mark.parametrize("make", ["missing", "empty", "file", "other"])
def test_directory_that_is_not_a_repository(env: Path, make: str) -> None:
    target = env / "notrepo"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    elif make == "other":
        (target / "metadata").mkdir(parents=True)
        (target / "README").write_text("x")
    before = tree_digest(env)
    fails(
        [
            "add",
            target,
            "img",
            "--version",
            "1.1.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            "keys/targets",
            "--passphrase-file",
            "pass",
        ],
        2,
        "notrepo",
        "repository",
    )
    fails(["status", target], 2, "notrepo")
    fails(
        ["publish", target, "--snapshot-key", "keys/snapshot", "--timestamp-key", "keys/timestamp"],
        2,
        "notrepo",
    )
    assert tree_digest(env) == before


def test_init_refuses_an_existing_repository(env: Path) -> None:
    unchanged(
        [
            "init",
            "repo",
            "--root-key",
            "keys/root.pub",
            "--targets-key",
            "keys/targets.pub",
            "--snapshot-key",
            "keys/snapshot.pub",
            "--timestamp-key",
            "keys/timestamp.pub",
            "--sign-with",
            "keys/root",
        ],
        2,
        "not an empty directory",
    )


def test_init_with_impossible_threshold(env: Path, tmp_path: Path) -> None:
    fails(
        [
            "init",
            tmp_path / "new",
            "--root-key",
            "keys/root.pub",
            "--root-threshold",
            "2",
            "--targets-key",
            "keys/targets.pub",
            "--snapshot-key",
            "keys/snapshot.pub",
            "--timestamp-key",
            "keys/timestamp.pub",
            "--sign-with",
            "keys/root",
        ],
        2,
        "threshold 2",
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("expires", ["root", "root=x", "bogus=3", "root=-1"])
def test_bad_expires(env: Path, tmp_path: Path, expires: str) -> None:
    fails(
        [
            "init",
            tmp_path / "new",
            "--root-key",
            "keys/root.pub",
            "--targets-key",
            "keys/targets.pub",
            "--snapshot-key",
            "keys/snapshot.pub",
            "--timestamp-key",
            "keys/timestamp.pub",
            "--expires",
            expires,
            "--sign-with",
            "keys/root",
        ],
        2,
        "--expires",
    )
    assert not (tmp_path / "new").exists()


def test_keygen_refuses_to_overwrite(env: Path) -> None:
    before = tree_digest(env / "keys")
    fails(["keygen", "keys/root", "--no-passphrase"], 2, "already exists")
    fails(["keygen", "keys/new"], 2, "no passphrase")
    assert tree_digest(env / "keys") == before


def test_publish_without_threshold_names_the_role(env: Path) -> None:
    # Stage targets signed by nobody: publish must say which role lacks how many.
    result = CliRunner().invoke(
        cli, [*ADD, "--sign-with", "keys/targets", "--passphrase-file", "pass"]
    )
    assert result.exit_code == 0
    staged = Path("repo/staged/targets.json")
    import json

    doc = json.loads(staged.read_text())
    doc["signatures"] = []
    staged.write_text(json.dumps(doc))
    unchanged(
        ["publish", "repo", "--snapshot-key", "keys/snapshot", "--timestamp-key", "keys/timestamp"],
        2,
        "targets v2 has 0 of 1",
        "lacks 1",
    )


def test_bad_input_through_the_console_script(env: Path) -> None:
    before = tree_digest(Path("repo"))
    script = Path(sys.executable).parent / "sign-release"
    proc = subprocess.run(
        [
            str(script),
            "add",
            "repo",
            "img",
            "--version",
            "1.0.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            "keys/targets",
            "--passphrase-file",
            "wrongpass",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stderr == "sign-release: error: private key keys/targets: wrong passphrase\n"
    assert proc.stdout == ""
    assert tree_digest(Path("repo")) == before


def test_repository_in_use_by_another_command(env: Path) -> None:
    from signing.store import Store

    with Store(Path("repo")):
        unchanged(
            [*ADD, "--sign-with", "keys/targets", "--passphrase-file", "pass"],
            2,
            "another sign-release command is using this repository",
        )


def test_init_under_a_missing_parent(env: Path) -> None:
    fails(
        [
            "init",
            "no/such/dir/repo",
            "--root-key",
            "keys/root.pub",
            "--targets-key",
            "keys/targets.pub",
            "--snapshot-key",
            "keys/snapshot.pub",
            "--timestamp-key",
            "keys/timestamp.pub",
            "--sign-with",
            "keys/root",
        ],
        2,
        "parent directory",
    )
    assert not Path("no").exists()
