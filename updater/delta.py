"""Install one image by delta: reuse the chunks the node holds, fetch only the missing
frames (docs/delta.md).

A release image in the zstd seekable format comes with a chunk index (`core.chunkindex`,
a TUF target of its own). The agent keeps the index of what each slot holds in
`<state_dir>/index/<slot>.<role>.index`, written when that slot was installed and
verified. To install a new image into the inactive slot, `install_partition`:

1. downloads the new index through TUF (`Repository.stream_target`: trusted length and
   hashes) and checks it describes the image (raw length and sha256, frames inside it) -
   with `--full` too, so that the slot's next update can be a delta;
2. plans each chunk (`deltaplan.plan`, pure): already in place in the INACTIVE slot at
   the same offset, or found by content in the BOOTED slot at any offset, or missing;
   the missing frames in few coalesced HTTP Range requests (`deltaplan.coalesce`);
3. produces the image in raw order (`deltablocks.DeltaBlocks`): every reused chunk read
   from its slot and its sha256 checked, every fetched frame decompressed and its chunk's
   sha256 checked, before any of it is handed to the writer; a reused chunk that no
   longer matches is fetched instead;
4. writes it through the full install's engine (`install.write_blocks`): the raw sha256
   of the whole image computed once, in order, against the signed `raw_sha256`; 4 MiB
   writes; every block read back from the device behind the writing and compared with
   the block in memory - chunks in place in the inactive slot are not written but read
   back all the same; only then is the new index recorded for the slot.

Invariants:
* Nothing weaker than a full install: the caller invalidated the inactive slot before,
  and it stays so until the agent activates it; the booted slot is opened read-only,
  only the inactive target is opened for writing, through `install.SlotGuard`;
* every byte written was hashed against the TUF-verified index first, the whole image
  against the TUF-verified raw sha256, and every block was read back from the device;
* the slot's recorded index is removed before the first write and written (atomically)
  only after the image was verified, so it never names content the slot may not hold;
* memory is the engine's ring, one frame and one chunk (at most `chunkindex.MAX_CHUNK`
  each) plus the indexes;
* a release without an index, a node that holds no index, `--full`, a server that
  ignores Range (200 instead of 206) or a slot too damaged to reuse (`TooDamaged`)
  installs the full stream (`install.write_image`); the fallback is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core import chunkindex
from core.chunkindex import ChunkIndex
from core.fsutil import atomic_write, read_regular
from core.release import Image
from core.repository import RangeUnsupported, Repository
from updater import install
from updater.deltablocks import DeltaBlocks, Readers, TooDamaged
from updater.deltaplan import Holding, plan
from updater.install import SlotGuard
from updater.slots import PartitionTarget

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class DeltaResult:
    """What an image install did; `fetched` counts every byte downloaded (index, frames
    and the gaps between coalesced frames, or the whole file on the full path)."""

    bytes_written: int
    raw_sha256: str
    fetched: int
    seconds: float
    reused: dict[str, int] = field(default_factory=dict)  # slot -> raw bytes reused
    requests: int = 0
    delta: bool = False  # False: the full stream was installed


# --- the recorded indexes ----------------------------------------------------------


def index_file(index_dir: Path, slot: str, role: str) -> Path:
    return index_dir / f"{slot}.{role}.index"


def recorded(index_dir: Path, slot: str, target: PartitionTarget) -> Holding | None:
    """The index recorded for `slot`'s role, if there is a readable, well-formed one."""
    path = index_file(index_dir, slot, target.role)
    try:
        data = read_regular(path, chunkindex.MAX_INDEX_LENGTH)
        return Holding(slot, target, chunkindex.parse(data, str(path)))
    except FileNotFoundError:
        return None
    except (OSError, chunkindex.IndexRejected) as e:
        log.warning("ignoring the recorded index of slot %s %s: %s", slot, target.role, e)
        return None


def forget(index_dir: Path, slot: str, role: str) -> None:
    """Remove the recorded index of `slot`'s role: its content is about to change."""
    with contextlib.suppress(FileNotFoundError):
        index_file(index_dir, slot, role).unlink()


