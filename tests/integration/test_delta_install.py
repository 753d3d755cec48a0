"""Delta installs (docs/delta.md) through the agent's console script, against a real
HTTP server on 127.0.0.1 and a sparse disk: the node reuses the chunks its slots hold
(booted slot at any offset, inactive slot in place), fetches only the missing frames
with Range requests, and lands byte-identical images - over HTTP and from a medium;
reused chunks damaged on disk are fetched; a cut mid-delta resumes; a tampered frame or
index is refused with the slot left invalidated; a server without Range and `--full`
install the whole stream."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from core import chunkindex
from core.release import served_path
from tests.agentnode import MiB, Node, node, sha
from tests.signing_helpers import ImageSpec, add_release, publish
from updater.disk.gpt import read_gpt

__all__ = ["node"]  # the fixture

SIZE = 3 * MiB + 2 * 4096  # the node's 2.0.0 image
CHANGED = (1 * MiB + 100, 2 * MiB + 512 * 1024 + 7)  # 4 KiB differ at each in 3.0.0


def derive(node: Node, version: str, base: str, offsets: tuple[int, ...]) -> Path:
    """An image of `version`: `base`'s bytes with 4 KiB of new random bytes at each offset."""
    data = bytearray(node.images[base].read_bytes())
    rng = random.Random(version)
    for at in offsets:
        data[at : at + 4096] = rng.randbytes(4096)
    path = node.root / f"v{version}.img"
    path.write_bytes(bytes(data))
    node.images[version] = path
    return path


def release(node: Node, version: str, base: str, offsets: tuple[int, ...] = CHANGED) -> None:
    add_release(node.repo, [ImageSpec(derive(node, version, base, offsets), version)])
    publish(node.repo)


def served(node: Node, version: str, name: str) -> str:
    """The URL path of target `x86_64-efi/<version>/<name>` (consistent snapshot)."""
    (found,) = (node.repo / "targets" / "x86_64-efi" / version).glob(f"*.{name}")
    return "/" + str(found.relative_to(node.repo))


def index_of(node: Node, version: str) -> chunkindex.ChunkIndex:
    path = node.repo / served(node, version, "root.index").lstrip("/")
    return chunkindex.parse(path.read_bytes(), str(path))


def containing(index: chunkindex.ChunkIndex, offset: int) -> chunkindex.Chunk:
    """The chunk of `index` that holds raw byte `offset`."""
    return next(c for c in index if c.raw_offset <= offset < c.raw_offset + c.raw_length)


def found_in(new: chunkindex.ChunkIndex, old: chunkindex.ChunkIndex, skip: bytes = b"") -> int:
    """Raw bytes of `new` whose content (sha256) `old` holds somewhere (but `skip`)."""
    have = {c.sha256 for c in old} - {skip}
    return sum(c.raw_length for c in new if c.sha256 in have)


def in_place(new: chunkindex.ChunkIndex, old: chunkindex.ChunkIndex) -> list[chunkindex.Chunk]:
    """The chunks of `new` that `old` holds at the same offset, the same bytes."""
    same = []
    for c in new:
        there = old.at_offset(c.raw_offset)
        if there is not None and (there.raw_length, there.sha256) == (c.raw_length, c.sha256):
            same.append(c)
    return same


def committed_b(node: Node) -> None:
    """2.0.0 installed into B (the full stream: no slot has an index yet), booted, good."""
    first = node.ok("install", "--no-reboot")
    assert first["bytes_reused"] == {} and first["bytes_fetched"] > SIZE // 2
    assert (node.root / "state" / "index" / "B.root.index").is_file()
    node.grub_boots("B")
    assert node.ok("health-check", booted="B")["action"] == "committed"


def ranges(node: Node, url_path: str) -> list[str]:
    return [r.range for r in node.server.requests_for(url_path) if r.range]


def corrupt(node: Node, slot: str, at: int) -> None:
    gpt = read_gpt(node.disk)
    part = gpt.find(f"root_{slot.lower()}")
    with node.disk.open("r+b") as f:
        f.seek(part.first_lba * gpt.sector_size + at)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def commit_a_then_install_4_into_b(node: Node) -> dict[str, Any]:
    """Boot A (it holds 3.0.0), commit it, publish 4.0.0 (3.0.0 with one more change)
    and install it into B; the install's JSON."""
    node.ok("activate", "A", booted="B")
    node.grub_boots("A")
    assert node.ok("health-check", booted="A")["action"] == "committed"
    release(node, "4.0.0", "3.0.0", (100 * 1024,))
    again = node.ok("install", "--no-reboot", booted="A")
    assert node.holds("B", "4.0.0")
    return again


