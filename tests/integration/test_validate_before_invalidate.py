"""A release that can never be installed is refused before the inactive slot is touched:
slot B keeps its bytes, its verified version in the journal and its bootloader state,
however often the install is retried (so a bad release cannot cost a node its rollback
slot). Through the console script, on the node's sparse 1 GiB disk whose slots are
384 MiB (partition-layouts/grub-efi-ab.toml).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.agentnode import MiB, Node, node
from tests.signing_helpers import ImageSpec, add_release, publish

__all__ = ["node"]


def journal(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((node.root / "state" / "journal.json").read_text())
    return data


def sparse_image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)  # zstd makes 385 MiB of zeros a few KiB
    return path


def test_an_image_larger_than_the_slot_is_refused_before_anything_is_touched(
    node: Node,
) -> None:
    assert node.ok("install", "--no-activate")["slot"] == "B"  # B verified to hold 2.0.0
    add_release(node.repo, [ImageSpec(sparse_image(node.root / "big.img", 385 * MiB), "3.0.0")])
    publish(node.repo)
    grubenv = node.grubenv.read_bytes()
    before = journal(node)
    assert before["slots"]["B"]["version"] == "2.0.0"

    for attempt in range(2):  # a retry changes nothing either
        done = node.run("install")
        assert done.returncode == 3, (attempt, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "3.0.0" in lines[0] and "root.img" in lines[0], lines[0]
        assert f"{385 * MiB} bytes" in lines[0] and f"{384 * MiB} bytes" in lines[0], lines[0]
        assert "slot B root (root_b" in lines[0], lines[0]
        assert node.grubenv.read_bytes() == grubenv
        after = journal(node)
        assert after["slots"] == before["slots"] and after["pending"] == before["pending"]
        assert after["failed_versions"] == {}  # the node is fine; the release is not
        assert "not fit" in after["last_error"]  # and `status` says why
        assert node.holds("B", "2.0.0")
        # Nothing of the image was even downloaded.
        assert not any("3.0.0" in r.path and "root.img" in r.path for r in node.server.requests)

    # `check` tells the same before anyone tries.
    done = node.run("check")
    assert done.returncode == 3 and "not fit" in done.stderr
    # The slot is still usable as it was: activating its verified 2.0.0 works.
    assert node.ok("activate", "B")["primary_slot"] == "B"
