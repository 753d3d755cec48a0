"""Virtual ab-updater nodes: real GRUB, kernel and agent in QEMU, for the end-to-end tests
(tests/e2e) and `make demo`; the update stories told on them are in `tools.node.scenarios`.

What a scenario uses:

    image = build_release(1)                        # ext4 slot image of release v1
    node = make_node(tmp_path / "node", image)      # GPT disk, GRUB ESP, v1 in slot A
    result = boot(node, updates_disk=make_updates_disk(repo, tmp_path / "u.img",
                                                       commands=("updater install",)))
    result.booted["slot"], result.exit_reason, node.read_grubenv()

Layers are cached under .cache/e2e (see `cache`): base rootfs, wheels, releases,
GRUB image, template disk; each is rebuilt when its inputs change. docs/e2e.md
describes the node (init, markers, disks) and what it costs.
"""

from __future__ import annotations

from pathlib import Path

from tools.node.cache import default_cache_dir
from tools.node.disk import (
    Node,
    make_node,
    make_updates_disk,
    node_template,
    partitions,
    write_image,
)
from tools.node.qemu import BootResult, boot, boot_until
from tools.node.release import build_release, relabel

__all__ = [
    "BootResult",
    "Node",
    "boot",
    "boot_until",
    "build_node",
    "build_release",
    "default_cache_dir",
    "make_node",
    "make_updates_disk",
    "node_template",
    "partitions",
    "relabel",
    "write_image",
]


def build_node(cache: Path | None = None, *, version: int | str = 1) -> Path:
    """The cached template disk of a fresh node running release `version` in slot A."""
    return node_template(build_release(version, cache=cache), cache=cache)
