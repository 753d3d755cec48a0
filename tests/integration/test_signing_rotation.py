"""Key rotation: a root key and a targets key are replaced. A node that knew only root
v1 updates through 2.root.json and downloads; a node can no longer be served targets
signed only by the removed targets key, and the tools refuse that key too."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from securesystemslib.signer import Signer  # type: ignore[attr-defined]
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from signing.cli import cli
from signing.keys import PASSPHRASE_ENV, generate_key, load_public_key
from tests.signing_helpers import ngclient_fetch_all, serve, tree_digest, write_image


def sr(args: Sequence[str | Path], code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="sign-release")
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def keyid(pub: Path) -> str:
    return str(json.loads(pub.read_text())["keyid"])


def test_rotate_root_and_targets_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("root1", "root2", "targets1", "targets2", "snap", "ts"):
        generate_key(keys / name, "ed25519", None)
    repo = tmp_path / "repo"
    publish: list[str | Path] = [
        "publish",
        repo,
        "--snapshot-key",
        keys / "snap",
        "--timestamp-key",
        keys / "ts",
    ]
    sr(
        [
            "init",
            repo,
            "--root-key",
            keys / "root1.pub",
            "--targets-key",
            keys / "targets1.pub",
            "--snapshot-key",
            keys / "snap.pub",
            "--timestamp-key",
            keys / "ts.pub",
            "--sign-with",
            keys / "root1",
        ]
    )
    sr(
        [
            "add",
            repo,
            write_image(tmp_path / "a.img", 20_000, 1),
            "--version",
            "1.0.0",
            "--hardware",
            "hw",
            "--sign-with",
            keys / "targets1",
        ]
    )
    sr(publish)
    root_v1 = tmp_path / "root-v1.json"
    root_v1.write_bytes((repo / "metadata" / "1.root.json").read_bytes())
    with serve(repo) as url:  # a node that learnt v1 of everything before the rotation
        ngclient_fetch_all(url, tmp_path / "old-node", root_v1)

    # Replace root1 by root2: the new root needs its own keys' and the old root's threshold.
    out = sr(
        [
            "rotate",
            repo,
            "root",
            "--add-key",
            keys / "root2.pub",
            "--remove-key",
            keyid(keys / "root1.pub"),
            "--sign-with",
            keys / "root2",
        ]
    ).stdout
    assert "1 of 1 signatures" in out
    before = tree_digest(repo)
    assert "lacks signatures: needs 1 more from the keys of root v1" in sr(publish, 2).stderr
    assert tree_digest(repo) == before
    sr(["sign", repo, "root", "--sign-with", keys / "root1"])
    # Replace targets1 by targets2 in the same new root (an 8+ character keyid prefix works).
    sr(
        [
            "rotate",
            repo,
            "targets",
            "--add-key",
            keys / "targets2.pub",
            "--remove-key",
            keyid(keys / "targets1.pub")[:12],
            "--sign-with",
            keys / "root1",
            "--sign-with",
            keys / "root2",
        ]
    )
    # The removed key no longer counts for targets; the targets role must be re-signed.
    assert (
        "not a key of role targets"
        in sr(["sign", repo, "targets", "--sign-with", keys / "targets1"], 2).stderr
    )
    assert "targets v2 has 0 of 1" in sr(publish, 2).stderr
    sr(
        [
            "add",
            repo,
            write_image(tmp_path / "b.img", 20_000, 2),
            "--version",
            "1.1.0",
            "--hardware",
            "hw",
            "--sign-with",
            keys / "targets2",
        ]
    )
    sr(publish)
    assert (repo / "metadata" / "2.root.json").is_file()
    status = json.loads(sr(["status", repo, "--json"]).stdout)["roles"]
    assert status["root"]["published"]["version"] == 2
    assert status["targets"]["published"]["keyids"] == [keyid(keys / "targets2.pub")]

    with serve(repo) as url:
        # The node that only knew v1 walks 1 -> 2.root.json, then downloads everything.
        files = ngclient_fetch_all(url, tmp_path / "old-node")
        # Each zstd image comes with its chunk index (a target of its own, docs/delta.md).
        assert set(files) == {
            f"hw/{v}/root.{suffix}" for v in ("1.0.0", "1.1.0") for suffix in ("img.zst", "index")
        }
        assert (
            json.loads((tmp_path / "old-node" / "root.json").read_text())["signed"]["version"] == 2
        )
        fresh = ngclient_fetch_all(url, tmp_path / "fresh-node", root_v1)
        assert set(fresh) == set(files)
    sr(["verify", repo, "--root", root_v1])

    # An attacker holding the removed targets key (and the online keys) publishes targets
    # v3 signed only by it: a node that trusted that key is no longer served by it.
    def signer(name: str) -> Signer:
        # securesystemslib's own loader of unencrypted PEM keys (file2: URIs).
        return Signer.from_priv_key_uri(
            f"file2:{keys / name}", load_public_key(keys / f"{name}.pub")
        )

    meta = repo / "metadata"
    ser = JSONSerializer()
    targets: Metadata[Targets] = Metadata.from_file(str(meta / "2.targets.json"))
    targets.signed.version = 3
    targets.sign(signer("targets1"))
    (meta / "3.targets.json").write_bytes(targets.to_bytes(ser))
    snapshot: Metadata[Snapshot] = Metadata.from_file(str(meta / "2.snapshot.json"))
    snapshot.signed.version = 3
    snapshot.signed.meta["targets.json"] = MetaFile(3)
    snapshot.sign(signer("snap"))
    (meta / "3.snapshot.json").write_bytes(snapshot.to_bytes(ser))
    timestamp: Metadata[Timestamp] = Metadata.from_file(str(meta / "timestamp.json"))
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(3)
    timestamp.sign(signer("ts"))
    (meta / "timestamp.json").write_bytes(timestamp.to_bytes(ser))
    with serve(repo) as url, pytest.raises(tuf_exc.UnsignedMetadataError, match="targets"):
        ngclient_fetch_all(url, tmp_path / "old-node")
    assert "UnsignedMetadataError" in sr(["verify", repo, "--root", root_v1], 3).stderr


def test_old_root_key_alone_cannot_sign_a_later_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "pw")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("root1", "root2", "t", "snap", "ts"):
        generate_key(keys / name, "ecdsa-p256", b"pw")
    repo = tmp_path / "repo"
    sr(
        [
            "init",
            repo,
            "--root-key",
            keys / "root1.pub",
            "--targets-key",
            keys / "t.pub",
            "--snapshot-key",
            keys / "snap.pub",
            "--timestamp-key",
            keys / "ts.pub",
            "--sign-with",
            keys / "root1",
        ]
    )
    sr(
        [
            "rotate",
            repo,
            "root",
            "--add-key",
            keys / "root2.pub",
            "--remove-key",
            keys / "root1.pub",
            "--sign-with",
            keys / "root2",
        ]
    )
    sr(["sign", repo, "targets", "--sign-with", keys / "t"])
    sr(["publish", repo, "--snapshot-key", keys / "snap", "--timestamp-key", keys / "ts"])
    assert (repo / "metadata" / "1.root.json").is_file()  # init's v1 was rotated in place
    before = tree_digest(repo)
    err = sr(
        ["rotate", repo, "snapshot", "--threshold", "1", "--sign-with", keys / "root1"], 2
    ).stderr
    assert "not a key of role root" in err
    assert "between 1 and 1" in sr(["rotate", repo, "timestamp", "--threshold", "2"], 2).stderr
    assert tree_digest(repo) == before
