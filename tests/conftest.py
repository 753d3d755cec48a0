"""Fixtures shared by every test: real tools on PATH and sparse disk images."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# Helper modules whose asserts should read like test asserts; registered before any
# test module imports them.
pytest.register_assert_rewrite(
    "tests.agentnode", "tests.httpserver", "tests.reposim", "tests.signing_helpers"
)

from tests.httpserver import http_server  # noqa: E402  (a fixture shared by all tests)

__all__ = ["http_server", "require_tool", "run_tool"]


def require_tool(name: str) -> str:
    """Path of a real tool; `make test` installs them, so a missing one is a failure."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None
    )
    if path is None:
        pytest.fail(f"{name} is not installed; run `make test`, which installs it")
    return path


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a real tool (sgdisk, cgpt, grub-editenv...) and capture its text output."""
    argv = [str(a) for a in args]
    argv[0] = require_tool(argv[0])
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@pytest.fixture
def sparse_disk(tmp_path: Path) -> Path:
    """A 64 MiB sparse file to lay a GPT on."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    return path
