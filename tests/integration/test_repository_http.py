"""Repository over a real HTTP server on 127.0.0.1: refresh, stream, resume, faults.

The repository is laid out on disk by the simulator (or built by the real signing
tools, `tests.signing_helpers`) and served by tests/httpserver.py, which can cut the
connection, tamper a byte, send an endless body or fail with 5xx on demand.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from core import release
from core.repository import (
    DownloadFailed,
    MetadataRejected,
    Repository,
    TargetRejected,
)
from tests.reposim import RepositorySimulator, release_custom
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo, write_image
from updater.select import select

if TYPE_CHECKING:  # the http_server fixture comes from tests/conftest.py
    from tests.httpserver import HTTPTestServer


MIB = 1 << 20
IMAGE = random.Random(4).randbytes(5 * MIB + 123)  # deterministic, not a chunk multiple
PATH = "x86_64-generic/1.0.0/root.img"


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(PATH, IMAGE, release_custom("1.0.0", raw=IMAGE))
    sim.publish_targets()
    return sim


@pytest.fixture
def repo(sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path) -> Repository:
    assert http_server.root is not None
    sim.write_to(http_server.root)
    trusted_root = tmp_path / "root.json"
    trusted_root.write_bytes(sim.signed_roots[0])
    repo = Repository(
        f"{http_server.url}/metadata/",
        f"{http_server.url}/targets",
        trusted_root,
        tmp_path / "tuf",
        session=requests.Session(),
    )
    repo.refresh()
    return repo


def stored(sim: RepositorySimulator) -> str:
    return "/targets/" + sim.stored_target_path(PATH)


def download(repo: Repository, **kw: float) -> tuple[bytes, list[int]]:
    """All bytes and the sizes of the chunks as yielded."""
    chunks = list(repo.stream_target(repo.get_targetinfo(PATH), backoff=0.01, **kw))  # type: ignore[arg-type]
    return b"".join(chunks), [len(c) for c in chunks]


def test_multi_mib_target_streams_in_chunks(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    data, sizes = download(repo)
    assert data == IMAGE
    assert len(sizes) >= 5 and max(sizes) <= MIB
    (logged,) = http_server.requests_for(stored(sim))
    assert logged.range is None


def test_connection_cut_mid_image_resumes_with_range(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.cut(stored(sim), after=3 * MIB + 7)
    data, _ = download(repo)
    assert data == IMAGE
    first, second = http_server.requests_for(stored(sim))
    assert first.range is None
    assert second.range is not None
    offset = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= 3 * MIB + 7


def test_resume_against_a_server_that_ignores_range(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.cut(stored(sim), after=2 * MIB, times=2)
    http_server.ignore_range(stored(sim))
    data, _ = download(repo)
    assert data == IMAGE  # the re-sent prefix was skipped, not appended
    assert [r.range is not None for r in http_server.requests_for(stored(sim))] == [
        False,
        True,
        True,
    ]


def test_tampered_byte_is_rejected_at_the_end(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.tamper(stored(sim), offset=4 * MIB)
    received = 0
    with pytest.raises(TargetRejected, match=r"root\.img: sha256 mismatch"):
        for chunk in repo.stream_target(repo.get_targetinfo(PATH)):
            received += len(chunk)
    assert received == len(IMAGE)  # every byte came through; the verdict came last


def test_endless_body_is_aborted_at_the_trusted_length(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.endless(stored(sim))
    received = 0
    with pytest.raises(TargetRejected, match="more than its trusted length of 5243003"):
        for chunk in repo.stream_target(repo.get_targetinfo(PATH), chunk_size=64 * 1024):
            received += len(chunk)
    assert len(IMAGE) - 64 * 1024 < received <= len(IMAGE)
    assert len(http_server.requests_for(stored(sim))) == 1


def test_longer_file_than_trusted_is_aborted(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.files[stored(sim)] = IMAGE + b"trailing malware"
    with pytest.raises(TargetRejected, match="more than its trusted length"):
        download(repo)


def test_shorter_file_than_trusted_is_rejected(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.files[stored(sim)] = IMAGE[:-1]
    with pytest.raises(TargetRejected, match="ended after 5243002 bytes"):
        download(repo)


def test_5xx_is_retried_then_succeeds(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.fail(stored(sim), status=503, times=2)
    data, _ = download(repo, retries=2)
    assert data == IMAGE
    assert len(http_server.requests_for(stored(sim))) == 3


def test_retries_exhausted_is_download_failed(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.cut(stored(sim), after=MIB, times=-1)
    with pytest.raises(DownloadFailed, match=r"giving up on .*root\.img after 3 retries"):
        download(repo, retries=3)
    assert len(http_server.requests_for(stored(sim))) == 4


def test_404_fails_at_once(
    repo: Repository, sim: RepositorySimulator, http_server: HTTPTestServer
) -> None:
    http_server.fail(stored(sim), status=404, times=-1)
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        download(repo)
    assert len(http_server.requests_for(stored(sim))) == 1


def test_metadata_5xx_is_download_failed_and_tampered_metadata_rejected(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    assert http_server.root is not None
    sim.write_to(http_server.root)
    trusted_root = tmp_path / "root.json"
    trusted_root.write_bytes(sim.signed_roots[0])

    def fresh() -> Repository:
        return Repository(
            f"{http_server.url}/metadata",
            f"{http_server.url}/targets",
            trusted_root,
            tmp_path / "tuf",
        )

    http_server.fail("/metadata/timestamp.json", status=500)
    with pytest.raises(DownloadFailed, match=r"timestamp\.json: HTTP 500"):
        fresh().refresh()
    http_server.tamper("/metadata/timestamp.json", offset=200)
    with pytest.raises(MetadataRejected, match=r"timestamp\.json rejected"):
        fresh().refresh()


def test_usb_mirror_over_file_urls(sim: RepositorySimulator, tmp_path: Path) -> None:
    mirror = tmp_path / "usb"
    sim.write_to(mirror)
    trusted_root = tmp_path / "root.json"
    trusted_root.write_bytes(sim.signed_roots[0])
    repo = Repository(
        f"file://{mirror}/metadata", f"file://{mirror}/targets", trusted_root, tmp_path / "tuf"
    )
    repo.refresh()
    assert b"".join(repo.stream_target(repo.get_targetinfo(PATH))) == IMAGE
    (mirror / "targets" / sim.stored_target_path(PATH)).write_bytes(IMAGE + b"x")
    with pytest.raises(TargetRejected, match="more than its trusted length"):
        b"".join(repo.stream_target(repo.get_targetinfo(PATH)))


def test_repository_built_by_the_signing_tools(http_server: HTTPTestServer, tmp_path: Path) -> None:
    image = write_image(tmp_path / "root.raw", 3 * MIB + 5)
    assert http_server.root is not None
    make_repo(http_server.root, [ImageSpec(image, "1.2.0", compression="none")])
    with pytest.raises(MetadataRejected) as info:
        Repository(
            f"{http_server.url}/metadata", f"{http_server.url}/targets", ROOT_JSON, tmp_path / "no"
        )
    assert str(info.value).startswith(
        f"trusted root {ROOT_JSON}: names the example key keys-example/root, "
        "keys-example/snapshot, keys-example/targets, keys-example/timestamp: its private key "
        "is published in keys-example/ for demos and tests, so anyone can sign with it; "
        "refused unless [repository] allow_example_keys = true"
    )
    assert http_server.requests == []  # refused before anything was fetched
    repo = Repository(
        f"{http_server.url}/metadata",
        f"{http_server.url}/targets",
        ROOT_JSON,
        tmp_path / "tuf",
        allow_example_keys=True,  # a test: the repository is signed with keys-example/
    )
    targets = repo.targets()
    chosen = select(
        targets,
        hardware="x86_64-efi",
        channel="stable",
        installed_version="1.0.0",
        failed_versions=(),
    )
    assert chosen is not None and chosen.version == "1.2.0"
    release.check_roles(chosen, ["root"])
    img = chosen.images["root"]
    http_server.cut("/targets/" + repo.target_url(img.target).split("/targets/", 1)[1], after=MIB)
    assert b"".join(repo.stream_target(img.target, backoff=0.01)) == image.read_bytes()
