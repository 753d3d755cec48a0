"""The INSECURE keys of keys-example/: `sign-release` refuses to sign with them, or to
make a root trust them, unless told that this is a demo or a test
(`--allow-example-keys`, `SIGN_RELEASE_ALLOW_EXAMPLE_KEYS=1`, or the library's
`allow_example_keys=True`). A key made by `keygen` needs no such option."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from core.examplekeys import WHY
from signing import create
from signing import repository as ops
from signing.cli import cli
from signing.errors import KeyFileError
from signing.keys import generate_key
from tests.signing_helpers import (
    KEYS_DIR,
    ROOT_JSON,
    ROOT_KEY,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TIMESTAMP_KEY,
    ImageSpec,
    make_repo,
    tree_digest,
    write_image,
)

ENV = "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS"


def sr(args: Sequence[str | Path], code: int = 0, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="sign-release", env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the example keys, publishing 1.0.0, and the image of 2.0.0."""
    d = tmp_path_factory.mktemp("examplekeys")
    make_repo(d / "repo", [ImageSpec(write_image(d / "old.img", 10_000, 1), "1.0.0")])
    write_image(d / "img", 10_000, 2)
    return d


@pytest.fixture
def work(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(ENV, raising=False)
    shutil.copytree(base, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


ADD = ["add", "repo", "img", "--version", "2.0.0", "--hardware", "x86_64-efi"]
PUBLISH = ["publish", "repo", "--snapshot-key", SNAPSHOT_KEY, "--timestamp-key", TIMESTAMP_KEY]
INIT = [
    "init",
    "new",
    "--root-key",
    KEYS_DIR / "root.pub",
    "--targets-key",
    KEYS_DIR / "targets.pub",
    "--snapshot-key",
    KEYS_DIR / "snapshot.pub",
    "--timestamp-key",
    KEYS_DIR / "timestamp.pub",
    "--sign-with",
    ROOT_KEY,
]
# Every command that signs: (command line, the example key it must name).
SIGNING_COMMANDS = [
    pytest.param([*ADD, "--sign-with", TARGETS_KEY], "targets", id="add"),
    pytest.param(["sign", "repo", "targets", "--sign-with", TARGETS_KEY], "targets", id="sign"),
    pytest.param(["sign", "repo", "root", "--sign-with", ROOT_KEY], "root", id="sign-root"),
    pytest.param(PUBLISH, "snapshot", id="publish"),
    pytest.param(["timestamp", "repo", "--timestamp-key", TIMESTAMP_KEY], "timestamp", id="ts"),
    pytest.param(
        ["rotate", "repo", "snapshot", "--threshold", "1", "--sign-with", ROOT_KEY],
        "root",
        id="rotate",
    ),
    pytest.param(INIT, "root", id="init"),
    pytest.param(["init", "new", "--from-root", ROOT_JSON], "root", id="init-from-root"),
]


@pytest.mark.parametrize(("args", "key"), SIGNING_COMMANDS)
def test_refused_without_the_option(work: Path, args: list[str | Path], key: str) -> None:
    before = tree_digest(work)
    for env in ({}, {ENV: "0"}, {ENV: "false"}):
        err = sr(args, 2, env).stderr
        (line,) = err.splitlines()
        assert line.startswith("sign-release: error: ")
        assert f"keys-example/{key}" in line and WHY in line and "--allow-example-keys" in line
        assert tree_digest(work) == before


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize(("args", "key"), SIGNING_COMMANDS)
def test_allowed_with_the_flag_or_the_environment(
    work: Path, args: list[str | Path], key: str, how: str
) -> None:
    if how == "flag":
        sr(["--allow-example-keys", *args])
    else:
        sr(args, env={ENV: "1"})


def test_the_message_names_the_key_file_as_given(work: Path) -> None:
    line = sr([*ADD, "--sign-with", TARGETS_KEY], 2).stderr.strip()
    assert line == (
        f"sign-release: error: private key {TARGETS_KEY} is the example key "
        f"keys-example/targets: {WHY}; give --allow-example-keys (or {ENV}=1) only for "
        "a demo or test"
    )
    # A copy under another name is recognised by its public key value.
    shutil.copy(TARGETS_KEY, "mine")
    assert "private key mine is the example key keys-example/targets" in (
        sr([*ADD, "--sign-with", "mine"], 2).stderr
    )


def test_a_root_that_trusts_an_example_key_is_refused(work: Path) -> None:
    keys = work / "keys"
    for role in ("root", "targets", "snapshot", "timestamp"):
        generate_key(keys / role, "ed25519", None)
    # Fresh root key, but the example targets key to be trusted: anyone could sign.
    args: list[str | Path] = [
        "init",
        "new",
        "--root-key",
        keys / "root.pub",
        "--targets-key",
        KEYS_DIR / "targets.pub",
        "--snapshot-key",
        keys / "snapshot.pub",
        "--timestamp-key",
        keys / "timestamp.pub",
        "--sign-with",
        keys / "root",
    ]
    line = sr(args, 2).stderr
    assert "targets key" in line and "keys-example/targets" in line and WHY in line
    assert not Path("new").exists()
    args[args.index(KEYS_DIR / "targets.pub")] = keys / "targets.pub"
    sr(args)
    # Nor may a rotation add one.
    before = tree_digest(Path("new"))
    rotate: list[str | Path] = ["rotate", "new", "targets", "--add-key", KEYS_DIR / "targets.pub"]
    line = sr([*rotate, "--sign-with", keys / "root"], 2).stderr
    assert "--add-key" in line and "keys-example/targets" in line and WHY in line
    assert tree_digest(Path("new")) == before
    sr(["--allow-example-keys", *rotate, "--sign-with", keys / "root"])


def test_fresh_keygen_keys_need_no_option(work: Path) -> None:
    keys = work / "keys"
    for role in ("root", "targets", "snapshot", "timestamp"):
        sr(["keygen", keys / role, "--no-passphrase"])
    sr(
        [
            "init",
            "new",
            "--root-key",
            keys / "root.pub",
            "--targets-key",
            keys / "targets.pub",
            "--snapshot-key",
            keys / "snapshot.pub",
            "--timestamp-key",
            keys / "timestamp.pub",
            "--sign-with",
            keys / "root",
        ]
    )
    sr(
        [
            "add",
            "new",
            "img",
            "--version",
            "1.0.0",
            "--hardware",
            "hw",
            "--sign-with",
            keys / "targets",
        ]
    )
    sr(["sign", "new", "root", "--sign-with", keys / "root"])
    sr(
        [
            "publish",
            "new",
            "--snapshot-key",
            keys / "snapshot",
            "--timestamp-key",
            keys / "timestamp",
        ]
    )
    sr(["timestamp", "new", "--timestamp-key", keys / "timestamp"])
    generate_key(keys / "snapshot2", "ed25519", None)
    sr(
        [
            "rotate",
            "new",
            "snapshot",
            "--add-key",
            keys / "snapshot2.pub",
            "--sign-with",
            keys / "root",
        ]
    )


def test_the_library_refuses_unless_told(work: Path) -> None:
    release = ops.Release(Path("img"), "2.0.0", ("x86_64-efi",))
    before = tree_digest(work)
    with pytest.raises(KeyFileError, match="keys-example/targets"):
        ops.add_release(Path("repo"), release, [str(TARGETS_KEY)])
    with pytest.raises(KeyFileError, match="keys-example/snapshot"):
        ops.publish(Path("repo"), [str(SNAPSHOT_KEY)], [str(TIMESTAMP_KEY)])
    with pytest.raises(KeyFileError, match="keys-example/timestamp"):
        ops.refresh_timestamp(Path("repo"), [str(TIMESTAMP_KEY)])
    with pytest.raises(KeyFileError, match="keys-example/root"):
        ops.sign_role(Path("repo"), "root", [str(ROOT_KEY)])
    with pytest.raises(KeyFileError, match="keys-example/root"):
        ops.rotate(Path("repo"), "snapshot", threshold=1, sign_with=[str(ROOT_KEY)])
    with pytest.raises(KeyFileError, match="keys-example/root"):
        create.init_from_root(Path("new"), ROOT_JSON)
    assert tree_digest(work) == before
    ops.add_release(Path("repo"), release, [str(TARGETS_KEY)], allow_example_keys=True)
    ops.publish(Path("repo"), [str(SNAPSHOT_KEY)], [str(TIMESTAMP_KEY)], allow_example_keys=True)
