"""`updater tuf-client` (tuf-conformance CLIENT-CLI) against a simulated repository
served over real HTTP on 127.0.0.1: through click's CliRunner and the console script."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from tests.reposim import RepositorySimulator, release_custom
from updater.cli import cli

if TYPE_CHECKING:
    from tests.httpserver import HTTPTestServer


NAME = "x86_64-generic/1.0.0/root img.img"  # a space and a slash: quoted on disk
DATA = bytes(range(256)) * 4096


@pytest.fixture
def sim(http_server: HTTPTestServer) -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(NAME, DATA, release_custom("1.0.0", raw=DATA))
    sim.publish_targets()
    assert http_server.root is not None
    sim.write_to(http_server.root)
    return sim


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["tuf-client", *map(str, args)])
    return result.exit_code, result.output


def opts(tmp_path: Path, server: HTTPTestServer) -> list[str | Path]:
    return ["--metadata-dir", tmp_path / "md", "--metadata-url", f"{server.url}/metadata"]


def download_opts(tmp_path: Path, server: HTTPTestServer) -> list[str | Path]:
    return [
        *opts(tmp_path, server),
        "--target-name",
        NAME,
        "--target-base-url",
        f"{server.url}/targets/",
        "--target-dir",
        tmp_path / "dl",
    ]


def init(sim: RepositorySimulator, tmp_path: Path) -> None:
    (tmp_path / "root.json").write_bytes(sim.signed_roots[0])
    assert run("--metadata-dir", tmp_path / "md", "init", tmp_path / "root.json")[0] == 0


def test_init_refresh_download(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    init(sim, tmp_path)
    assert (tmp_path / "md" / "root.json").read_bytes() == sim.signed_roots[0]
    assert run(*opts(tmp_path, http_server), "refresh") == (0, "")
    assert (tmp_path / "md" / "timestamp.json").exists()
    code, _ = run(*download_opts(tmp_path, http_server), "download")
    assert code == 0
    assert (tmp_path / "dl" / "x86_64-generic%2F1.0.0%2Froot%20img.img").read_bytes() == DATA
    target_fetches = [r for r in http_server.requests if r.path.startswith("/targets/")]
    assert len(target_fetches) == 1
    # A second download finds the verified file in place and fetches no target.
    assert run(*download_opts(tmp_path, http_server), "download")[0] == 0
    assert [r for r in http_server.requests if r.path.startswith("/targets/")] == target_fetches


def test_init_refuses_a_root_that_is_not_self_signed(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    bad = sim.signed_roots[0].replace(b'"version": 1', b'"version": 7')
    (tmp_path / "root.json").write_bytes(bad)
    code, out = run("--metadata-dir", tmp_path / "md", "init", tmp_path / "root.json")
    assert code == 1
    assert out.startswith("updater tuf-client: error: trusted root") and out.count("\n") == 1


def test_refresh_of_expired_metadata_exits_1(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    init(sim, tmp_path)
    sim.timestamp.expires = sim.past
    sim.update_timestamp()
    assert http_server.root is not None
    sim.write_to(http_server.root)
    code, out = run(*opts(tmp_path, http_server), "refresh")
    assert code == 1
    assert "ExpiredMetadataError" in out and "Traceback" not in out


def test_download_of_a_tampered_target_exits_1_and_writes_nothing(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    init(sim, tmp_path)
    http_server.tamper("/targets/" + sim.stored_target_path(NAME), offset=1000)
    code, out = run(*download_opts(tmp_path, http_server), "download")
    assert code == 1
    assert "sha256 mismatch" in out
    assert list((tmp_path / "dl").iterdir()) == []  # no partial or temp file left


def test_download_of_an_unknown_target_exits_1(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    init(sim, tmp_path)
    args = [a if a != NAME else "no/such.img" for a in download_opts(tmp_path, http_server)]
    code, out = run(*args, "download")
    assert (code, "not in the trusted targets metadata" in out) == (1, True)


def test_console_script(
    sim: RepositorySimulator, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    exe = Path(sys.executable).parent / "updater"
    sim.timestamp.version = 10
    assert http_server.root is not None
    sim.write_to(http_server.root)
    (tmp_path / "root.json").write_bytes(sim.signed_roots[0])
    subprocess.run(
        [exe, "tuf-client", "--metadata-dir", tmp_path / "md", "init", tmp_path / "root.json"],
        check=True,
    )
    argv = [str(exe), "tuf-client", *map(str, download_opts(tmp_path, http_server)), "download"]
    subprocess.run(argv, check=True)
    (out,) = (tmp_path / "dl").iterdir()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(DATA).hexdigest()
    sim.timestamp.version = 9  # a rollback
    sim.write_to(http_server.root)
    failed = subprocess.run(argv, capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.startswith("updater tuf-client: error:")
    assert "BadVersionNumberError" in failed.stderr
