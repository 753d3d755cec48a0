"""Fixtures of the end-to-end tests: cached node images and a fresh node per test.

Building the first time takes minutes (debootstrap); later sessions reuse the cache
(.cache/e2e, or $AB_E2E_CACHE) unless the builder, the package list or the project
source changed. Missing tools are a failure, never a skip: `make test` installs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tools.node import Node, build_release, default_cache_dir, make_node
from tools.node.disk import OVMF_CODE, OVMF_VARS
from tools.node.scenarios import Runner, start_selected

TOOLS = (
    "debootstrap", "qemu-system-x86_64", "mkfs.ext4", "tune2fs", "mkfs.vfat", "mcopy",
    "mmd", "grub-mkstandalone", "grub-editenv", "sfdisk",
)  # fmt: skip


@pytest.fixture(scope="session")
def e2e_cache() -> Path:
    for tool in TOOLS:
        require_tool(tool)
    for firmware in (OVMF_CODE, OVMF_VARS, Path("/usr/lib/grub/x86_64-efi/normal.mod")):
        if not firmware.exists():
            pytest.fail(f"{firmware} is missing; run `make test`, which installs it")
    return default_cache_dir()


@pytest.fixture(scope="session")
def release_v1(e2e_cache: Path) -> Path:
    """The ext4 image of release 1 (healthy), labelled for slot A."""
    return build_release(1, cache=e2e_cache)


@pytest.fixture
def node(tmp_path: Path, e2e_cache: Path, release_v1: Path) -> Node:
    """A fresh node: release 1 in slot A, slot B empty, grubenv ORDER="A B" A_OK=1."""
    return make_node(tmp_path / "node", release_v1, cache=e2e_cache)


@pytest.fixture(scope="session", autouse=True)
def scenario_runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runner | None]:
    """Starts the selected update scenarios (test_scenarios.py) in the background as the
    e2e session begins, two QEMUs at a time, so their boots overlap (see scenarios.Runner)."""
    names = [i.name for i in request.session.items if i.path.name == "test_scenarios.py"]
    if not names:
        yield None
        return
    cache: Path = request.getfixturevalue("e2e_cache")
    runner = Runner(tmp_path_factory.mktemp("scenarios"), cache)
    start_selected(runner, names)
    yield runner
    runner.close()
