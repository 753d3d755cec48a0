"""The e2e node's compiled agent names its files by their path on the node.

tools/node/release.py compiles the agent in the staged rootfs (the root filesystem is
mounted read-only on the node). Each .pyc embeds its source path (co_filename); built
from `<cache>/.release-<key>.partial/stage/usr/lib/...` it named a host directory that
changes with every release, so two releases of the same source differed in every .pyc
(1,568 files in bench/delta.py's pair) - bytes a delta update had to fetch - and node
tracebacks named paths that do not exist there. The stage prefix is stripped.
"""

from __future__ import annotations

import marshal
from pathlib import Path

from tools.node import release as builder


def _stage(root: Path) -> Path:
    for rel in ("usr/bin", "usr/lib/python3/dist-packages"):
        (root / rel).mkdir(parents=True)
    site = root.parent / f"{root.name}-site"
    (site / "dep").mkdir(parents=True)
    (site / "dep/__init__.py").write_text("VALUE = 1\n")
    builder._install_agent(root, site)
    return root


def _pycs(root: Path) -> dict[str, bytes]:
    lib = root / "usr/lib/ab-updater"
    return {str(p.relative_to(lib)): p.read_bytes() for p in sorted(lib.rglob("*.pyc"))}


def test_pycs_name_node_paths_and_do_not_depend_on_the_stage(tmp_path: Path) -> None:
    one = _pycs(_stage(tmp_path / "stage-one"))
    two = _pycs(_stage(tmp_path / "elsewhere" / "stage-two"))
    assert len(one) > 20 and sorted(one) == sorted(two)
    for rel, data in one.items():
        source = rel.replace("__pycache__/", "").replace(".cpython-311.pyc", ".py")
        assert marshal.loads(data[16:]).co_filename == f"/usr/lib/ab-updater/{source}"
    assert [rel for rel in one if one[rel] != two[rel]] == []
