"""Install one image by delta: reuse the chunks the node holds, fetch only the missing
frames (docs/delta.md).

A release image in the zstd seekable format comes with a chunk index (`core.chunkindex`,
a TUF target of its own). The agent keeps the index of what each slot holds in
`<state_dir>/index/<slot>.<role>.index`, written when that slot was installed and
verified. To install a new image into the inactive slot, `install_partition`:

1. downloads the new index through TUF (`Repository.stream_target`: trusted length and
   hashes) and checks it describes the image (raw length and sha256, frames inside it);
2. plans each chunk (`plan`, pure): already in place in the INACTIVE slot at the same
   offset (read and verified, not written), or found by content in the BOOTED slot at
   any offset (read, verified, written), or missing. Other offsets of the inactive slot
   are never used: the install may already have overwritten them;
3. reads every reused chunk and checks its sha256 before it is written; a mismatch (a
   slot changed behind the agent's back) puts the chunk among the missing;
4. fetches the missing frames with HTTP Range requests (`coalesce`: neighbours closer than
   `GAP` merged, at most `MAX_REQUESTS` requests) through `Repository.stream_range` (the
   session, the slow-retrieval limits and the resume after a cut of `stream_target`),
   decompresses each frame and checks its chunk's sha256 before writing it;
5. fsyncs and reads the whole image back against its raw sha256 (`install.read_back_verify`),
   exactly as a full install does, and only then records the new index for the slot.

Invariants:
* Nothing weaker than a full install: the caller invalidated the inactive slot before,
  and it stays so until the agent activates it; the booted slot is opened read-only,
  only the inactive target is opened for writing, through `install.SlotGuard`;
* every byte written was hashed against the TUF-verified index first, and the whole image
  is read back against the TUF-verified raw sha256 at the end;
* the slot's recorded index is removed before the first write and written (atomically)
  only after the read-back verified, so it never names content the slot may not hold;
* memory is one frame and one chunk (at most `chunkindex.MAX_CHUNK` each) plus the indexes;
* a release without an index, a node that holds no index, `--full`, or a server that
  ignores Range (200 instead of 206) installs the full stream (`install.write_image`);
  the Range fallback is logged once per image.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from core import chunkindex
from core.chunkindex import Chunk, ChunkIndex
from core.decompress import ZSTD_MAX_WINDOW, CorruptStream
from core.fsutil import atomic_write, read_regular
from core.release import Image
from core.repository import RangeUnsupported, Repository
from updater import install
from updater.install import ImageRejected, SlotGuard, WriteFailed
from updater.slots import PartitionTarget

log = logging.getLogger(__name__)

GAP = 16 << 10  # missing frames closer than this share a request (measured: docs/delta.md)
MAX_REQUESTS = 256  # per image: the closest ranges are merged until there are no more
_IN_PLACE, _BOOTED = "in-place", "booted"

Progress = Callable[[int, int], None]


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
    if image.index is not None and image.compression == "zstd" and not full:
        index, data = fetch_index(repo, image, image.index, retries)
    holders = None
    if index is not None:
        source = recorded(index_dir, booted.slot, booted) if booted is not None else None
        if inactive is not None or source is not None:
            holders = (inactive, source)
    result = None
    if index is not None and holders is not None:
        try:
            result = _write_delta(repo, image, index, target, guard, holders, retries, progress)
        except RangeUnsupported as e:
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
    """Reuse, then fetch, every chunk of `index` into `target`; fsync; read back."""
    install.check_image(target, image.compression, image.raw_length, image.raw_sha256)
    reuse, missing = plan(index, *holders)
    result = DeltaResult(image.raw_length, image.raw_sha256, 0, 0, delta=True)
    done = 0
    report = _Throttled(progress, image.raw_length)
    # install's own guarded open: the SlotGuard check, then fstat against what it checked.
    fd = install._open_for_writing(guard, target)
    try:
        with _Readers() as readers:
            for r in reuse:
                raw = readers.read(r.holding.target, r.offset, r.chunk.raw_length)
                if hashlib.sha256(raw).digest() != r.chunk.sha256:
                    log.info(
                        "slot %s %s: chunk at byte %d no longer matches its index; fetching it",
                        r.holding.slot,
                        target.role,
                        r.offset,
                    )
                    missing.append(r.chunk)
                    continue
                if not r.in_place:
                    _write(fd, target, raw, r.chunk.raw_offset)
                result.reused[r.holding.slot] = result.reused.get(r.holding.slot, 0) + len(raw)
                done += len(raw)
                report(done)
        spans = coalesce(missing)
        decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        for span in spans:
            result.requests += 1
            result.fetched += span.end - span.start
            body = repo.stream_range(image.target, span.start, span.end, retries=retries)
            for chunk, frame in _frames(body, span):
                raw = _decompress(decoder, frame, chunk, image.path)
                _write(fd, target, raw, chunk.raw_offset)
                done += len(raw)
                report(done)
        try:
            os.fsync(fd)
        except OSError as err:
            raise WriteFailed(f"syncing {target.describe()}: {err.strerror}") from err
    finally:
        os.close(fd)
    install.read_back_verify(target, image.raw_length, image.raw_sha256)
    report(image.raw_length, last=True)
    return result


class _Throttled:
    """The progress callback, at most every `install.PROGRESS_INTERVAL` (and at the
    start and the end); it counts reused bytes as well as fetched ones."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress, self._total = progress, total
        self._last = time.monotonic()
        if progress is not None:
            progress(0, total)

    def __call__(self, done: int, *, last: bool = False) -> None:
        now = time.monotonic()
        if self._progress is not None and (last or now - self._last >= install.PROGRESS_INTERVAL):
            self._progress(done, self._total)
            self._last = now


