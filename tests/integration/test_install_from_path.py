"""`updater install --from PATH` works whatever characters the medium's path holds: the
file:// URLs are built by quoting the path (`Path.as_uri`), not by pasting it into a
URL, where '#' starts a fragment, '?' a query and '%41' decodes to 'A'."""

from __future__ import annotations

import shutil

import pytest

from tests.agentnode import MiB, Node, node, sha

__all__ = ["node"]


@pytest.mark.parametrize("name", ["me#d?ia%41", "usb stick;&'\"", "%2e%2e"])
def test_install_from_a_medium_with_url_characters_in_its_path(node: Node, name: str) -> None:
    medium = node.root / "mnt" / name
    shutil.copytree(node.repo / "metadata", medium / "metadata")
    shutil.copytree(node.repo / "targets", medium / "targets")
    node.server.stop()  # offline: only the medium can answer
    result = node.ok("install", "--from", str(medium), "--no-reboot")
    assert (result["version"], result["slot"]) == ("2.0.0", "B")
    assert node.slot_sha("B", 3 * MiB + 2 * 4096) == sha(node.images["2.0.0"])
