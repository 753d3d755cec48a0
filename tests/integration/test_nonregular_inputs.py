"""Files that must be regular files: a FIFO (or directory) in their place is refused
with one line and a non-zero exit, never a hang.

Opening a FIFO for reading blocks until a writer appears, so before the fix each of
these hung forever: the config file, `trusted_root` and `os_release`. Every case is bounded:
library calls by `tests.bounded.within`, console scripts by a subprocess timeout, and
`tests.bounded.fifo` releases a stuck reader when the test ends.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.agentnode import BIN, Node, node
from tests.bounded import BOUND, fifo, within
from tests.reposim import RepositorySimulator, release_custom
from updater.errors import ConfigError
from updater.osrelease import image_version
from updater.repository import Repository

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


# --- through the console script -------------------------------------------------------


def updater(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "updater"), *map(str, args)], capture_output=True, text=True, timeout=BOUND
    )


def one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("updater: error: ") and expected in line, line


def node_config(node: Node, **replace: str) -> Path:
    """The node's config file with some `key = value` lines replaced."""
    node.write_config("A")
    lines = node.config.read_text().splitlines()
    for key, value in replace.items():
        lines = [f'{key} = "{value}"' if line.startswith(f"{key} =") else line for line in lines]
    node.config.write_text("\n".join(lines) + "\n")
    return node.config


def test_cli_config_that_is_a_fifo(tmp_path: Path) -> None:
    with fifo(tmp_path / "config.toml") as path:
        done = updater("--config", path, "status")
    one_line_error(done, f"config {path}: cannot read: not a regular file (a FIFO)")
    assert done.returncode == 2


def test_cli_trusted_root_that_is_a_fifo(node: Node, tmp_path: Path) -> None:
    with fifo(tmp_path / "root-fifo.json") as root:
        done = updater("--config", node_config(node, trusted_root=str(root)), "check")
    one_line_error(done, f"cannot read trusted root {root}: not a regular file (a FIFO)")
    assert done.returncode == 2


def test_cli_os_release_that_is_a_fifo(node: Node, tmp_path: Path) -> None:
    with fifo(tmp_path / "os-release-fifo") as path:
        done = updater("--config", node_config(node, os_release=str(path)), "status")
    one_line_error(done, f"os-release file {path}: not a regular file (a FIFO)")
