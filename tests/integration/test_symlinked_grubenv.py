"""The file GRUB reads is the file we write: a grubenv configured through a symlink.

On many nodes `/boot/grub/grubenv` (or the configured path) is a symlink to the file on
the ESP. `grub-editenv` writes through it; so must the agent, or it reports "slot B
boots next" while the file GRUB reads still says ORDER="A B".
"""

from __future__ import annotations

import os

from tests.agentnode import Node, node
from tests.conftest import run_tool

__all__ = ["node"]


def test_install_and_commit_write_the_file_the_symlink_names(node: Node) -> None:
    esp = node.root / "esp" / "EFI" / "BOOT"
    esp.mkdir(parents=True)
    real = esp / "grubenv"
    os.replace(node.grubenv, real)
    node.grubenv.symlink_to(real)

    result = node.ok("install")
    assert result["slot"] == "B" and result["activated"]

    assert node.grubenv.is_symlink() and os.readlink(node.grubenv) == str(real)
    listed = run_tool("grub-editenv", real, "list").stdout.splitlines()
    assert "ORDER=B A" in listed and "B_OK=1" in listed and "B_TRY=0" in listed

    node.grub_boots("B")  # grub-editenv, through the link, as GRUB's own write would land
    assert node.ok("health-check", booted="B")["action"] == "committed"
    assert node.grubenv.is_symlink()
    listed = run_tool("grub-editenv", real, "list").stdout.splitlines()
    assert "B_TRY=0" in listed and "ORDER=B A" in listed
    assert sorted(p.name for p in esp.iterdir()) == ["grubenv"]  # no temp file left
