"""update-mirror against signed-but-hostile input: target paths that climb out of the
mirror (`..`, absolute), manifests whose paths climb out of a state or of an export's
DEST, and an object in DIR/objects/ whose bytes no longer match its sha256 name.

The hostile repository is signed with the example keys through python-tuf's Metadata
API (`sign-release add` refuses such paths), served by a real HTTP server on 127.0.0.1
that also serves the bytes at the URL the path normalises to - so nothing but the
mirror's own checks stands between the path and the file system."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib import parse

import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

import mirror
from mirror.store import MirrorDir, MirrorRejected
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import KEYS_DIR, ROOT_JSON, ImageSpec, make_repo, write_image

BIN = Path(sys.executable).parent


def signer(role: str) -> CryptoSigner:
    """The example key of a top-level role, as the root of ROOT_JSON lists it."""
    root = Metadata.from_file(str(ROOT_JSON)).signed
    keyid = root.roles[role].keyids[0]
    private = load_pem_private_key((KEYS_DIR / role).read_bytes(), None)
    return CryptoSigner(private, root.keys[keyid])  # type: ignore[arg-type]


def write_signed(path: Path, md: Metadata[Any], role: str) -> None:
    md.signatures.clear()
    md.sign(signer(role))
    path.write_bytes(md.to_bytes(JSONSerializer()))


def add_signed_targets(repo: Path, extra: dict[str, bytes]) -> dict[str, TargetFile]:
    """Add `extra` (path -> content) to the published targets with valid
    custom.release fields (one version each), re-sign targets, snapshot, timestamp."""
    meta = repo / "metadata"
    ts = Metadata[Timestamp].from_file(str(meta / "timestamp.json")).signed
    snap = Metadata[Snapshot].from_file(str(meta / f"{ts.snapshot_meta.version}.snapshot.json"))
    tv = snap.signed.meta["targets.json"].version
    targets = Metadata[Targets].from_file(str(meta / f"{tv}.targets.json")).signed
    added: dict[str, TargetFile] = {}
    for n, (path, data) in enumerate(extra.items()):
        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields["custom"] = {
            "release": {
                "version": f"1.{n + 1}.0",
                "hardware": ["x86_64-efi"],
                "channel": "stable",
                "role": "root",
                "compression": "none",
                "raw_length": len(data),
                "raw_sha256": hashlib.sha256(data).hexdigest(),
            }
        }
        targets.targets[path] = added[path] = info
    targets.version += 1
    write_signed(meta / f"{targets.version}.targets.json", Metadata(targets), "targets")
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(targets.version)
    write_signed(meta / f"{snap.signed.version}.snapshot.json", snap, "snapshot")
    ts.version += 1
    ts.snapshot_meta = MetaFile(snap.signed.version)
    write_signed(meta / "timestamp.json", Metadata(ts), "timestamp")
    return added


def served_at(targets_url: str, info: TargetFile) -> str:
    """The URL path a client actually requests for a target (requests drops `..`)."""
    dirname, sep, basename = info.path.rpartition("/")
    url = f"{targets_url}/{dirname}{sep}{info.hashes['sha256']}.{basename}"
    return parse.unquote(parse.urlsplit(requests.Request("GET", url).prepare().url).path)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[HTTPTestServer, dict[str, TargetFile]]]:
    img = write_image(tmp_path / "img-1.0.0", 50_000, seed=3)
    repo = make_repo(tmp_path / "upstream", [ImageSpec(img, "1.0.0")])
    evil = {
        # The path of the report: climbs from states/.staging-N/targets/ into DIR.
        "x86_64-efi/../../../../tmp/pwned/evil.img": b"pwned 1",
        # One more `..`: out of DIR, next to it.
        "x86_64-efi/../../../../../pwned/evil.img": b"pwned 2",
        # Absolute: pathlib's `/` would discard everything to its left.
        f"{tmp_path}/abs-pwned/evil.img": b"pwned 3",
    }
    added = add_signed_targets(repo, evil)
    with HTTPTestServer(repo) as server:
        for path, info in added.items():
            server.files[served_at(f"{server.url}/targets", info)] = evil[path]
        yield server, added


def sync_cli(server: HTTPTestServer, mdir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    up = [f"{server.url}/metadata", f"{server.url}/targets"]
    return subprocess.run(
        [
            str(BIN / "update-mirror"),
            *options,
            "sync",
            *up,
            str(mdir),
            "--root",
            str(ROOT_JSON),
            "--allow-example-keys",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pwned(tmp_path: Path) -> list[Path]:
    found = [p for p in tmp_path.rglob("*") if "pwned" in p.name]
    return found + [p for p in (Path("/tmp/pwned"),) if p.exists()]


def test_sync_and_export_never_write_outside_for_unsafe_signed_paths(
    hostile: tuple[HTTPTestServer, dict[str, TargetFile]], tmp_path: Path
) -> None:
    server, added = hostile
    assert not Path("/tmp/pwned").exists(), "left over from elsewhere; cannot test"
    mdir = tmp_path / "mirror"
    done = sync_cli(server, mdir, "--json")
    assert pwned(tmp_path) == []
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert [r["version"] for r in result["releases"]] == ["1.0.0"]
    # What was skipped is said, with the rule it broke.
    assert sorted(result["skipped"]) == sorted(added)
    assert all("target path" in why for why in result["skipped"].values())
    # The unsafe targets were never even fetched.
    fetched = {r.path for r in server.requests}
    assert not fetched & {served_at(f"{server.url}/targets", i) for i in added.values()}
    text = sync_cli(server, mdir)
    assert text.returncode == 0 and "skipped 3 target(s) with unsafe paths" in text.stdout
    # Export: DEST is two levels down so a climbing path would land inside tmp_path.
    dest = tmp_path / "usb" / "dest"
    report = mirror.export(mdir, dest)
    assert [r["version"] for r in report["releases"]] == ["1.0.0"]
    assert pwned(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "usb").iterdir()) == ["dest"]
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)


def _synced(tmp_path: Path) -> tuple[Path, HTTPTestServer]:
    img = write_image(tmp_path / "img", 40_000, seed=5)
    repo = make_repo(tmp_path / "upstream", [ImageSpec(img, "1.0.0")])
    server = HTTPTestServer(repo).start()
    mdir = tmp_path / "mirror"
    mirror.sync(
        f"{server.url}/metadata",
        f"{server.url}/targets",
        mdir,
        ROOT_JSON,
        backoff=0.0,
        allow_example_keys=True,
    )
    return mdir, server


def _edit_manifest(mdir: Path, edit: object) -> None:
    path = mdir / "manifests" / f"{MirrorDir(mdir).current_number()}.json"
    doc = json.loads(path.read_text())
    edit(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


def test_publish_refuses_a_previous_manifest_link_that_climbs_out(tmp_path: Path) -> None:
    mdir, server = _synced(tmp_path)
    try:
        sha = next(
            iter(json.loads((mdir / "manifests" / "1.json").read_text())["targets"].values())
        )

        def climb(doc: dict[str, object]) -> None:
            doc["targets"] = {"x86_64-efi/../../../../../escaped/x.img": sha}

        _edit_manifest(mdir, climb)
        with pytest.raises(MirrorRejected, match=r"manifests/1\.json.*targets.*'\.\.'"):
            mirror.sync(
                f"{server.url}/metadata",
                f"{server.url}/targets",
                mdir,
                ROOT_JSON,
                backoff=0.0,
                allow_example_keys=True,
            )
    finally:
        server.stop()
    assert not (tmp_path / "escaped").exists()
    assert (mdir / "current").resolve().name == "1"


def test_publish_refuses_unsafe_link_and_metadata_names(tmp_path: Path) -> None:
    """The join itself checks, whatever the caller passes."""
    store = MirrorDir(tmp_path / "m")
    store.create()
    sha = hashlib.sha256(b"a").hexdigest()
    store.object_path(sha).write_bytes(b"a")
    with pytest.raises(MirrorRejected, match=r"'\.\.'"):
        store.publish({"timestamp.json": b"t"}, {"../../../../escaped/x.img": sha}, (), "now", "up")
    with pytest.raises(MirrorRejected, match="absolute"):
        store.publish({"timestamp.json": b"t"}, {f"{tmp_path}/abs/x.img": sha}, (), "now", "up")
    with pytest.raises(MirrorRejected, match="metadata file name"):
        store.publish({"../../../../escaped.json": b"t"}, {}, (), "now", "up")
    with pytest.raises(MirrorRejected, match="sha256"):
        store.publish({"timestamp.json": b"t"}, {"x/y.img": "../" * 21 + "a"}, (), "now", "up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert store.current_number() is None


def test_export_refuses_a_manifest_file_that_climbs_out_of_dest(tmp_path: Path) -> None:
    mdir, server = _synced(tmp_path)
    server.stop()

    def climb(doc: dict[str, object]) -> None:
        rows = doc["releases"]
        assert isinstance(rows, list)
        image = rows[0]["images"]["root"]
        image["file"] = "../../../escaped/" + image["file"].rsplit("/", 1)[1]

    _edit_manifest(mdir, climb)
    dest = tmp_path / "usb" / "dest"
    with pytest.raises(MirrorRejected, match=r"manifests/1\.json.*releases\[0\].*file"):
        mirror.export(mdir, dest)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "usb" / "escaped").exists()
    done = subprocess.run(
        [str(BIN / "update-mirror"), "export", str(mdir), str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_a_bit_flipped_object_is_downloaded_again_not_republished(tmp_path: Path) -> None:
    mdir, server = _synced(tmp_path)
    try:
        # The image, not its chunk index (the larger of the two objects).
        obj = max((mdir / "objects").glob("[0-9a-f]*"), key=lambda p: p.stat().st_size)
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0x10  # same size, different content
        obj.write_bytes(bytes(data))
        result = mirror.sync(
            f"{server.url}/metadata",
            f"{server.url}/targets",
            mdir,
            ROOT_JSON,
            backoff=0.0,
            allow_example_keys=True,
        )
    finally:
        server.stop()
    assert len(result.downloaded) == 1 and result.reused == ["x86_64-efi/1.0.0/root.index"]
    assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name  # replaced
    (served,) = (mdir / "current" / "targets").rglob("*.zst")
    assert hashlib.sha256(served.read_bytes()).hexdigest() == obj.name
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)