def _write(fd: int, target: PartitionTarget, raw: bytes, position: int) -> None:
    try:
        install._pwrite_all(fd, target, memoryview(raw), position)  # bounds-checked pwrite
    except OSError as err:
        raise WriteFailed(
            f"writing {target.describe()} at byte {position}: {err.strerror}"
        ) from err


def _frames(body: Generator[bytes, None, None], span: Span) -> Iterator[tuple[Chunk, bytes]]:
    """Split the bytes of `span` into its frames (the gaps between them dropped); at most
    one frame and one network piece are held at a time."""
    chunks = iter(span.chunks)
    current = next(chunks, None)
    buf = bytearray()
    at = span.start  # file offset of buf[0]
    with contextlib.closing(body):
        for piece in body:
            buf += piece
            while current is not None:
                skip = current.compressed_offset - at
                if skip > 0:
                    cut = min(skip, len(buf))
                    del buf[:cut]
                    at += cut
                    if cut < skip:
                        break
                if len(buf) < current.compressed_length:
                    break
                frame = bytes(buf[: current.compressed_length])
                del buf[: current.compressed_length]
                at += current.compressed_length
                yield current, frame
                current = next(chunks, None)
    if current is not None:  # stream_range checks the length; this is defence in depth
        raise CorruptStream(f"range {span.start}-{span.end} ended before chunk {current.index}")


def _decompress(
    decoder: zstandard.ZstdDecompressor, frame: bytes, chunk: Chunk, what: str
) -> bytes:
    """The raw chunk in `frame`, refused unless it hashes to the index's sha256."""
    try:
        raw = decoder.decompress(frame, max_output_size=chunk.raw_length)
    except zstandard.ZstdError as e:
        raise CorruptStream(f"{what}: frame of chunk {chunk.index} is not zstd: {e}") from e
    if len(raw) != chunk.raw_length or hashlib.sha256(raw).digest() != chunk.sha256:
        raise ImageRejected(
            f"{what}: frame of chunk {chunk.index} (bytes {chunk.compressed_offset}.."
            f"{chunk.compressed_offset + chunk.compressed_length}) does not decompress to the "
            "chunk its signed index names; refused"
        )
    return raw


class _Readers:
    """Read-only descriptors on the slots' partitions, opened once each."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, int], int] = {}

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def read(self, target: PartitionTarget, position: int, length: int) -> bytes:
        """`length` bytes at `position` of `target` (b"" past the partition: no match)."""
        if position < 0 or position + length > target.size:
            return b""
        key = (target.path, target.offset)
        try:
            if key not in self._fds:
                self._fds[key] = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._fds[key], length, target.offset + position)
        except OSError as err:
            raise WriteFailed(f"reading {target.describe()} at {position}: {err.strerror}") from err
