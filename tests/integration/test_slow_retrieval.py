"""TUF's slow-retrieval attack against the Repository, over real HTTP on 127.0.0.1.

tests/httpserver.py drips a body one byte at a time (`drip`) or sends nothing more
after the headers (`stall`). Every read returns well within the per-read timeout, so
before the limits existed a dripped `timestamp.json` took minutes and a dripped image
days. The configured limits are short here; the assertions are about the outcome
(which error, naming which URL and limit) and that the call ends - bounded by
`tests.bounded.within`, never by timing the code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.fetcher import DownloadLimits, RequestsFetcher
from core.repository import DownloadFailed, Repository
from tests.bounded import within
from tests.reposim import RepositorySimulator, release_custom

if TYPE_CHECKING:
    from tests.httpserver import HTTPTestServer

MIB = 1 << 20
IMAGE = random.Random(9).randbytes(2 * MIB + 17)
PATH = "x86_64-generic/1.0.0/root.img"
SHORT = DownloadLimits(metadata_deadline=1.0, min_rate=4096, rate_window=0.5)


@pytest.fixture
def sim(http_server: HTTPTestServer) -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(PATH, IMAGE, release_custom("1.0.0", raw=IMAGE))
    sim.publish_targets()
    assert http_server.root is not None
    sim.write_to(http_server.root)
    return sim


def repository(
    http_server: HTTPTestServer,
    sim: RepositorySimulator,
    tmp_path: Path,
    limits: DownloadLimits = SHORT,
    timeout: float = 10.0,
) -> Repository:
    root = tmp_path / "root.json"
    root.write_bytes(sim.signed_roots[0])
    return Repository(
        f"{http_server.url}/metadata",
        f"{http_server.url}/targets",
        root,
        tmp_path / "tuf",
        fetcher=RequestsFetcher(timeout=(timeout, timeout)),
        limits=limits,
    )


def stored(sim: RepositorySimulator) -> str:
    return "/targets/" + sim.stored_target_path(PATH)


def test_dripped_metadata_is_refused_at_the_deadline(
    http_server: HTTPTestServer, sim: RepositorySimulator, tmp_path: Path
) -> None:
    http_server.drip("/metadata/timestamp.json", interval=0.2)
    repo = repository(http_server, sim, tmp_path)
    with pytest.raises(DownloadFailed) as info:
        within(repo.refresh)
    message = str(info.value)
    assert f"fetching {http_server.url}/metadata/timestamp.json: " in message
    assert "not received within metadata_deadline = 1 s" in message
    assert "timestamp.json" not in {p.name for p in (tmp_path / "tuf").iterdir()}


def test_metadata_that_stalls_completely_ends_with_the_read_timeout(
    http_server: HTTPTestServer, sim: RepositorySimulator, tmp_path: Path
) -> None:
    http_server.stall("/metadata/timestamp.json", after=10)
    limits = DownloadLimits(metadata_deadline=60.0)
    repo = repository(http_server, sim, tmp_path, limits=limits, timeout=1.0)
    with pytest.raises(DownloadFailed, match=r"timestamp\.json for 1 s \(timeout\)"):
        within(repo.refresh)


def test_dripped_image_is_refused_below_the_minimum_rate(
    http_server: HTTPTestServer, sim: RepositorySimulator, tmp_path: Path
) -> None:
    repo = repository(http_server, sim, tmp_path)
    target = repo.get_targetinfo(PATH)
    http_server.drip(stored(sim), interval=0.01)
    with pytest.raises(DownloadFailed) as info:
        within(lambda: b"".join(repo.stream_target(target, retries=1, backoff=0.01)))
    message = str(info.value)
    assert f"giving up on {http_server.url}{stored(sim)} after 1 retries" in message
    assert "slower than min_rate = 4096 bytes/s over rate_window = 0.5 s" in message
    assert len(http_server.requests_for(stored(sim))) == 2  # the retry resumed, then gave up


def test_image_that_stalls_after_a_fast_start_is_refused(
    http_server: HTTPTestServer, sim: RepositorySimulator, tmp_path: Path
) -> None:
    repo = repository(http_server, sim, tmp_path, timeout=2.0)
    target = repo.get_targetinfo(PATH)
    http_server.stall(stored(sim), after=MIB)
    with pytest.raises(DownloadFailed, match=r"at byte \d+ of .*for 2 s \(timeout\)"):
        within(lambda: b"".join(repo.stream_target(target, retries=0)))


def test_fast_downloads_are_unaffected_by_the_limits(
    http_server: HTTPTestServer, sim: RepositorySimulator, tmp_path: Path
) -> None:
    limits = DownloadLimits(metadata_deadline=10.0, min_rate=64 * 1024, rate_window=1.0)
    repo = repository(http_server, sim, tmp_path, limits=limits)
    repo.refresh()
    assert b"".join(repo.stream_target(repo.get_targetinfo(PATH))) == IMAGE
    # A slow start is fine as long as the average over the window holds.
    http_server.cut(stored(sim), after=MIB + 5)
    assert b"".join(repo.stream_target(repo.get_targetinfo(PATH), backoff=0.01)) == IMAGE


def test_file_url_repository_is_read_within_the_limits(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    usb = tmp_path / "usb"
    sim.write_to(usb)
    root = tmp_path / "root.json"
    root.write_bytes(sim.signed_roots[0])
    repo = Repository(
        f"file://{usb}/metadata", f"file://{usb}/targets", root, tmp_path / "tuf", limits=SHORT
    )
    assert b"".join(repo.stream_target(repo.get_targetinfo(PATH))) == IMAGE
