"""The plan of a delta install (docs/delta.md), decided before anything is read or
written: which chunk of the new image comes from which slot, and which frames are
fetched in which HTTP Range requests. Pure: no I/O, nothing trusted yet - every chunk a
plan names is hashed when it is read or fetched (`updater.deltablocks`).

Invariants:
* a chunk is reused from the INACTIVE slot only at its own offset (other offsets of that
  slot may be overwritten by the install before they would be read), from the BOOTED
  slot at any offset;
* spans are in compressed order, which is raw order (the index's frames are in order
  without overlap), each holding its chunks in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.chunkindex import Chunk, ChunkIndex
from updater.slots import PartitionTarget

GAP = 16 << 10  # missing frames closer than this share a request (measured: docs/delta.md)
MAX_REQUESTS = 256  # per image: the closest ranges are merged until there are no more


@dataclass(frozen=True)
class Holding:
    """What one slot holds for a role, as its recorded index says (unverified: every
    chunk read from it is hashed before it is used)."""

    slot: str
    target: PartitionTarget
    index: ChunkIndex


@dataclass(frozen=True)
class Reuse:
    """Chunk `chunk` of the new image may be read at `offset` of `holding`'s target."""

    chunk: Chunk
    holding: Holding
    offset: int
    in_place: bool  # the inactive slot at the same offset: verify, do not write


@dataclass(frozen=True)
class Span:
    """One HTTP Range request: bytes [start, end) of the image file, holding `chunks`."""

    start: int
    end: int
    chunks: tuple[Chunk, ...]


# --- pure planning -----------------------------------------------------------------


def plan(
    new: ChunkIndex, inactive: Holding | None, booted: Holding | None
) -> tuple[list[Reuse], list[Chunk]]:
    """Each chunk of `new` reused (from the inactive slot at its own offset, else from
    the booted slot at any offset) or missing. Pure."""
    in_booted = booted.index.by_hash() if booted is not None else {}
    reuse: list[Reuse] = []
    missing: list[Chunk] = []
    for chunk in new:
        here = inactive.index.at_offset(chunk.raw_offset) if inactive is not None else None
        if (
            inactive is not None
            and here is not None
            and here.raw_length == chunk.raw_length
            and here.sha256 == chunk.sha256
        ):
            reuse.append(Reuse(chunk, inactive, chunk.raw_offset, True))
        elif booted is not None and chunk.sha256 in in_booted:
            found = in_booted[chunk.sha256]
            if found.raw_length == chunk.raw_length:
                reuse.append(Reuse(chunk, booted, found.raw_offset, False))
            else:
                missing.append(chunk)
        else:
            missing.append(chunk)
    return reuse, missing


def coalesce(
    chunks: Sequence[Chunk], gap: int = GAP, max_requests: int = MAX_REQUESTS
) -> list[Span]:
    """Range requests for `chunks` (in compressed order): neighbours at most `gap` bytes
    apart share a request, then the closest requests merge until at most `max_requests`
    remain. Pure."""
    spans: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.compressed_offset):
        if spans:
            last = spans[-1][-1]
            if chunk.compressed_offset - (last.compressed_offset + last.compressed_length) <= gap:
                spans[-1].append(chunk)
                continue
        spans.append([chunk])
    while len(spans) > max(1, max_requests):
        gaps = [
            spans[i + 1][0].compressed_offset
            - (spans[i][-1].compressed_offset + spans[i][-1].compressed_length)
            for i in range(len(spans) - 1)
        ]
        i = gaps.index(min(gaps))
        spans[i : i + 2] = [spans[i] + spans[i + 1]]
    return [
        Span(
            group[0].compressed_offset,
            group[-1].compressed_offset + group[-1].compressed_length,
            tuple(group),
        )
        for group in spans
    ]
