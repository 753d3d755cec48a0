"""update-mirror sync against a signed repository served by a real HTTP server on
127.0.0.1: incremental downloads, interrupted syncs, refused tampering, --keep, verify,
status and the CLI's one-line errors. The mirror's served state is checked by reading
DIR/current (what `serve` and nginx serve) before and after each failure."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mirror
from core.repository import DownloadFailed, MetadataRejected, TargetRejected
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import (
    ROOT_JSON,
    ImageSpec,
    add_release,
    make_repo,
    publish,
    tree_digest,
    write_image,
)

BIN = Path(sys.executable).parent


@dataclass
class Upstream:
    repo: Path
    server: HTTPTestServer
    tmp: Path

    @property
    def meta(self) -> str:
        return f"{self.server.url}/metadata"

    @property
    def targets(self) -> str:
        return f"{self.server.url}/targets"

    def release(self, version: str, size: int = 200_000, **kw: object) -> list[str]:
        # Incompressible, so the stored target is as large as the image (cuts land mid-file).
        img = self.tmp / f"img-{version}"
        img.write_bytes(random.Random(zlib.crc32(version.encode())).randbytes(size))
        paths = add_release(self.repo, [ImageSpec(img, version, **kw)])  # type: ignore[arg-type]
        publish(self.repo)
        return paths

    def url_path(self, target_path: str) -> str:
        """The served /targets/... path of a target (consistent snapshot)."""
        dirname, _, basename = target_path.rpartition("/")
        (found,) = (self.repo / "targets" / dirname).glob(f"*.{basename}")
        return f"/targets/{dirname}/{found.name}"


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    img = write_image(tmp_path / "img-1.0.0", 300_000, seed=1)
    repo = make_repo(tmp_path / "upstream", [ImageSpec(img, "1.0.0")])
    with HTTPTestServer(repo) as server:
        yield Upstream(repo, server, tmp_path)


def do_sync(up: Upstream, mdir: Path, **kw: Any) -> mirror.SyncResult:
    # The example keys sign every test repository, so the mirror must be told to trust them.
    return mirror.sync(
        up.meta, up.targets, mdir, ROOT_JSON, backoff=0.0, allow_example_keys=True, **kw
    )


def served(mdir: Path) -> dict[str, str]:
    return tree_digest((mdir / "current").resolve())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "update-mirror"), *args], capture_output=True, text=True, timeout=60
    )


def test_sync_publishes_verified_metadata_and_images(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    result = do_sync(upstream, mdir)
    # The image and its chunk index (docs/delta.md).
    assert result.state == 1 and len(result.downloaded) == 2 and not result.reused
    state = mdir / "current"
    up_meta = upstream.repo / "metadata"
    for name in ("1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"):
        assert (state / "metadata" / name).read_bytes() == (up_meta / name).read_bytes(), name
    up_targets = tree_digest(upstream.repo / "targets")
    assert tree_digest(state / "targets") == up_targets
    # Images are stored once and hard-linked into the state.
    obj = next((mdir / "objects").glob("[0-9a-f]*"))
    assert obj.stat().st_nlink == 2
    report = mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)
    assert report["images_verified"] == 1
    assert set(report["expiry"]) == {"root", "snapshot", "targets", "timestamp"}
    assert 0 < report["expiry"]["timestamp"]["days_left"] <= 1


def test_second_sync_downloads_only_the_new_image(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    first = do_sync(upstream, mdir)
    old, old_index = first.downloaded  # the image and its chunk index
    old_url = upstream.url_path(old)
    new_paths = upstream.release("1.1.0")
    second = do_sync(upstream, mdir)
    assert second.downloaded == new_paths and second.reused == [old, old_index]
    assert len(upstream.server.requests_for(old_url)) == 1
    assert len(upstream.server.requests_for(upstream.url_path(new_paths[0]))) == 1
    assert [r["version"] for r in second.releases] == ["1.0.0", "1.1.0"]
    assert mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)["images_verified"] == 2


def test_cut_connection_is_resumed_with_range(upstream: Upstream, tmp_path: Path) -> None:
    new = upstream.release("1.1.0", size=3 << 20)
    url = upstream.url_path(new[0])
    # After more than one 1 MiB chunk, so the resume starts past byte 0.
    upstream.server.cut(url, after=(3 << 20) // 2, times=1)
    result = do_sync(upstream, tmp_path / "mirror")
    assert new[0] in result.downloaded
    ranges = [r.range for r in upstream.server.requests_for(url)]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    mirror.verify(tmp_path / "mirror", ROOT_JSON, allow_example_keys=True)


def test_interrupted_sync_keeps_old_state_and_next_sync_completes(
    upstream: Upstream, tmp_path: Path
) -> None:
    mdir = tmp_path / "mirror"
    do_sync(upstream, mdir)
    before = served(mdir)
    new = upstream.release("1.1.0", size=400_000)
    upstream.server.cut(upstream.url_path(new[0]), after=10_000, times=-1)
    with pytest.raises(DownloadFailed, match="giving up"):
        do_sync(upstream, mdir, retries=2)
    assert served(mdir) == before and os.readlink(mdir / "current") == "states/1"
    # The cut download's temporary file is gone; only verified objects remain.
    assert not [p.name for p in (mdir / "objects").iterdir() if p.name.startswith(".")]
    upstream.server._faults.clear()
    result = do_sync(upstream, mdir)
    assert result.downloaded == new and result.state == 2
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)


def test_tampered_image_is_refused_and_old_state_served(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    do_sync(upstream, mdir)
    before = served(mdir)
    new = upstream.release("1.1.0")
    upstream.server.tamper(upstream.url_path(new[0]), offset=1000)
    with pytest.raises(TargetRejected, match="sha256 mismatch"):
        do_sync(upstream, mdir)
    assert served(mdir) == before
    assert not any(p.name.startswith(new[0].split("/")[-1]) for p in (mdir / "objects").iterdir())
    # Through the CLI: one line, exit code 3, and the mirror still verifies.
    done = cli(
        "sync",
        upstream.meta,
        upstream.targets,
        str(mdir),
        "--root",
        str(ROOT_JSON),
        "--allow-example-keys",
    )
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("update-mirror: error: ") and "mismatch" in done.stderr
    assert served(mdir) == before
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)


def test_rolled_back_timestamp_is_refused(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    old_timestamp = (upstream.repo / "metadata" / "timestamp.json").read_bytes()
    upstream.release("1.1.0")
    do_sync(upstream, mdir)
    before = served(mdir)
    upstream.server.files["/metadata/timestamp.json"] = old_timestamp
    with pytest.raises(MetadataRejected, match=r"timestamp\.json rejected: BadVersionNumber"):
        do_sync(upstream, mdir)
    assert served(mdir) == before


def test_bad_signature_is_refused(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    do_sync(upstream, mdir)
    before = served(mdir)
    upstream.release("1.1.0")
    doc = json.loads((upstream.repo / "metadata" / "timestamp.json").read_text())
    doc["signed"]["version"] += 1  # signature no longer matches
    upstream.server.files["/metadata/timestamp.json"] = json.dumps(doc).encode()
    done = cli(
        "sync",
        upstream.meta,
        upstream.targets,
        str(mdir),
        "--root",
        str(ROOT_JSON),
        "--allow-example-keys",
    )
    assert done.returncode == 3, done.stderr
    assert "timestamp.json rejected: UnsignedMetadataError" in done.stderr
    assert done.stderr.count("\n") == 1
    assert served(mdir) == before


def test_expired_upstream_is_refused(tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", 10_000)
    repo = make_repo(tmp_path / "upstream", [ImageSpec(img, "1.0.0")], expires={"timestamp": 0})
    with HTTPTestServer(repo) as server:
        done = cli(
            "sync",
            f"{server.url}/metadata",
            f"{server.url}/targets",
            str(tmp_path / "mirror"),
            "--root",
            str(ROOT_JSON),
            "--allow-example-keys",
        )
    assert done.returncode == 3 and "ExpiredMetadataError" in done.stderr
    assert not (tmp_path / "mirror" / "current").exists()


def test_keep_prunes_old_releases_after_one_sync_of_grace(
    upstream: Upstream, tmp_path: Path
) -> None:
    mdir = tmp_path / "mirror"
    do_sync(upstream, mdir)
    upstream.release("1.1.0")
    upstream.release("1.2.0-rc.1", channel="beta")
    first = do_sync(upstream, mdir)
    assert {r["version"] for r in first.releases} == {"1.0.0", "1.1.0", "1.2.0-rc.1"}
    # keep 1: the newest per hardware/role (1.2.0-rc.1) and the newest stable (1.1.0).
    kept = do_sync(upstream, mdir, keep=1)
    assert {r["version"] for r in kept.releases} == {"1.1.0", "1.2.0-rc.1"}
    assert kept.downloaded == [] and kept.removed_objects == []  # grace: still linked
    assert len(list((mdir / "current" / "targets").rglob("*.zst"))) == 3
    do_sync(upstream, mdir, keep=1)
    last = do_sync(upstream, mdir, keep=1)
    # 1.0.0 and its chunk index, unreferenced by states 4 and 5
    assert len(last.removed_objects) == 2
    assert len(list((mdir / "current" / "targets").rglob("*.zst"))) == 2
    assert len(list((mdir / "current" / "targets").rglob("*.index"))) == 2
    assert len(list((mdir / "objects").glob("[0-9a-f]*"))) == 4
    assert sorted(p.name for p in (mdir / "states").iterdir()) == ["4", "5"]
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)


def test_hardware_and_channel_filter(upstream: Upstream, tmp_path: Path) -> None:
    upstream.release("2.0.0", hardware=("aarch64-efi",))
    upstream.release("2.1.0", channel="beta")
    result = do_sync(upstream, tmp_path / "mirror", hardware=["x86_64-efi"], channel="stable")
    assert [(r["hardware"], r["version"]) for r in result.releases] == [("x86_64-efi", "1.0.0")]


def test_cli_status_and_verify_show_days_left(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    done = cli(
        "sync",
        upstream.meta,
        upstream.targets,
        str(mdir),
        "--root",
        str(ROOT_JSON),
        "--allow-example-keys",
    )
    assert done.returncode == 0, done.stderr
    assert "published state 1" in done.stdout and "days left" in done.stdout
    verify = cli("verify", str(mdir), "--root", str(ROOT_JSON), "--allow-example-keys")
    assert verify.returncode == 0, verify.stderr
    assert "state 1 verifies: 1 image(s)" in verify.stdout
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert any(
            line.strip().startswith(role) and "days left" in line
            for line in verify.stdout.splitlines()
        ), role
    status = json.loads(cli("--json", "status", str(mdir)).stdout)
    assert status["state"] == 1 and status["expiry"]["root"]["days_left"] > 300


def test_verify_detects_a_damaged_image_in_the_mirror(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    do_sync(upstream, mdir)
    obj = next((mdir / "objects").glob("[0-9a-f]*"))
    data = bytearray(obj.read_bytes())
    data[10] ^= 1
    obj.write_bytes(bytes(data))
    done = cli("verify", str(mdir), "--root", str(ROOT_JSON), "--allow-example-keys")
    assert done.returncode == 3 and "mismatch" in done.stderr and done.stderr.count("\n") == 1


def test_example_keys_are_refused_without_the_flag(upstream: Upstream, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    done = cli("sync", upstream.meta, upstream.targets, str(mdir), "--root", str(ROOT_JSON))
    assert done.returncode == 3 and "names the example key" in done.stderr
    assert done.stderr.count("\n") == 1 and not (mdir / "current").exists()
    do_sync(upstream, mdir)
    done = cli("verify", str(mdir), "--root", str(ROOT_JSON))
    assert done.returncode == 3 and "names the example key" in done.stderr


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    done = cli(
        "verify", str(tmp_path / "nothing"), "--root", str(ROOT_JSON), "--allow-example-keys"
    )
    assert done.returncode == 3 and "holds no synced state" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = cli(
        "sync",
        "http://127.0.0.1:1/m",
        "http://127.0.0.1:1/t",
        str(tmp_path / "m"),
        "--root",
        str(ROOT_JSON),
        "--allow-example-keys",
        "--keep",
        "0",
    )
    assert done.returncode == 2 and "--keep 0" in done.stderr and done.stderr.count("\n") == 1
    done = cli("serve", str(tmp_path / "m"), "--bind", "nonsense")
    assert done.returncode == 2 and "--bind 'nonsense'" in done.stderr


def test_sync_from_a_usb_disk_carried_in(upstream: Upstream, tmp_path: Path) -> None:
    """A site mirror filled over file:// from another mirror's export, verified the same."""
    outer = tmp_path / "outer"
    do_sync(upstream, outer)
    usb = tmp_path / "usb"
    mirror.export(outer, usb)
    inner = tmp_path / "inner"
    result = mirror.sync(
        f"file://{usb}/metadata", f"file://{usb}/targets", inner, ROOT_JSON, allow_example_keys=True
    )
    assert len(result.downloaded) == 2  # the image and its chunk index, exported with it
    assert served(inner)["metadata/timestamp.json"] == served(outer)["metadata/timestamp.json"]
    # A tampered image on the disk is refused like a tampered download.
    (image,) = (usb / "targets").rglob("*.zst")
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(TargetRejected, match="mismatch"):
        mirror.sync(
            f"file://{usb}/metadata",
            f"file://{usb}/targets",
            tmp_path / "third",
            ROOT_JSON,
            allow_example_keys=True,
        )
    assert not (tmp_path / "third" / "current").exists()
