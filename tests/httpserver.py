"""A real HTTP/1.1 server on 127.0.0.1 for tests: Range requests and fault injection.

Serves files from a directory and/or a dict of URL path -> bytes, with a correct
Content-Length, `Range: bytes=a-` and `bytes=a-b` (206 + Content-Range, 416 when out of
range), and switches that make it misbehave on purpose for a given URL path:

    server.cut(path, after=1 << 20)      # close the connection after N body bytes
    server.tamper(path, offset=123)      # flip one byte of the file
    server.endless(path)                 # 200, no Content-Length, bytes until the client quits
    server.fail(path, status=503)        # answer an error status
    server.ignore_range(path)            # answer 200 with the whole file to a Range request
    server.drip(path, interval=0.2)      # send the body one byte per interval (slow retrieval)
    server.stall(path, after=0)          # send headers and N body bytes, then nothing

Each switch applies to the next `times` requests of that path (-1: every request).
Every request is logged in `server.requests` (path and Range header) so a test can
assert, e.g., that a download was resumed with `Range: bytes=<n>-`.

Use the `http_server` fixture (registered by tests/conftest.py): it serves
`tmp_path / "www"` and always stops, joining every handler thread.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib import parse

import pytest

ENDLESS_LIMIT = 1 << 30  # an "endless" body still ends, so a broken client cannot hang CI
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    range: str | None


@dataclass
class _Fault:
    kind: str
    times: int
    value: int = 0


class HTTPTestServer:
    """Threaded HTTP server on 127.0.0.1 (random port); a context manager."""

    def __init__(self, root: Path | None = None, files: dict[str, bytes] | None = None) -> None:
        self.root = root
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[LoggedRequest] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:43211."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HTTPTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> HTTPTestServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- fault switches --------------------------------------------------------

    def _add(self, path: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(path, []).append(fault)

    def cut(self, path: str, *, after: int, times: int = 1) -> None:
        """Close the connection after `after` bytes of the response body."""
        self._add(path, _Fault("cut", times, after))

    def tamper(self, path: str, *, offset: int, times: int = -1) -> None:
        """Serve the file with the byte at `offset` flipped."""
        self._add(path, _Fault("tamper", times, offset))

    def endless(self, path: str, *, times: int = -1) -> None:
        """Answer 200 without Content-Length and send bytes until the client gives up."""
        self._add(path, _Fault("endless", times))

    def fail(self, path: str, *, status: int = 503, times: int = 1) -> None:
        """Answer `status` with an empty body."""
        self._add(path, _Fault("status", times, status))

    def ignore_range(self, path: str, *, times: int = -1) -> None:
        """Answer a Range request with 200 and the whole file."""
        self._add(path, _Fault("ignore_range", times))

    def drip(self, path: str, *, interval: float = 0.2, times: int = -1) -> None:
        """Send the body one byte every `interval` seconds (milliseconds stored)."""
        self._add(path, _Fault("drip", times, max(1, round(interval * 1000))))

    def stall(self, path: str, *, after: int = 0, times: int = -1) -> None:
        """Send the headers and `after` body bytes, then nothing until the server stops."""
        self._add(path, _Fault("stall", times, after))

    def take_faults(self, path: str) -> dict[str, int]:
        """The faults that apply to this request (consuming one use of each)."""
        active: dict[str, int] = {}
        with self._lock:
            for fault in self._faults.get(path, []):
                if fault.times != 0 and fault.kind not in active:
                    active[fault.kind] = fault.value
                    fault.times -= 1 if fault.times > 0 else 0
        return active

    def requests_for(self, path: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # --- content ----------------------------------------------------------------

    def content(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        if self.root is None:
            return None
        base = self.root.resolve()
        candidate = (base / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(base) or not candidate.is_file():
            return None
        return candidate.read_bytes()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read `server.requests` instead

    @property
    def owner(self) -> HTTPTestServer:
        owner: HTTPTestServer = self.server.owner  # type: ignore[attr-defined]
        return owner

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _respond(self, send_body: bool) -> None:
        owner = self.owner
        path = parse.unquote(parse.urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        with owner._lock:
            owner.requests.append(LoggedRequest(self.command, path, range_header))
        faults = owner.take_faults(path)
        if "status" in faults:
            self._empty(faults["status"])
            return
        data = owner.content(path)
        if data is None:
            self._empty(404)
            return
        if "tamper" in faults and faults["tamper"] < len(data):
            i = faults["tamper"]
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        if "endless" in faults:
            self._send_endless(data, send_body)
            return
        status, start, end = 200, 0, len(data)
        match = _RANGE_RE.fullmatch(range_header or "")
        if match and "ignore_range" not in faults:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            if start >= len(data) or start >= end:
                self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if "cut" in faults:
            self._write(body[: faults["cut"]])
            self._hang_up()
            return
        if "drip" in faults:
            self._drip(body, faults["drip"] / 1000)
            return
        if "stall" in faults:
            self._write(body[: faults["stall"]])
            self.close_connection = True
            self.owner._stopping.wait()
            return
        self._write(body)

    def _drip(self, body: bytes, interval: float) -> None:
        next_byte = time.monotonic()
        for i in range(len(body)):
            if not self._write(body[i : i + 1]):
                return
            next_byte += interval
            if self.owner._stopping.wait(max(0.0, next_byte - time.monotonic())):
                return

    def _send_endless(self, data: bytes, send_body: bool) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not send_body:
            return
        block = (data or b"\0") * max(1, (1 << 16) // max(1, len(data)))
        sent = 0
        while sent < ENDLESS_LIMIT and not self.owner._stopping.is_set():
            if not self._write(block):
                return
            sent += len(block)

    def _write(self, chunk: bytes) -> bool:
        try:
            self.wfile.write(chunk)
            self.wfile.flush()
        except OSError:  # the client hung up: expected when it aborts a download
            self.close_connection = True
            return False
        return True

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HTTPTestServer]:
    """A started HTTPTestServer serving `tmp_path / "www"`; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    with HTTPTestServer(root) as server:
        yield server
