"""The agent's network layer: bytes of an `http(s)://` or `file://` URL, and the limits
that stop a repository from holding a node hostage by sending them slowly.

* `RequestsFetcher` - ngclient's fetcher over ONE `requests.Session`, so proxies, TLS
  and timeouts are configured once for metadata and images alike; it also reads
  `file://` URLs (a mounted USB mirror), and starts at a byte offset (HTTP Range), or
  fetches one byte range (`end`: the frames of a delta install, docs/delta.md; a
  server that answers such a request with the whole file raises `RangeIgnored`).
* `within_deadline` / `at_min_rate` - TUF's slow-retrieval defence, around any
  fetcher's byte stream: a metadata file must arrive whole within a total deadline; an
  image must keep a minimum average rate over a sliding window (`DownloadLimits`).

Invariants:

* A body is yielded as the network delivers it (`read1`), never held back until a
  full chunk is in: urllib3's `read(amt)` keeps reading until it has `amt` bytes, so a
  server dripping one byte per second would never hand control back to the limits.
  A read that receives nothing at all ends after the (connect, read) `timeout`.
* So a metadata download ends within `metadata_deadline` + one read timeout, and an
  image download sustains `min_rate` over every `rate_window` (checked whenever bytes
  arrive; a full stall ends with the read timeout) - both as `SlowRetrievalError`,
  which the repository maps to `DownloadFailed`, naming the URL and the limit.
* Only regular files are read from `file://` URLs (`fsutil.open_regular`): a FIFO on
  a medium would otherwise block the agent in open(2) forever.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib import parse

import requests
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from core.fsutil import open_regular

_RATE_MARKS = 16  # samples per rate window: the window slides in steps of 1/16th


@dataclass(frozen=True)
class DownloadLimits:
    """Slow-retrieval limits; `[repository]` `metadata_deadline`, `min_rate`,
    `rate_window` in the config (docs/configuration.md). `min_rate = 0` disables the
    rate check; the deadline always applies."""

    metadata_deadline: float = 120.0  # seconds for one whole metadata file
    min_rate: float = 1024.0  # bytes/s an image download must average ...
    rate_window: float = 60.0  # ... over every window of this many seconds


def _close(chunks: Iterator[bytes]) -> None:
    """Close a generator (and the response it holds) when a limit check gives up."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def within_deadline(chunks: Iterator[bytes], deadline: float, started: float) -> Iterator[bytes]:
    """`chunks`, refused with SlowRetrievalError once `deadline` seconds have passed
    since `started` (a `time.monotonic()` taken before the request was sent)."""
    received = 0
    try:
        for chunk in chunks:
            received += len(chunk)
            elapsed = time.monotonic() - started
            if elapsed > deadline:
                raise tuf_exc.SlowRetrievalError(
                    f"not received within metadata_deadline = {deadline:g} s "
                    f"({received} bytes in {elapsed:.1f} s)"
                )
            yield chunk
    finally:
        _close(chunks)


def at_min_rate(
    chunks: Iterator[bytes], min_rate: float, window: float, started: float
) -> Iterator[bytes]:
    """`chunks`, refused with SlowRetrievalError when fewer than `min_rate * window`
    bytes arrived in the last `window` seconds (checked from `started + window` on).

    The window slides in steps of `window / 16`: a few (time, bytes-so-far) marks are
    kept, so memory stays constant however many chunks arrive."""
    if min_rate <= 0:
        yield from chunks
        return
    needed = min_rate * window
    marks: deque[tuple[float, int]] = deque([(started, 0)])
    received = 0
    try:
        for chunk in chunks:
            now = time.monotonic()
            received += len(chunk)
            while len(marks) > 1 and marks[1][0] <= now - window:
                marks.popleft()
            since, before = marks[0]
            if since <= now - window and received - before < needed:
                raise tuf_exc.SlowRetrievalError(
                    f"slower than min_rate = {min_rate:g} bytes/s over rate_window = "
                    f"{window:g} s ({received - before} bytes in the last {now - since:.1f} s)"
                )
            if now - marks[-1][0] >= window / _RATE_MARKS:
                marks.append((now, received))
            yield chunk
    finally:
        _close(chunks)


class RangeIgnored(tuf_exc.DownloadError):
    """A request for a byte range was answered with the whole file (200, not 206)."""


@runtime_checkable
class ResumableFetcher(Protocol):
    """A fetcher that can start a download at a byte offset (HTTP Range or seek)."""

    def fetch_from(
        self, url: str, offset: int, chunk_size: int | None = None, end: int | None = None
    ) -> Iterator[bytes]:
        """Bytes of `url` from `offset` on (to `end`, exclusive, if given: `RangeIgnored`
        when the server sends the whole file instead); raises tuf DownloadError
        subclasses."""
        ...