def record(index_dir: Path, slot: str, role: str, data: bytes) -> None:
    index_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(index_file(index_dir, slot, role), data)


def fetch_index(
    repo: Repository, image: Image, path: str, retries: int
) -> tuple[ChunkIndex, bytes]:
    """The chunk index at target `path` through TUF, checked to describe `image`."""
    target = repo.get_targetinfo(path)
    if target.length > chunkindex.MAX_INDEX_LENGTH:
        raise chunkindex.IndexRejected(
            f"chunk index {path}: signed length {target.length} is more than "
            f"{chunkindex.MAX_INDEX_LENGTH} bytes"
        )
    data = b"".join(repo.stream_target(target, retries=retries))
    index = chunkindex.parse(data, path)
    if (index.raw_length, index.raw_sha256) != (image.raw_length, image.raw_sha256):
        raise chunkindex.IndexRejected(
            f"chunk index {path}: describes {index.raw_length} raw bytes with sha256 "
            f"{index.raw_sha256}, not the image {image.path}"
        )
    if index.compressed_end > image.target.length:
        raise chunkindex.IndexRejected(
            f"chunk index {path}: frames end at byte {index.compressed_end}, past "
            f"the {image.target.length} bytes of {image.path}"
        )
    return index, data


# --- installing ----------------------------------------------------------------------


def install_partition(
    repo: Repository,
    image: Image,
    target: PartitionTarget,
    *,
    guard: SlotGuard,
    index_dir: Path,
    booted: PartitionTarget | None,
    full: bool = False,
    retries: int = 5,
    progress: Progress | None = None,
) -> DeltaResult:
    """Write `image` into the inactive `target` by delta when possible, else whole."""
    started = time.monotonic()
    inactive = recorded(index_dir, target.slot, target)
    forget(index_dir, target.slot, target.role)
    index = data = None
    if image.index is not None and image.compression == "zstd":
        # With --full too: the slot's index is recorded, so its next update is a delta.
        index, data = fetch_index(repo, image, image.index, retries)
    holders = None
    if index is not None and not full:
        source = recorded(index_dir, booted.slot, booted) if booted is not None else None
        if inactive is not None or source is not None:
            holders = (inactive, source)
    result = None
    if index is not None and holders is not None:
        try:
            result = _write_delta(repo, image, index, target, guard, holders, retries, progress)
        except (RangeUnsupported, TooDamaged) as e:
            log.warning("%s; installing the whole image instead", e)
    if result is None:
        stream = repo.stream_target(image.target, retries=retries)
        written = install.write_image(
            stream,
            target,
            compression=image.compression,
            raw_length=image.raw_length,
            raw_sha256=image.raw_sha256,
            guard=guard,
            progress=progress,
        )
        result = DeltaResult(written.bytes_written, written.raw_sha256, image.target.length, 0)
    if data is not None:
        result.fetched += len(data)
        record(index_dir, target.slot, target.role, data)
    result.seconds = time.monotonic() - started
    return result


def _write_delta(
    repo: Repository,
    image: Image,
    index: ChunkIndex,
    target: PartitionTarget,
    guard: SlotGuard,
    holders: tuple[Holding | None, Holding | None],
    retries: int,
    progress: Progress | None,
) -> DeltaResult:
    """Every chunk of `index`, reused or fetched and each checked, in raw order through
    the install engine: hashed whole once, written in large blocks, read back behind."""
    reuse, missing = plan(index, *holders)  # write_blocks checks the image against target
    with Readers() as readers:
        blocks = DeltaBlocks(repo, image, index, reuse, missing, readers, retries)
        try:
            written = install.write_blocks(
                blocks.fill,
                target,
                raw_length=image.raw_length,
                raw_sha256=image.raw_sha256,
                guard=guard,
                progress=progress,
            )
        finally:
            blocks.close()
    return DeltaResult(
        written.bytes_written,
        written.raw_sha256,
        blocks.fetched,
        0,
        blocks.reused,
        blocks.requests,
        delta=True,
    )