def test_delta_over_http_reuses_the_booted_slot_and_lands_byte_identical(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    result = node.ok("install", "--no-reboot", booted="B")
    assert result["version"] == "3.0.0" and result["slot"] == "A"
    assert node.holds("A", "3.0.0")
    v2, v3 = index_of(node, "2.0.0"), index_of(node, "3.0.0")
    reused = found_in(v3, v2)
    assert reused >= SIZE - 8 * 64 * 1024  # two 4 KiB changes touch a few chunks only
    assert result["bytes_reused"] == {"B": reused}
    image = served(node, "3.0.0", "root.img.zst")
    full = (node.repo / image.lstrip("/")).stat().st_size
    assert result["bytes_fetched"] < full // 4
    assert len(ranges(node, image)) == 2  # two changes, far apart: two requests
    status = node.ok("status", booted="B")
    assert status["last_install"]["bytes_fetched"] == result["bytes_fetched"]
    assert status["last_install"]["bytes_reused"] == result["bytes_reused"]
    # Then 4.0.0 into B, booted A: unchanged chunks of B are in place, others from A.
    again = commit_a_then_install_4_into_b(node)
    v4 = index_of(node, "4.0.0")
    here = in_place(v4, v2)  # B holds 2.0.0 and its recorded index
    assert again["bytes_reused"]["B"] == sum(c.raw_length for c in here) >= SIZE // 2
    from_a = sum(c.raw_length for c in v4 if c not in here and c.sha256 in {d.sha256 for d in v3})
    assert again["bytes_reused"]["A"] == from_a > 0


def test_delta_from_a_medium(node: Node, tmp_path: Path) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    medium = tmp_path / "usb"
    shutil.copytree(node.repo, medium)
    result = node.ok("install", "--no-reboot", "--from", str(medium), booted="B")
    assert result["bytes_reused"] == {
        "B": found_in(index_of(node, "3.0.0"), index_of(node, "2.0.0"))
    }
    assert node.holds("A", "3.0.0")


def test_damaged_reused_chunks_are_fetched(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    damaged = containing(index_of(node, "2.0.0"), 320 * 1024)
    corrupt(node, "B", 320 * 1024)  # the booted slot no longer matches its index there
    result = node.ok("install", "--no-reboot", booted="B")
    assert node.holds("A", "3.0.0")
    v2, v3 = index_of(node, "2.0.0"), index_of(node, "3.0.0")
    assert result["bytes_reused"] == {"B": found_in(v3, v2, skip=damaged.sha256)}
    assert len(ranges(node, served(node, "3.0.0", "root.img.zst"))) == 3


def test_cut_connection_mid_delta_resumes(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    image = served(node, "3.0.0", "root.img.zst")
    node.server.cut(image, after=1000)
    node.ok("install", "--no-reboot", booted="B")
    assert node.holds("A", "3.0.0")
    asked = ranges(node, image)
    assert len(asked) == 3, asked  # the first range, its resume 1000 bytes on, the second
    first, resumed = (a.removeprefix("bytes=").split("-") for a in asked[:2])
    assert int(resumed[0]) == int(first[0]) + 1000 and resumed[1] == first[1]


def test_tampered_frame_is_refused_and_the_slot_stays_invalid(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    frame = containing(index_of(node, "3.0.0"), CHANGED[0])  # a chunk the node must fetch
    node.server.tamper(served(node, "3.0.0", "root.img.zst"), offset=frame.compressed_offset + 20)
    done = node.run("install", "--no-reboot", booted="B")
    assert done.returncode == 3, done.stderr
    assert f"chunk {frame.index} " in done.stderr and "Traceback" not in done.stderr
    env = node.env()
    assert env["ORDER"] == "B A" and env["A_OK"] == "0"  # A invalidated, B stays primary
    assert not (node.root / "state" / "index" / "A.root.index").exists()


def test_tampered_index_is_refused_by_tuf(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    node.server.tamper(served(node, "3.0.0", "root.index"), offset=60)
    done = node.run("install", "--no-reboot", booted="B")
    assert done.returncode == 3, done.stderr
    assert "root.index" in done.stderr and "mismatch" in done.stderr
    assert node.env()["A_OK"] == "0"
    assert not ranges(node, served(node, "3.0.0", "root.img.zst"))


def test_server_without_range_falls_back_to_the_full_stream(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    image = served(node, "3.0.0", "root.img.zst")
    node.server.ignore_range(image)
    done = node.run("install", "--no-reboot", booted="B")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("installing the whole image instead") == 1, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bytes_reused"] == {}
    assert result["bytes_fetched"] > SIZE // 2
    assert node.holds("A", "3.0.0")


def test_full_flag_downloads_everything(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    result = node.ok("install", "--no-reboot", "--full", booted="B")
    assert result["bytes_reused"] == {}
    assert not ranges(node, served(node, "3.0.0", "root.img.zst"))
    assert node.holds("A", "3.0.0")
    assert sha(node.images["3.0.0"]) == node.slot_sha("A", SIZE)


def test_served_path_is_what_the_agent_asks_for(node: Node) -> None:
    """The index is fetched at its consistent-snapshot path (a guard for `served`)."""
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    node.ok("install", "--no-reboot", booted="B")
    index = node.repo / served(node, "3.0.0", "root.index").lstrip("/")
    digest = index.name.split(".", 1)[0]
    assert served_path("x86_64-efi/3.0.0/root.index", digest).endswith(index.name)
    assert node.server.requests_for(served(node, "3.0.0", "root.index"))


def test_full_install_records_the_index_so_the_next_update_is_a_delta(node: Node) -> None:
    committed_b(node)
    release(node, "3.0.0", "2.0.0")
    node.ok("install", "--no-reboot", "--full", booted="B")
    recorded = node.root / "state" / "index" / "A.root.index"
    index = node.repo / served(node, "3.0.0", "root.index").lstrip("/")
    assert recorded.read_bytes() == index.read_bytes()
    again = commit_a_then_install_4_into_b(node)
    v3, v4 = index_of(node, "3.0.0"), index_of(node, "4.0.0")
    here = in_place(v4, index_of(node, "2.0.0"))  # B holds 2.0.0 and its index
    from_a = sum(c.raw_length for c in v4 if c not in here and c.sha256 in {d.sha256 for d in v3})
    assert again["bytes_reused"]["A"] == from_a > 0