def _content_range_start(value: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes a-b/n` header, None if unparsable."""
    if value is None or not value.startswith("bytes "):
        return None
    first, _, _ = value[len("bytes ") :].partition("-")
    return int(first) if first.isdigit() else None


class RequestsFetcher(FetcherInterface):
    """ngclient's fetcher over one shared `requests.Session`, plus `file://` URLs.

    `timeout` is (connect, read) seconds for every request. Bodies are asked for with
    `Accept-Encoding: identity`: byte counts, ranges and hashes are about the stored
    file, and a compressed transfer could otherwise inflate past any limit.
    """

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        timeout: tuple[float, float] = (10.0, 30.0),
        chunk_size: int = 1 << 16,
    ) -> None:
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout
        self.chunk_size = chunk_size

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)

    def fetch_from(
        self, url: str, offset: int, chunk_size: int | None = None, end: int | None = None
    ) -> Iterator[bytes]:
        """Open `url` at `offset` now (errors raised here), return the body iterator.

        A 206 must carry a Content-Range starting at `offset`. A server that ignores
        Range and answers 200 is handled by reading and discarding the first `offset`
        bytes, so the caller still receives exactly the bytes from `offset` on - unless
        `end` asked for one range (`bytes=offset-(end-1)`): then the 200 is closed
        unread and `RangeIgnored` raised, so a delta never downloads the whole file
        once per range. The caller bounds what it reads to `end`.
        """
        size = chunk_size or self.chunk_size
        split = parse.urlsplit(url)
        if split.scheme == "file":
            return self._fetch_file(url, split, offset, size, end)
        if split.scheme not in ("http", "https"):
            raise tuf_exc.DownloadError(f"unsupported URL scheme {split.scheme!r} in {url}")
        headers = {"Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = self.session.get(url, stream=True, timeout=self.timeout, headers=headers)
        except requests.Timeout as e:
            raise tuf_exc.SlowRetrievalError(f"timed out fetching {url}") from e
        except requests.RequestException as e:
            raise tuf_exc.DownloadError(f"cannot fetch {url}: {e}") from e
        status = resp.status_code
        skip = 0
        if end is not None and status == 200:
            resp.close()
            raise RangeIgnored(f"{url} answered a Range request with the whole file (HTTP 200)")
        if (offset or end is not None) and status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                resp.close()
                raise tuf_exc.DownloadError(
                    f"{url} answered Range bytes={offset}- with Content-Range "
                    f"{resp.headers.get('Content-Range')!r}"
                )
        elif status == 200:
            skip = offset
        else:
            resp.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {status} fetching {url}", status)
        return self._iter_response(resp, url, skip, size)

    def _iter_response(
        self, resp: requests.Response, url: str, skip: int, size: int
    ) -> Iterator[bytes]:
        try:
            yield from skip_prefix(self._arriving(resp, url, size), skip, url)
        finally:
            resp.close()

    def _arriving(self, resp: requests.Response, url: str, size: int) -> Iterator[bytes]:
        """The body in pieces of at most `size`, each as soon as the network has it."""
        raw = resp.raw
        while True:
            try:
                data = raw.read1(size, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as e:
                raise tuf_exc.SlowRetrievalError(
                    f"nothing received from {url} for {self.timeout[1]:g} s (timeout)"
                ) from e
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                # Dropped connections and truncated bodies (Content-Length not reached).
                raise tuf_exc.DownloadError(f"connection lost while reading {url}: {e}") from e
            if not data:
                return
            yield data

    @staticmethod
    def _fetch_file(
        url: str, split: parse.SplitResult, offset: int, size: int, end: int | None = None
    ) -> Iterator[bytes]:
        if split.netloc not in ("", "localhost"):
            raise tuf_exc.DownloadError(f"file URL with a remote host: {url}")
        path = Path(parse.unquote(split.path))
        try:
            f = open_regular(path)  # a FIFO on the medium must not block us in open(2)
        except FileNotFoundError as e:
            # ngclient stops looking for newer root versions on 404; keep that meaning.
            raise tuf_exc.DownloadHTTPError(f"{url}: no such file", 404) from e
        except OSError as e:
            raise tuf_exc.DownloadError(f"cannot open {url}: {e.strerror}") from e

        def chunks() -> Iterator[bytes]:
            with f:
                try:
                    f.seek(offset)
                    left = -1 if end is None else end - offset
                    while left and (chunk := f.read(size if left < 0 else min(size, left))):
                        left -= len(chunk) if left > 0 else 0
                        yield chunk
                except OSError as e:
                    raise tuf_exc.DownloadError(f"cannot read {url}: {e.strerror}") from e

        return chunks()


def skip_prefix(chunks: Iterator[bytes], offset: int, url: str) -> Iterator[bytes]:
    """For fetchers without ranges: drop the first `offset` bytes of a full body."""
    for chunk in chunks:
        if offset:
            dropped = min(offset, len(chunk))
            offset -= dropped
            chunk = chunk[dropped:]
        if chunk:
            yield chunk
    if offset:
        raise tuf_exc.DownloadError(f"{url} is shorter than the resume offset")
