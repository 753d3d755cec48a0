"""The release manager's workflow, end to end, through the installed `sign-release`
console script: from an empty directory to a repository that a fresh python-tuf
ngclient, talking HTTP to a real server on 127.0.0.1, refreshes and downloads from."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from signing.cli import cli
from tests.signing_helpers import ngclient_fetch_all, serve, write_image

SIGN_RELEASE = Path(sys.executable).parent / "sign-release"


def run(
    *args: str | Path, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(SIGN_RELEASE), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _raw(path: Path, compression: str) -> bytes:
    data = path.read_bytes()
    if compression == "zstd":
        # Seekable zstd: many frames (no content size in their headers) and a seek table.
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        return reader.read()
    if compression == "xz":
        return lzma.decompress(data)
    if compression == "gzip":
        return gzip.decompress(data)
    return data


def test_whole_workflow_to_ngclient_over_http(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse\n")
    # Encrypted keys (from a passphrase file and from the environment) and plain ones.
    run("keygen", keys / "root", "--type", "ecdsa-p256", "--passphrase-file", passfile)
    run(
        "keygen",
        keys / "targets",
        "--type",
        "rsa-3072",
        env={"SIGN_RELEASE_PASSPHRASE": "correct horse"},
    )
    run("keygen", keys / "snapshot", "--no-passphrase")
    run("keygen", keys / "timestamp", "--type", "ed25519", "--no-passphrase")
    assert stat.S_IMODE((keys / "root").stat().st_mode) == 0o600
    assert (keys / "root").read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (keys / "snapshot").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = json.loads((keys / "targets.pub").read_text())
    assert pub["keytype"] == "rsa" and pub["scheme"] == "rsassa-pss-sha256" and pub["keyid"]

    repo = tmp_path / "repo"
    run(
        "init",
        repo,
        "--root-key",
        keys / "root.pub",
        "--targets-key",
        keys / "targets.pub",
        "--snapshot-key",
        keys / "snapshot.pub",
        "--timestamp-key",
        keys / "timestamp.pub",
        "--expires",
        "targets=30",
        "--sign-with",
        keys / "root",
        "--passphrase-file",
        passfile,
    )
    images = {
        "zstd": write_image(tmp_path / "root.img", 3 * 1024 * 1024 + 17, seed=1),
        "xz": write_image(tmp_path / "boot.img", 200_000, seed=2),
        "gzip": write_image(tmp_path / "efi.img", 100_000, seed=3),
        "none": write_image(tmp_path / "data.img", 50_000, seed=4),
    }
    roles = {"zstd": "root", "xz": "boot", "gzip": "efi", "none": "data"}
    for compression, image in images.items():
        hw = ["--hardware", "x86_64-efi"] + (
            ["--hardware", "aarch64-efi"] if compression == "zstd" else []
        )
        run(
            "add",
            repo,
            image,
            "--version",
            "1.2.0",
            *hw,
            "--role",
            roles[compression],
            "--channel",
            "stable",
            "--compress",
            compression,
            "--sign-with",
            keys / "targets",
            "--passphrase-file",
            passfile,
        )
    run("publish", repo, "--snapshot-key", keys / "snapshot", "--timestamp-key", keys / "timestamp")
    root_json = repo / "metadata" / "root.json"
    assert root_json.read_bytes() == (repo / "metadata" / "1.root.json").read_bytes()
    assert not list((repo / "staged").iterdir())
    # Targets and metadata are public: readable by a web server's unprivileged worker.
    served = [p for p in (repo / "targets").rglob("*") if p.is_file()]
    served += [p for p in (repo / "metadata").iterdir() if p.is_file()]
    assert len(served) > 5
    assert {p.name: stat.S_IMODE(p.stat().st_mode) & 0o044 for p in served} == {
        p.name: 0o044 for p in served
    }

    status = json.loads(run("status", repo, "--json").stdout)
    for role in ("root", "targets", "snapshot", "timestamp"):
        entry = status["roles"][role]["published"]
        assert entry["version"] == 1 and entry["signatures"] == entry["threshold"] == 1
    assert 29.9 < status["roles"]["targets"]["published"]["days_left"] <= 30

    verify = run("verify", repo, "--root", root_json)
    # 5 images and the chunk indexes of the seekable zstd one (one per hardware name).
    assert verify.stdout.startswith("OK: root v1") and "7 targets" in verify.stdout

    # Target files are stored under their sha256 (consistent snapshots).
    with serve(repo) as url:
        files = ngclient_fetch_all(url, tmp_path / "client", root_json)
    expected = {
        f"x86_64-efi/1.2.0/{roles[c]}.img{s}"
        for c, s in [("zstd", ".zst"), ("xz", ".xz"), ("gzip", ".gz"), ("none", "")]
    }
    indexes = {f"{hw}/1.2.0/root.index" for hw in ("x86_64-efi", "aarch64-efi")}
    assert set(files) == expected | {"aarch64-efi/1.2.0/root.img.zst"} | indexes
    targets = json.loads((repo / "metadata" / "1.targets.json").read_text())["signed"]
    for compression, image in images.items():
        path = (
            f"x86_64-efi/1.2.0/{roles[compression]}.img"
            + {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}[compression]
        )
        raw = _raw(files[path], compression)
        assert raw == image.read_bytes()
        release = targets["targets"][path]["custom"]["release"]
        index = {"index": "x86_64-efi/1.2.0/root.index"} if compression == "zstd" else {}
        assert release == index | {
            "version": "1.2.0",
            "hardware": ["x86_64-efi"],
            "channel": "stable",
            "role": roles[compression],
            "compression": compression,
            "raw_length": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
        }
        sha = targets["targets"][path]["hashes"]["sha256"]
        stored = repo / "targets" / os.path.dirname(path) / f"{sha}.{os.path.basename(path)}"
        assert stored.is_file()

    # A second release later; a returning client (cached metadata) picks it up.
    image2 = write_image(tmp_path / "root2.img", 100_000, seed=9)
    run(
        "add",
        repo,
        image2,
        "--version",
        "1.3.0-rc.1",
        "--hardware",
        "x86_64-efi",
        "--sign-with",
        keys / "targets",
        env={"SIGN_RELEASE_PASSPHRASE": "correct horse"},
    )
    run("publish", repo, "--snapshot-key", keys / "snapshot", "--timestamp-key", keys / "timestamp")
    with serve(repo) as url:
        files = ngclient_fetch_all(url, tmp_path / "client")
    assert _raw(files["x86_64-efi/1.3.0-rc.1/root.img.zst"], "zstd") == image2.read_bytes()
    assert len(files) == 9  # 6 images, 3 chunk indexes (one per zstd image)


def test_verify_detects_a_tampered_target(tmp_path: Path) -> None:
    from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo

    image = write_image(tmp_path / "img", 10_000)
    repo = make_repo(tmp_path / "repo", [ImageSpec(image, "1.0.0")])
    assert run("verify", repo, "--root", ROOT_JSON).returncode == 0
    stored = next((repo / "targets").rglob("*.root.img.zst"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    proc = run("verify", repo, "--root", ROOT_JSON, ok=False)
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sign-release: error: ")


def test_keys_example_is_what_the_tools_make() -> None:
    from tests.signing_helpers import KEYS_DIR, ROOT_JSON

    readme = (KEYS_DIR / "README.md").read_text().splitlines()[0]
    assert "PUBLIC" in readme and "INSECURE" in readme
    root = json.loads(ROOT_JSON.read_text())["signed"]
    for role in ("root", "targets", "snapshot", "timestamp"):
        keyid = json.loads((KEYS_DIR / f"{role}.pub").read_text())["keyid"]
        assert root["roles"][role]["keyids"] == [keyid]
    assert root["version"] == 1 and root["consistent_snapshot"] is True
    assert shutil.which("sign-release") or SIGN_RELEASE.exists()


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256", "rsa-3072"])
def test_each_key_type_signs_a_verifiable_repository(tmp_path: Path, key_type: str) -> None:
    runner = CliRunner()

    def cli_ok(*args: str | Path) -> None:
        result = runner.invoke(cli, [str(a) for a in args], prog_name="sign-release")
        assert result.exit_code == 0, result.stderr

    keys = tmp_path / "keys"
    keys.mkdir()
    for role in ("root", "targets", "snapshot", "timestamp"):
        cli_ok("keygen", keys / role, "--type", key_type, "--no-passphrase")
    repo = tmp_path / "repo"
    cli_ok(
        "init",
        repo,
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
    )
    cli_ok(
        "add",
        repo,
        write_image(tmp_path / "img", 5000),
        "--version",
        "0.1.0",
        "--hardware",
        "hw",
        "--sign-with",
        keys / "targets",
    )
    cli_ok(
        "publish", repo, "--snapshot-key", keys / "snapshot", "--timestamp-key", keys / "timestamp"
    )
    cli_ok("verify", repo, "--root", repo / "metadata" / "1.root.json")
