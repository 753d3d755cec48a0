"""The raw image of a delta install, produced in raw order for the install engine
(`install.write_blocks`, the same engine as a full install; docs/delta.md).

`DeltaBlocks.fill` fills each block of the engine's write ring with the image's next
bytes: chunk after chunk of the new index, each one either read from the slot the plan
(`updater.deltaplan`) names and its sha256 checked, or decompressed from its fetched
frame and its sha256 checked. The missing frames arrive from coalesced HTTP Range
responses consumed lazily, in order (one response open at a time: spans are in
compressed order, which is raw order). The engine then hashes the whole image once in
order (against the signed raw sha256), writes it in large blocks, and reads every block
back behind the writing and compares it with the block in memory.

Invariants:
* no byte reaches a block unverified: a chunk is read (or decompressed) whole, and its
  sha256 checked against the TUF-verified index, before any of it is copied into a
  block - a chunk that straddles two blocks is checked whole before the first block is
  handed to the writer (its tail waits, `_carry`);
* a reused chunk that does not match (the slot changed behind the agent's back, or lies
  outside it) is fetched instead, with a Range request of its own; after
  `MAX_REQUESTS` such requests the image is `TooDamaged` (the caller installs the
  full stream);
* chunks already in place in the inactive slot are reported to the engine as held: not
  written, but hashed with the rest and read back from the device like every block, so
  the slot is proven to hold them at the end;
* memory: one chunk or frame (at most `chunkindex.MAX_CHUNK` raw) besides the engine's
  ring, one network piece, the plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import zstandard

from core.chunkindex import Chunk, ChunkIndex
from core.decompress import ZSTD_MAX_WINDOW, CorruptStream
from core.release import Image
from core.repository import Repository
from updater.deltaplan import MAX_REQUESTS, Reuse, Span, coalesce
from updater.install import Held, ImageRejected, WriteFailed
from updater.slots import PartitionTarget

log = logging.getLogger(__name__)


class TooDamaged(Exception):
    """So many reused chunks failed their check that a delta makes no sense: install the
    full stream instead."""


class Readers:
    """Read-only descriptors on the slots' partitions, opened once each (the booted slot
    is never opened for writing here)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, int], int] = {}

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def read_into(self, target: PartitionTarget, position: int, dest: memoryview) -> bool:
        """Fill `dest` from `position` of `target`; False (no match) past the partition."""
        length = len(dest)
        if position < 0 or position + length > target.size:
            return False
        key = (target.path, target.offset)
        got = 0
        try:
            if key not in self._fds:
                self._fds[key] = fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # reads mostly ascend
            while got < length:
                n = os.preadv(self._fds[key], [dest[got:]], target.offset + position + got)
                if n == 0:
                    return False
                got += n
        except OSError as err:
            raise WriteFailed(f"reading {target.describe()} at {position}: {err.strerror}") from err
        return True


