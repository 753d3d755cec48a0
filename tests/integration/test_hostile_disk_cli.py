"""Through the console script: a node whose disk or grubenv is hostile or not what the
config says gets one line on stderr, the error's exit code and no change to the disk.

A CRC-valid GPT is still untrusted: before the fix an entry spanning LBA 0-133119 made
`updater install` overwrite the protective MBR, the primary GPT and the ESP and exit 0,
an entry ending before it starts was a traceback, and equal PARTUUIDs went unnoticed.
A directory or FIFO as `disk` or `grubenv` was a traceback or a hang.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from tests.agentnode import Node, node
from tests.bounded import fifo
from tests.integration.test_layout_cli import sparse_digest
from updater.disk import gpt

__all__ = ["node"]


def _plant(disk: Path, change: dict[str, object]) -> None:
    """Rewrite root_b's entry with the module's own builder (both CRCs right), bypassing
    the validation that `write_gpt` would do."""
    table = gpt.read_gpt(disk)
    if change.get("unique_guid") == "root_a":
        change = {**change, "unique_guid": table.find("root_a").unique_guid}
    b = dataclasses.replace(table.find("root_b"), **change)  # type: ignore[arg-type]
    hostile = dataclasses.replace(
        table, partitions=[b if p.name == "root_b" else p for p in table.partitions]
    )
    fd = os.open(disk, os.O_RDWR)
    try:
        gpt.write_tables(fd, disk, gpt.build_tables(hostile))
    finally:
        os.close(fd)


def _one_line(done: subprocess.CompletedProcess[str], code: int, expected: str) -> str:
    """The one error line (besides the agent's INFO log lines) and the exit code."""
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    (line,) = [x for x in lines if not x.startswith("updater: INFO: ")]
    assert line.startswith("updater: error: ") and expected in line, line
    return line


HOSTILE: dict[str, tuple[dict[str, object], str]] = {
    "over the MBR, GPT and ESP": (
        {"first_lba": 0, "last_lba": 133119},
        "partition 3 ('root_b') sectors 0-133119 are outside the usable range 34-",
    ),
    "first after last": (
        {"first_lba": 1705983, "last_lba": 919552},
        "partition 3 ('root_b') ends at sector 919552, before its first sector 1705983",
    ),
    "root_a's PARTUUID": (
        {"unique_guid": "root_a"},
        "partitions 2 ('root_a') and 3 ('root_b') have the same unique GUID",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["status", "install"])
def test_hostile_gpt_is_refused_and_nothing_is_written(node: Node, case: str, command: str) -> None:
    change, message = HOSTILE[case]
    _plant(node.disk, change)
    disk, grubenv = sparse_digest(node.disk), node.grubenv.read_bytes()
    line = _one_line(node.run(command), 3, message)
    assert line.startswith(f"updater: error: {node.disk}: "), line
    assert sparse_digest(node.disk) == disk
    assert node.grubenv.read_bytes() == grubenv


@pytest.mark.parametrize("command", [("status",), ("install",), ("activate", "A")])
def test_a_directory_or_fifo_as_disk_is_one_line(
    node: Node, tmp_path: Path, command: tuple[str, ...]
) -> None:
    grubenv = node.grubenv.read_bytes()
    node.disk = tmp_path / "a-directory"
    node.disk.mkdir()
    why = "not a disk: a directory (a disk is a block device or an image file)"
    _one_line(node.run(*command), 4, f"cannot open {node.disk}: {why}")
    with fifo(tmp_path / "a-fifo") as path:
        node.disk = path
        done = node.run(*command)  # bounded: Node.run has a timeout
    _one_line(done, 4, f"cannot open {path}: not a disk: a FIFO")
    assert node.grubenv.read_bytes() == grubenv


@pytest.mark.parametrize("command", [("status",), ("install",), ("activate", "A")])
def test_a_directory_or_fifo_as_grubenv_is_one_line(
    node: Node, tmp_path: Path, command: tuple[str, ...]
) -> None:
    disk = sparse_digest(node.disk)
    node.grubenv = tmp_path / "grub"
    node.grubenv.mkdir()
    why = "not a GRUB environment block: not a regular file (a directory)"
    _one_line(node.run(*command), 3, f"{node.grubenv}: {why}")
    assert list(node.grubenv.iterdir()) == []
    with fifo(tmp_path / "grubenv-fifo") as path:
        node.grubenv = path
        done = node.run(*command)
    _one_line(done, 3, f"{path}: not a GRUB environment block: not a regular file (a FIFO)")
    assert sparse_digest(node.disk) == disk
