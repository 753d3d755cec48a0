"""Threshold signing: root 2-of-3 and targets 2-of-2. With one signature `publish`
refuses (naming the role and how many are missing) and a node rejects metadata signed
once; after `sign` with the second key both publish and a real ngclient succeed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from click.testing import CliRunner, Result

from signing.cli import cli
from signing.keys import generate_key
from tests.signing_helpers import ngclient_fetch_all, serve, tree_digest, write_image


def sr(args: Sequence[str | Path], code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="sign-release")
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def make_keys(d: Path, names: Sequence[str]) -> Path:
    keys = d / "keys"
    keys.mkdir()
    for name in names:
        generate_key(keys / name, "ed25519", None)
    return keys


def test_root_2_of_3_and_targets_2_of_2(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["r1", "r2", "r3", "t1", "t2", "snap", "ts"])
    repo = tmp_path / "repo"
    sr(
        [
            "init",
            repo,
            "--root-key",
            keys / "r1.pub",
            "--root-key",
            keys / "r2.pub",
            "--root-key",
            keys / "r3.pub",
            "--root-threshold",
            "2",
            "--targets-key",
            keys / "t1.pub",
            "--targets-key",
            keys / "t2.pub",
            "--targets-threshold",
            "2",
            "--snapshot-key",
            keys / "snap.pub",
            "--timestamp-key",
            keys / "ts.pub",
            "--sign-with",
            keys / "r1",
        ]
    )
    image = write_image(tmp_path / "img", 30_000)
    sr(
        [
            "add",
            repo,
            image,
            "--version",
            "2.0.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            keys / "t1",
        ]
    )
    publish: list[str | Path] = [
        "publish",
        repo,
        "--snapshot-key",
        keys / "snap",
        "--timestamp-key",
        keys / "ts",
    ]

    before = tree_digest(repo)
    err = sr(publish, 2).stderr
    assert "root v1 lacks signatures: needs 1 more" in err and "has 1 of 2" in err
    assert tree_digest(repo) == before
    # Nothing was published, so a node (trusting the root being built) gets nothing.
    staged_root = tmp_path / "root-v1.json"
    shutil.copy(repo / "staged" / "root.json", staged_root)
    assert "error" in sr(["verify", repo, "--root", staged_root], 3).stderr

    status = json.loads(sr(["status", repo, "--json"]).stdout)["roles"]
    assert (status["root"]["staged"]["signatures"], status["root"]["staged"]["threshold"]) == (1, 2)
    assert status["targets"]["staged"]["missing"] == 1
    assert "published" not in status["root"]

    assert (
        "2 of 2 signatures, ready" in sr(["sign", repo, "root", "--sign-with", keys / "r3"]).stdout
    )
    err = sr(publish, 2).stderr
    assert "targets v1 has 1 of 2 signatures" in err and "lacks 1" in err
    assert tree_digest(repo / "metadata") == {}

    sr(["sign", repo, "targets", "--sign-with", keys / "t2"])
    sr(publish)
    # The root a node ships is the published one; the half-signed copy is not trusted.
    assert "root was signed by 1/2 keys" in sr(["verify", repo, "--root", staged_root], 3).stderr
    root_json = repo / "metadata" / "1.root.json"
    sr(["verify", repo, "--root", root_json])
    with serve(repo) as url:
        files = ngclient_fetch_all(url, tmp_path / "client", root_json)
    # The image and its chunk index (docs/delta.md).
    assert list(files) == ["x86_64-efi/2.0.0/root.img.zst", "x86_64-efi/2.0.0/root.index"]

    # A node rejects targets that carry only one of the two signatures it needs.
    one_sig = tmp_path / "one-sig"
    shutil.copytree(repo, one_sig)
    targets_file = one_sig / "metadata" / "1.targets.json"
    doc = json.loads(targets_file.read_text())
    assert len(doc["signatures"]) == 2
    doc["signatures"] = doc["signatures"][:1]
    targets_file.write_text(json.dumps(doc))
    err = sr(["verify", one_sig, "--root", root_json], 3).stderr
    assert "UnsignedMetadataError" in err and "targets" in err


def test_sign_refuses_keys_that_do_not_count(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["r1", "r2", "t1", "snap", "ts"])
    repo = tmp_path / "repo"
    sr(
        [
            "init",
            repo,
            "--root-key",
            keys / "r1.pub",
            "--root-key",
            keys / "r2.pub",
            "--root-threshold",
            "2",
            "--targets-key",
            keys / "t1.pub",
            "--snapshot-key",
            keys / "snap.pub",
            "--timestamp-key",
            keys / "ts.pub",
            "--sign-with",
            keys / "r1",
        ]
    )
    before = tree_digest(repo)
    assert (
        "not a key of role root" in sr(["sign", repo, "root", "--sign-with", keys / "t1"], 2).stderr
    )
    assert (
        "signed by `publish`"
        in sr(["sign", repo, "snapshot", "--sign-with", keys / "snap"], 2).stderr
    )
    assert tree_digest(repo) == before
    # Signing twice with one key still counts once.
    assert (
        "1 of 2 signatures, 1 more needed"
        in sr(["sign", repo, "root", "--sign-with", keys / "r1"]).stdout
    )