class DeltaBlocks:
    """The new image's raw bytes in order, as an `install.Fill` (see the module
    docstring); `reused`, `fetched` and `requests` say what it took."""

    def __init__(
        self,
        repo: Repository,
        image: Image,
        index: ChunkIndex,
        reuse: Sequence[Reuse],
        missing: Sequence[Chunk],
        readers: Readers,
        retries: int,
    ) -> None:
        self._repo, self._image, self._readers, self._retries = repo, image, readers, retries
        self._reuse = {r.chunk.index: r for r in reuse}
        self._chunks = iter(index)
        self._spans = coalesce(missing)
        self._fetcher: Prefetch | None = None
        self._carry = memoryview(b"")  # the tail of a chunk that straddled the last block
        self._carry_held = False
        self._decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._repairs = 0
        self._fetched = self._requests = 0  # repairs; the planned spans: the fetcher's
        self.reused: dict[str, int] = {}  # slot -> raw bytes read from it and used

    def close(self) -> None:
        """Stop fetching and close the open Range response, if any."""
        if self._fetcher is not None:
            self._fetcher.close()

    @property
    def fetched(self) -> int:
        """Bytes asked for: frames, the gaps between coalesced ones, repaired chunks."""
        return self._fetched + (self._fetcher.fetched if self._fetcher is not None else 0)

    @property
    def requests(self) -> int:
        return self._requests + (self._fetcher.requests if self._fetcher is not None else 0)

    def fill(self, view: memoryview) -> tuple[int, Held]:
        """`install.Fill`: the next `len(view)` raw bytes (fewer at the image's end)."""
        if self._fetcher is None:
            # Opened at the first block, once the target is open for writing; its first
            # chunk is awaited at once, so that a server that ignores Range
            # (RangeUnsupported) is found before anything is written.
            self._fetcher = Prefetch(self._planned(self._spans), PREFETCH_BYTES)
            self._fetcher.peek()
        size, n = len(view), 0
        held: list[tuple[int, int]] = []
        if self._carry:
            n = min(len(self._carry), size)
            view[:n] = self._carry[:n]
            if self._carry_held:
                held.append((0, n))
            self._carry = self._carry[n:]
        while n < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            length = chunk.raw_length
            fits = n + length <= size
            dest = view[n : n + length] if fits else memoryview(bytearray(length))
            in_place = self._produce(chunk, dest)
            end = min(n + length, size)
            if not fits:
                view[n:] = dest[: size - n]
                self._carry, self._carry_held = dest[size - n :], in_place
            if in_place:
                if held and held[-1][1] == n:
                    held[-1] = (held[-1][0], end)
                else:
                    held.append((n, end))
            n = end
        return n, held

    def _produce(self, chunk: Chunk, dest: memoryview) -> bool:
        """Fill `dest` with `chunk`, verified; True if it is in place in the inactive slot
        (read from there: not to be written)."""
        reuse = self._reuse.get(chunk.index)
        if reuse is None:
            dest[:] = self._planned_frame(chunk)
            return False
        holding = reuse.holding
        if (
            self._readers.read_into(holding.target, reuse.offset, dest)
            and hashlib.sha256(dest).digest() == chunk.sha256
        ):
            self.reused[holding.slot] = self.reused.get(holding.slot, 0) + len(dest)
            return reuse.in_place
        log.info(
            "slot %s %s: chunk at byte %d no longer matches its index; fetching it",
            holding.slot,
            holding.target.role,
            reuse.offset,
        )
        dest[:] = self._fetch_alone(chunk)
        return False

    def _planned(
        self, spans: Sequence[Span]
    ) -> Callable[[Prefetch], Generator[tuple[int, bytes], None, None]]:
        """The planned spans' chunks, fetched, decompressed and verified (in the
        fetcher's thread: its own decoder)."""
        repo, image, retries = self._repo, self._image, self._retries

        def produce(counts: Prefetch) -> Generator[tuple[int, bytes], None, None]:
            decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            for span in spans:
                counts.requests += 1
                counts.fetched += span.end - span.start
                body = repo.stream_range(
                    image.target, span.start, span.end, chunk_size=PIECE, retries=retries
                )
                for chunk, frame in frames(body, span):
                    yield chunk.index, decompress(decoder, frame, chunk, image.path)

        return produce

    def _planned_frame(self, chunk: Chunk) -> bytes:
        assert self._fetcher is not None, "fill started the fetcher"
        got = self._fetcher.take()
        if got is None or got[0] != chunk.index:  # the plan's own order: defence
            raise CorruptStream(f"{self._image.path}: frame of chunk {chunk.index} not fetched")
        return got[1]

    def _fetch_alone(self, chunk: Chunk) -> bytes:
        """A chunk the plan meant to reuse, fetched by a Range request of its own."""
        self._repairs += 1
        if self._repairs > MAX_REQUESTS:
            raise TooDamaged(
                f"{self._image.path}: more than {MAX_REQUESTS} reused chunks no longer "
                "match their slot's index"
            )
        start = chunk.compressed_offset
        end = start + chunk.compressed_length
        self._requests += 1
        self._fetched += end - start
        body = self._repo.stream_range(self._image.target, start, end, retries=self._retries)
        (_, frame), *_ = frames(body, Span(start, end, (chunk,)))
        return decompress(self._decoder, frame, chunk, self._image.path)


PREFETCH_BYTES = 1 << 20  # raw bytes fetched ahead of the writer, at most (+ one chunk)
PIECE = 256 << 10  # bytes of one network read of a range (most ranges are smaller)


class Prefetch:
    """Runs `produce` in a thread of its own, at most `limit` bytes ahead of `take`:
    the Range requests and decompression overlap with the reading and hashing of the
    reused chunks. Errors are raised by `take`; `close` stops the thread (which closes
    its open response) and joins it."""

    def __init__(
        self, produce: Callable[[Prefetch], Generator[tuple[int, bytes], None, None]], limit: int
    ) -> None:
        self.requests = self.fetched = 0
        self._produce, self._limit = produce, limit
        self._ready: deque[tuple[int, bytes]] = deque()
        self._held = 0  # raw bytes in `_ready`
        self._done = self._stop = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="delta-fetch", daemon=True)
        self._thread.start()

    def peek(self) -> None:
        """Wait for the first chunk (or the end, or the error), without taking it."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._done)
            self._raise()

    def take(self) -> tuple[int, bytes] | None:
        """The next (chunk number, verified raw bytes); None after the last."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._done)
            if self._ready:
                got = self._ready.popleft()
                self._held -= len(got[1])
                self._cond.notify_all()
                return got
            self._raise()
            return None

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        items = self._produce(self)
        try:
            for item in items:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._held < self._limit)
                    if self._stop:
                        break
                    self._ready.append(item)
                    self._held += len(item[1])
                    self._cond.notify_all()
        except BaseException as err:  # re-raised in the taker's thread
            self._error = err
        finally:
            with contextlib.suppress(BaseException):
                items.close()
            with self._cond:
                self._done = True
                self._cond.notify_all()


def frames(body: Generator[bytes, None, None], span: Span) -> Iterator[tuple[Chunk, bytes]]:
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


def decompress(decoder: zstandard.ZstdDecompressor, frame: bytes, chunk: Chunk, what: str) -> bytes:
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
