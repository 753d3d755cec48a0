"""A delta install through the install engine (`install.write_blocks`, docs/delta.md):
images larger than one 4 MiB block, so chunks straddle blocks and chunks in place in the
inactive slot sit among written ones; in-place chunks damaged before the install are
fetched, and changed between being read and the read-back are refused; a slot too
damaged to reuse falls back to the full stream; progress counts reused bytes.

The console script runs the installs that set the slots up; the cases that change a
slot between a block's writeback and its read-back call `delta.install_partition` in
this process, with `readback.before_read_back` (the read-back's fault-injection seam)
and a `core.repository.Repository` against the same real HTTP server.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator

import pytest

from core.chunkindex import ChunkIndex
from core.release import Image, releases
from core.repository import Repository
from tests.agentnode import MiB, Node, node
from tests.integration.test_delta_install import (
    containing,
    corrupt,
    found_in,
    in_place,
    index_of,
    ranges,
    release,
    served,
)
from tests.signing_helpers import ROOT_JSON, ImageSpec, add_release, publish
from updater import delta, deltablocks, readback
from updater.disk.gpt import read_gpt
from updater.install import BLOCK_SIZE, ReadBackMismatch, SlotGuard
from updater.slots import PartitionTarget

__all__ = ["node"]  # the fixture

SIZE = 2 * BLOCK_SIZE + 1 * MiB + 3 * 4096  # three blocks, the last short
CHANGED = (BLOCK_SIZE - 300 * 1024, 2 * BLOCK_SIZE + 200 * 1024)  # 4 KiB new at each


def big_base(node: Node) -> None:
    """Release 5.0.0 (SIZE random bytes) installed into B in full (B's index recorded),
    booted and committed; then 6.0.0 and 7.0.0, each 5.0.0 with 4 KiB changed twice."""
    path = node.root / "v5.0.0.img"
    path.write_bytes(random.Random(5).randbytes(SIZE))
    node.images["5.0.0"] = path
    add_release(node.repo, [ImageSpec(path, "5.0.0")])
    publish(node.repo)
    first = node.ok("install", "--no-reboot", "--version", "5.0.0")
    assert first["bytes_reused"] == {} and node.holds("B", "5.0.0")
    node.grub_boots("B")
    assert node.ok("health-check", booted="B")["action"] == "committed"
    release(node, "6.0.0", "5.0.0", CHANGED)
    release(node, "7.0.0", "6.0.0", (50 * 1024, BLOCK_SIZE + 77 * 1024))


def straddling(index: ChunkIndex) -> list[int]:
    """The chunks of `index` that cross a block boundary."""
    return [
        c.index
        for c in index
        if c.raw_offset // BLOCK_SIZE != (c.raw_offset + c.raw_length - 1) // BLOCK_SIZE
    ]


def progress_events(stdout: str) -> list[dict[str, int]]:
    lines = [json.loads(line) for line in stdout.strip().splitlines()]
    return [e for e in lines if e.get("event") == "progress"]


def test_images_of_several_blocks_land_byte_identical_by_delta(node: Node) -> None:
    big_base(node)
    v5, v6, v7 = (index_of(node, v) for v in ("5.0.0", "6.0.0", "7.0.0"))
    assert len(straddling(v6)) == 2  # chunks across both block boundaries
    done = node.run("install", "--no-reboot", "--version", "6.0.0", booted="B")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert node.holds("A", "6.0.0")
    assert result["bytes_reused"] == {"B": found_in(v6, v5)} and found_in(v6, v5) > SIZE // 2
    events = progress_events(done.stdout)
    assert events[-1]["done"] == events[-1]["total"] == SIZE  # reused bytes counted too
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)
    # 7.0.0 into B: B holds 5.0.0 in place (the chunks at the block boundaries among
    # them: held, not written, read back), the rest from A.
    node.ok("activate", "A", booted="B")
    node.grub_boots("A")
    assert node.ok("health-check", booted="A")["action"] == "committed"
    here = in_place(v7, v5)
    assert {c.index for c in here} & set(straddling(v7))
    again = node.ok("install", "--no-reboot", "--version", "7.0.0", booted="A")
    assert node.holds("B", "7.0.0")
    assert again["bytes_reused"]["B"] == sum(c.raw_length for c in here)
    assert again["bytes_reused"]["A"] > 0


def test_a_damaged_in_place_chunk_is_fetched(node: Node) -> None:
    big_base(node)
    node.ok("install", "--no-reboot", "--version", "6.0.0", booted="B")
    node.ok("activate", "A", booted="B")
    node.grub_boots("A")
    assert node.ok("health-check", booted="A")["action"] == "committed"
    v5, v7 = index_of(node, "5.0.0"), index_of(node, "7.0.0")
    here = in_place(v7, v5)
    damaged = containing(v7, 3 * MiB + 5)
    assert damaged in here
    corrupt(node, "B", 3 * MiB + 5)  # the inactive slot no longer matches its index
    result = node.ok("install", "--no-reboot", "--version", "7.0.0", booted="A")
    assert node.holds("B", "7.0.0")
    assert result["bytes_reused"]["B"] == sum(c.raw_length for c in here) - damaged.raw_length
    start = damaged.compressed_offset
    alone = f"bytes={start}-{start + damaged.compressed_length - 1}"
    assert alone in ranges(node, served(node, "7.0.0", "root.img.zst"))


# --- in this process: the read-back's fault-injection seam -------------------------


def slot(node: Node, name: str) -> PartitionTarget:
    gpt = read_gpt(node.disk)
    part = gpt.find(f"root_{name.lower()}")
    size = (part.last_lba - part.first_lba + 1) * gpt.sector_size
    return PartitionTarget(name, "root", f"root_{name.lower()}", node.disk,
                           part.first_lba * gpt.sector_size, size)  # fmt: skip


def image_of(node: Node, version: str) -> tuple[Repository, Image]:
    repo = Repository(
        f"{node.server.url}/metadata", f"{node.server.url}/targets", ROOT_JSON,
        node.root / "tuf-in-process", allow_example_keys=True,
    )  # fmt: skip
    repo.refresh()
    (found,) = [r for r in releases(repo.targets(), "x86_64-efi", "stable") if r.version == version]
    return repo, found.images["root"]


@pytest.fixture
def seam() -> Iterator[list[tuple[int, int]]]:
    """Blocks read back so far (position, length); a test sets the hook itself."""
    seen: list[tuple[int, int]] = []
    yield seen
    readback.before_read_back = None


def flip(target: PartitionTarget, position: int) -> None:
    with target.path.open("r+b") as f:
        f.seek(target.offset + position)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def install_7_into_b(node: Node) -> None:
    """6.0.0 into A by delta, A booted: B (inactive) holds 5.0.0 and its index."""
    node.ok("install", "--no-reboot", "--version", "6.0.0", booted="B")
    node.ok("activate", "A", booted="B")
    node.grub_boots("A")
    assert node.ok("health-check", booted="A")["action"] == "committed"


@pytest.mark.parametrize("which", ["in place", "from the booted slot"])
def test_a_reused_chunk_changed_before_its_read_back_is_refused(
    node: Node, seam: list[tuple[int, int]], which: str
) -> None:
    big_base(node)
    install_7_into_b(node)
    v5, v7 = index_of(node, "5.0.0"), index_of(node, "7.0.0")
    here = {c.index for c in in_place(v7, v5)}
    in_a = {c.sha256 for c in index_of(node, "6.0.0")}
    if which == "in place":  # held: not written, read back
        chunk = next(c for c in v7 if c.index in here and c.raw_offset > 0)
    else:  # read from A and written
        chunk = next(c for c in v7 if c.index not in here and c.sha256 in in_a)
    b, a = slot(node, "B"), slot(node, "A")
    at = chunk.raw_offset + chunk.raw_length // 2

    def change(target: PartitionTarget, position: int, length: int) -> None:
        seam.append((position, length))
        if position <= at < position + length:
            flip(target, at)  # after the block's writeback, before its read-back

    readback.before_read_back = change
    repo, image = image_of(node, "7.0.0")
    index_dir = node.root / "state" / "index"
    with pytest.raises(ReadBackMismatch, match=f"byte {at} "):
        delta.install_partition(repo, image, b, guard=SlotGuard([a]), index_dir=index_dir, booted=a)
    assert not (index_dir / "B.root.index").exists()  # the slot names no content
    assert any(p <= at < p + n for p, n in seam)


def test_a_slot_too_damaged_to_reuse_installs_the_full_stream(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    big_base(node)
    monkeypatch.setattr(deltablocks, "MAX_REQUESTS", 2)  # repairs allowed, for the test
    v5, v6 = index_of(node, "5.0.0"), index_of(node, "6.0.0")
    reused = [c for c in v6 if c.sha256 in {d.sha256 for d in v5}]
    a, b = slot(node, "A"), slot(node, "B")
    for c in reused[:3]:  # three chunks of the booted slot B no longer match its index
        flip(b, next(d for d in v5 if d.sha256 == c.sha256).raw_offset + 10)
    repo, image = image_of(node, "6.0.0")
    with caplog.at_level(logging.WARNING):
        result = delta.install_partition(
            repo, image, a, guard=SlotGuard([b]), index_dir=node.root / "state" / "index",
            booted=b,
        )  # fmt: skip
    assert not result.delta and result.reused == {}
    assert node.holds("A", "6.0.0")
    warned = [r.getMessage() for r in caplog.records if "whole image instead" in r.getMessage()]
    assert len(warned) == 1 and "no longer match" in warned[0]
    assert (node.root / "state" / "index" / "A.root.index").is_file()


def test_in_place_and_written_chunks_are_read_back(node: Node, seam: list[tuple[int, int]]) -> None:
    """Every byte of the image is read back, held (in-place) ranges included."""
    big_base(node)
    install_7_into_b(node)
    readback.before_read_back = lambda _t, position, length: seam.append((position, length))
    repo, image = image_of(node, "7.0.0")
    a, b = slot(node, "A"), slot(node, "B")
    result = delta.install_partition(
        repo, image, b, guard=SlotGuard([a]), index_dir=node.root / "state" / "index", booted=a
    )
    assert result.delta and result.reused["B"] > 0 and node.holds("B", "7.0.0")
    assert sorted(seam) == [(0, BLOCK_SIZE), (BLOCK_SIZE, BLOCK_SIZE),
                            (2 * BLOCK_SIZE, SIZE - 2 * BLOCK_SIZE)]  # fmt: skip
