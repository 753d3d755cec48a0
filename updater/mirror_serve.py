"""`update-mirror serve`: a small threaded HTTP/1.1 server for a mirror directory.

Serves `DIR/current` (metadata/ and targets/) with correct Content-Length, HEAD, and
single-range requests (`bytes=a-b`, `bytes=a-`, `bytes=-n` -> 206 + Content-Range, 416
when unsatisfiable), so the agent resumes downloads through it. Sites that prefer a real
web server use nginx instead (docs/mirror.md); both follow the same rule.

Invariants:

* `current` is resolved once per request and the file is opened before any header is
  sent, so one response is always one file of one state - a publish during a download
  changes what the next request sees, never the bytes of this one.
* Only regular files below the resolved state are served (no `..`, no symlink escape,
  no directory listings); everything else is 404.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib import parse

from updater.errors import ConfigError
from updater.mirror_store import MirrorError

logger = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 1 << 20


def parse_bind(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ConfigError naming the value otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--bind {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def byte_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """(start, end_exclusive) for a satisfiable single range, None for no/ignored
    Range (serve the whole file), False when unsatisfiable (416). Pure."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: RFC 9110 allows answering 200
    if not m.group(1):
        n = int(m.group(2))
        return (max(0, size - n), size) if n > 0 and size > 0 else False
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or start >= end:
        return False
    return start, end


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path, address: tuple[str, int]) -> None:
        self.directory = directory
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MirrorServer

    def log_message(self, format: str, *args: object) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _open(self) -> BinaryIO | None:
        path = parse.unquote(parse.urlsplit(self.path).path)
        try:
            base = (self.server.directory / "current").resolve(strict=True)
            candidate = (base / path.lstrip("/")).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not candidate.is_relative_to(base) or not candidate.is_file():
            return None
        try:
            return candidate.open("rb")
        except OSError:
            return None

    def _empty(self, status: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _respond(self, body: bool) -> None:
        f = self._open()
        if f is None:
            self._empty(404)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            rng = byte_range(self.headers.get("Range"), size)
            if rng is False:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            start, end = rng if isinstance(rng, tuple) else (0, size)
            self.send_response(206 if isinstance(rng, tuple) else 200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if isinstance(rng, tuple):
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if not body:
                return
            f.seek(start)
            left = end - start
            with contextlib.suppress(ConnectionError):
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:  # file shrank: cannot happen to a published state
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    left -= len(chunk)


def make_server(directory: Path, bind: str) -> MirrorServer:
    """A bound (not yet serving) server for `directory`; `serve_forever()` to run."""
    host, port = parse_bind(bind)
    if not (directory / "current").exists():
        raise ConfigError(f"{directory}: no synced state to serve (run update-mirror sync)")
    try:
        return MirrorServer(directory, (host, port))
    except OSError as e:
        raise MirrorError(f"cannot listen on {bind}: {e.strerror}") from e
