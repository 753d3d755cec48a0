"""Streaming decompression with bounded output: compressed chunks in, raw bytes out.

The image writer pulls raw bytes with `RawReader.readinto(buffer)`; each call produces
at most `len(buffer)` bytes, whatever the compression ratio of the input. This is what
keeps memory flat for a GiB image and makes a decompression bomb harmless: the writer
asks for at most `raw_length + 1` bytes in total and stops there.

Supported: the compressions of the release schema (`core.release.COMPRESSIONS`):
`zstd` (zstandard's stream reader, multiple frames, window at most `ZSTD_MAX_WINDOW`),
`xz` (lzma, concatenated streams), `gzip` (zlib with wbits=31, multiple members) and
`none`. `raw_blocks` is that bounded pull loop for a reader that only needs the bytes
(`sign-release verify`, which checks a repository with the node's decoder).

Invariants:
- the chunk iterator is consumed lazily and its exceptions propagate unchanged (the
  repository raises `UpdateRejected` at the end of a stream whose hash is wrong, so the
  caller must only trust what it read once `readinto` has returned 0);
- `readinto` returns 0 only after the iterator is exhausted *and* the compressed stream
  ended cleanly (xz and gzip report truncation; zstandard's reader does not, so a
  truncated zstd stream is caught by the caller's raw length and raw sha256 checks);
- bad compressed data raises `CorruptStream` (an `UpdateRejected`);
- `raw_blocks` asks for at most `raw_length + 1` raw bytes, one bounded block at a time,
  so however far a stream would inflate, it costs one block and the decoder's window.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Protocol, cast

import zstandard

from core.errors import UpdateRejected
from core.release import COMPRESSIONS as COMPRESSIONS  # the schema's; re-exported

# How much compressed input is handed to a decoder at once; the output per call is
# bounded separately (max_length / readinto), so this only trades call overhead.
_INPUT_CHUNK = 1 << 20
# A zstd frame names the window its decoder must allocate; the stream is untrusted until
# it ends, so cap it (zstd levels 1-19 use at most 8 MiB; `--long`/`--ultra` need more).
ZSTD_MAX_WINDOW = 32 << 20


class CorruptStream(UpdateRejected):
    """A compressed stream is damaged, truncated or not in the announced format."""


class RawLengthMismatch(CorruptStream):
    """A stream decompresses to more, or fewer, bytes than its announced raw length."""


class RawReader(Protocol):
    """Pull raw bytes; 0 means the stream ended cleanly and the input is exhausted."""

    def readinto(self, buffer: memoryview) -> int: ...


class ChunkSource:
    """A file-like view of an iterator of byte chunks (what zstandard's reader pulls).

    Keeps at most one input chunk alive; counts the compressed bytes consumed.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._chunk = b""
        self._pos = 0
        self.exhausted = False
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (any amount if negative); b"" once the iterator is done."""
        while self._pos >= len(self._chunk):
            if self.exhausted:
                return b""
            try:
                self._chunk = bytes(next(self._chunks))
            except StopIteration:
                self.exhausted = True
                self._chunk = b""
                return b""
            self._pos = 0
        if self._pos == 0 and (size < 0 or size >= len(self._chunk)):
            out = self._chunk  # the common case: hand the chunk over without a copy
        else:
            stop = len(self._chunk) if size < 0 else self._pos + size
            out = self._chunk[self._pos : stop]
        self._pos += len(out)
        self.consumed += len(out)
        return out

    def close(self) -> None:
        """Release the iterator early (closes a generator, and its HTTP response)."""
        self._chunk = b""
        self._pos = 0
        close: Callable[[], object] | None = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class _PlainReader:
    """compression = none: copy the input through."""

    def __init__(self, source: ChunkSource, what: str) -> None:
        self._source = source

    def readinto(self, buffer: memoryview) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ZstdReader:
    """zstandard's stream reader: bounded `readinto`, reads across frames."""

    def __init__(self, source: ChunkSource, what: str) -> None:
        self._what = what
        # zstandard only calls read(); ChunkSource is not a full IO[bytes].
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._reader = decompressor.stream_reader(
            cast("IO[bytes]", source), read_size=_INPUT_CHUNK, read_across_frames=True
        )

    def readinto(self, buffer: memoryview) -> int:
        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as err:
            hint = ""
            if "memory" in str(err).lower():
                hint = f" (a zstd window of at most {ZSTD_MAX_WINDOW >> 20} MiB is accepted)"
            raise CorruptStream(f"{self._what}: bad zstd data: {err}{hint}") from err


class _MaxLengthReader:
    """zlib (gzip) and lzma (xz) decoders driven with `max_length`, one member at a time.

    Both formats allow members (gzip) / streams (xz) to be concatenated; when a decoder
    reaches its end with input left over, a fresh decoder continues with that input.
    """

    def __init__(self, source: ChunkSource, what: str, kind: str) -> None:
        self._source = source
        self._what = what
        self._kind = kind
        self._errors: tuple[type[Exception], ...] = (
            (zlib.error,) if kind == "gzip" else (lzma.LZMAError,)
        )
        self._decoder: zlib._Decompress | lzma.LZMADecompressor = self._new()
        self._input = b""  # compressed bytes not yet given to the current decoder

    def _new(self) -> zlib._Decompress | lzma.LZMADecompressor:
        if self._kind == "gzip":
            return zlib.decompressobj(wbits=31)
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def readinto(self, buffer: memoryview) -> int:
        while True:
            if self._decoder.eof and not self._next_member():
                return 0  # clean end: last member complete, input exhausted
            data, self._input = self._input, b""
            exhausted = False
            if not data and self._needs_input():
                data = self._source.read(_INPUT_CHUNK)
                exhausted = not data
            try:
                out = self._decompress(data, len(buffer))
            except self._errors as err:
                raise CorruptStream(f"{self._what}: bad {self._kind} data: {err}") from err
            if out:
                buffer[: len(out)] = out
                return len(out)
            if exhausted and not self._decoder.eof:
                raise CorruptStream(
                    f"{self._what}: {self._kind} stream truncated "
                    f"after {self._source.consumed} compressed bytes"
                )

    def _next_member(self) -> bool:
        """Start a decoder on the input after the member that ended; False at the end."""
        rest = self._decoder.unused_data + self._input
        self._input = b""
        while True:
            if self._kind == "xz":
                # xz stream padding: NUL bytes may sit between streams.
                rest = rest.lstrip(b"\0")
            if rest:
                break
            rest = self._source.read(_INPUT_CHUNK)
            if not rest:
                return False
        self._decoder = self._new()
        self._input = rest
        return True

    def _needs_input(self) -> bool:
        if isinstance(self._decoder, lzma.LZMADecompressor):
            return self._decoder.needs_input
        return not self._decoder.unconsumed_tail

    def _decompress(self, data: bytes, limit: int) -> bytes:
        decoder = self._decoder
        if isinstance(decoder, lzma.LZMADecompressor):
            return decoder.decompress(data, max_length=limit)
        # zlib keeps input it could not consume within max_length in unconsumed_tail;
        # called with no new input it still emits output it holds internally.
        return decoder.decompress(decoder.unconsumed_tail + data, limit)


def open_raw_reader(source: ChunkSource, compression: str, what: str) -> RawReader:
    """A reader of the raw bytes of `source`; `what` names the image in error messages."""
    if compression == "none":
        return _PlainReader(source, what)
    if compression == "zstd":
        return _ZstdReader(source, what)
    if compression in ("gzip", "xz"):
        return _MaxLengthReader(source, what, compression)
    raise CorruptStream(
        f"{what}: unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}"
    )


def raw_blocks(
    source: ChunkSource, compression: str, raw_length: int, what: str, block: int = 1 << 20
) -> Iterator[bytes]:
    """The raw bytes of `source`, in blocks of at most `block` bytes, exactly
    `raw_length` of them; `RawLengthMismatch` if the stream holds more (noticed by
    asking for one byte more, never by inflating the rest) or fewer, `CorruptStream` if
    it is damaged. Memory: one block, whatever the stream would inflate to."""
    reader = open_raw_reader(source, compression, what)
    buffer = bytearray(block)
    view = memoryview(buffer)
    done = 0
    while True:
        want = min(block, raw_length - done + 1)
        n = reader.readinto(view[:want])
        if n == 0:
            break
        if done + n > raw_length:
            raise RawLengthMismatch(f"{what}: stream has more than raw_length={raw_length} bytes")
        done += n
        yield bytes(view[:n])
    if done != raw_length:
        raise RawLengthMismatch(
            f"{what}: raw stream truncated: it ended after {done} of raw_length={raw_length} bytes"
        )
