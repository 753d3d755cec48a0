"""Files that must be regular files: a FIFO (or directory) in their place is refused
with one line and a non-zero exit, never a hang.

Opening a FIFO for reading blocks until a writer appears, so before the fix each of
these hung forever: the config file, `trusted_root`, `os_release`, and on a `--from`
medium (file:// URLs) `metadata/timestamp.json` or a target. Every case is bounded:
library calls by `tests.bounded.within`, console scripts by a subprocess timeout, and
`tests.bounded.fifo` releases a stuck reader when the test ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.repository import DownloadFailed, Repository
from tests.agentnode import Node, node
from tests.bounded import fifo, within
from tests.configedit import edited_config, one_line_error, run_updater
from tests.reposim import RepositorySimulator, release_custom
from updater.osrelease import image_version

__all__ = ["node"]

IMAGE = b"image bytes\n" * 1000
PATH = "x86_64-generic/1.0.0/root.img"


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(PATH, IMAGE, release_custom("1.0.0", raw=IMAGE))
    sim.publish_targets()
    return sim


def medium(sim: RepositorySimulator, tmp_path: Path) -> tuple[Path, Path]:
    """A repository on a mounted medium (fresh keys) and its trusted root file."""
    usb = tmp_path / "usb"
    sim.write_to(usb)
    root = tmp_path / "root.json"
    root.write_bytes(sim.signed_roots[0])
    return usb, root


def file_repository(usb: Path, root: Path, tmp_path: Path) -> Repository:
    return Repository(f"file://{usb}/metadata", f"file://{usb}/targets", root, tmp_path / "tuf")


# --- the library calls ----------------------------------------------------------------


def test_trusted_root_that_is_a_fifo(sim: RepositorySimulator, tmp_path: Path) -> None:
    usb, _ = medium(sim, tmp_path)
    with fifo(tmp_path / "root-fifo.json") as root, pytest.raises(ConfigError) as info:
        within(lambda: file_repository(usb, root, tmp_path))
    assert str(info.value) == f"cannot read trusted root {root}: not a regular file (a FIFO)"


def test_trusted_root_that_is_a_directory(sim: RepositorySimulator, tmp_path: Path) -> None:
    usb, _ = medium(sim, tmp_path)
    with pytest.raises(ConfigError, match=r"not a regular file \(a directory\)$"):
        file_repository(usb, tmp_path, tmp_path)


def test_os_release_that_is_a_fifo(tmp_path: Path) -> None:
    with fifo(tmp_path / "os-release") as path, pytest.raises(ConfigError) as info:
        within(lambda: image_version(path))
    assert str(info.value) == f"os-release file {path}: not a regular file (a FIFO)"
    assert image_version(tmp_path / "missing") is None  # absent: the version is unknown


def test_file_url_metadata_that_is_a_fifo(sim: RepositorySimulator, tmp_path: Path) -> None:
    usb, root = medium(sim, tmp_path)
    (usb / "metadata" / "timestamp.json").unlink()
    repo = file_repository(usb, root, tmp_path)
    with fifo(usb / "metadata" / "timestamp.json"), pytest.raises(DownloadFailed) as info:
        within(repo.refresh)
    assert str(info.value).endswith(
        f"fetching file://{usb}/metadata/timestamp.json: cannot open "
        f"file://{usb}/metadata/timestamp.json: not a regular file (a FIFO)"
    )


def test_file_url_target_that_is_a_fifo(sim: RepositorySimulator, tmp_path: Path) -> None:
    usb, root = medium(sim, tmp_path)
    repo = file_repository(usb, root, tmp_path)
    target = repo.get_targetinfo(PATH)
    stored = usb / "targets" / sim.stored_target_path(PATH)
    stored.unlink()
    with fifo(stored), pytest.raises(DownloadFailed, match=r"not a regular file \(a FIFO\)"):
        within(lambda: b"".join(repo.stream_target(target, retries=0)))


# --- through the console script -------------------------------------------------------


def test_cli_config_that_is_a_fifo(tmp_path: Path) -> None:
    with fifo(tmp_path / "config.toml") as path:
        done = run_updater("--config", path, "status")
    one_line_error(done, f"config {path}: cannot read: not a regular file (a FIFO)")
    assert done.returncode == 2


def test_cli_trusted_root_that_is_a_fifo(node: Node, tmp_path: Path) -> None:
    with fifo(tmp_path / "root-fifo.json") as root:
        done = run_updater("--config", edited_config(node, trusted_root=str(root)), "check")
    one_line_error(done, f"cannot read trusted root {root}: not a regular file (a FIFO)")
    assert done.returncode == 2


def test_cli_os_release_that_is_a_fifo(node: Node, tmp_path: Path) -> None:
    with fifo(tmp_path / "os-release-fifo") as path:
        done = run_updater("--config", edited_config(node, os_release=str(path)), "status")
    one_line_error(done, f"os-release file {path}: not a regular file (a FIFO)")


def test_cli_medium_whose_timestamp_is_a_fifo(
    node: Node, sim: RepositorySimulator, tmp_path: Path
) -> None:
    usb, root = medium(sim, tmp_path)
    (usb / "metadata" / "timestamp.json").unlink()
    config = edited_config(node, trusted_root=str(root))
    with fifo(usb / "metadata" / "timestamp.json"):
        done = run_updater("--config", config, "check", "--from", usb)
    one_line_error(done, "timestamp.json: not a regular file (a FIFO)")
    assert done.returncode == 4
