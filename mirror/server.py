"""`update-mirror serve`: a small HTTP/1.1 server for a mirror directory, safe to expose
to a site's network.

Serves `DIR/current` (metadata/ and targets/) with correct Content-Length, HEAD, and
single-range requests (`bytes=a-b`, `bytes=a-`, `bytes=-n` -> 206 + Content-Range, 416
when unsatisfiable), so the agent resumes downloads through it. Sites that prefer a real
web server use nginx instead (docs/mirror.md); both follow the same rule.

Invariants:

* `current` is resolved once per request and the file is opened before any header is
  sent, so one response is always one file of one state - a publish during a download
  changes what the next request sees, never the bytes of this one.
* Only regular files below the resolved state are served: the decoded request path
  must pass `core.release.check_target_path` (else 400) and resolve inside the
  state (no symlink escape, no directory listings; else 404).
* No client can hold the server: a connection is served by one of `Limits.workers`
  workers, and the next one is accepted only when a worker is free - until then it
  waits in the kernel's listen backlog and costs no descriptor. A request line and its
  headers must arrive whole within `header_timeout` and within the size limits (else
  408 / 414 / 431), and a connection silent for `idle_timeout` (reading or writing)
  is closed.
* Every request that arrived gets a status line: malformed ones 400, absurd ranges
  416 or 206 per RFC 9110 (numbers longer than 18 digits are "beyond any file", never
  parsed), an unexpected error 500 (and a logged traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import re
import resource
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib import parse

from core.errors import ConfigError
from core.release import check_target_path
from mirror.store import MirrorError

logger = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# 18 digits hold any file size; a longer number (after leading zeros) is beyond any file.
_MAX_DIGITS = 18
_BEYOND = 10**_MAX_DIGITS
CHUNK = 1 << 20
# A socket send must finish within the idle timeout: 64 KiB per 60 s is ~1 KiB/s at least.
_SEND = 1 << 16
# Unread request bytes are drained this long after an error answer, so closing does not
# reset the connection before the client read the answer (nginx's lingering close).
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may take of the server (seconds, counts, bytes)."""

    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    workers: int = 64
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100

    def check(self) -> None:
        for name in ("idle_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be more than 0 seconds")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")


def parse_bind(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ConfigError naming the value otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--bind {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _position(digits: str) -> int:
    """A byte position from a Range header, without parsing an unbounded number."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _BEYOND


def byte_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """(start, end_exclusive) for a satisfiable single range, None for no/ignored
    Range (serve the whole file), False when unsatisfiable (416). Pure."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: RFC 9110 allows answering 200
    if not m.group(1):
        n = _position(m.group(2))
        return (max(0, size - n), size) if n > 0 and size > 0 else False
    start = _position(m.group(1))
    end = min(_position(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or start >= end:
        return False
    return start, end


def descriptor_workers() -> int:
    """How many workers the descriptor limit allows: each holds a socket and a file."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft - 32) // 2)  # 32 for the listener, stdio, logs, imports


class MirrorServer(HTTPServer):
    """An HTTP server whose accept loop takes a connection only for a free worker."""

    # The kernel caps it at net.core.somaxconn; waiting connections cost no descriptor.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, directory: Path, address: tuple[str, int], limits: Limits) -> None:
        self.directory = directory
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.workers)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        # accept() must never block the loop (a client may reset between poll and accept).
        self.socket.setblocking(False)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and serve until `shutdown()`; at most `limits.workers` at once."""
        self._stop.clear()
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                while not self._stop.is_set():
                    if not self._slots.acquire(timeout=poll_interval):
                        continue
                    if self._stop.is_set() or not selector.select(poll_interval):
                        self._slots.release()
                        continue
                    self._accept()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting and return once the loop has ended (workers finish alone)."""
        self._stop.set()
        self._stopped.wait()

    def _accept(self) -> None:
        """Accept one connection for the slot the caller holds, and start its worker."""
        try:
            conn, addr = self.socket.accept()
        except OSError as e:
            self._slots.release()
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                logger.warning("cannot accept a connection now: %s", e.strerror)
                self._stop.wait(0.1)  # resources come back when a worker ends
            return
        try:
            threading.Thread(target=self._work, args=(conn, addr), daemon=True).start()
        except RuntimeError as e:  # no thread could be started
            logger.warning("cannot serve %s now: %s", addr, e)
            conn.close()
            self._slots.release()

    def _work(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            self.finish_request(conn, addr)
        except Exception:
            logger.exception("connection from %s failed", addr[0])
        finally:
            self.shutdown_request(conn)
            self._slots.release()


class _DeadlineReader(io.RawIOBase):
    """A connection's read side: each read waits at most the idle timeout and, while
    `deadline` (a `time.monotonic()` value) is set, never past it."""

    def __init__(self, sock: socket.socket, idle_timeout: float) -> None:
        super().__init__()
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.deadline: float | None = None
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wait = self.idle_timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("request line and headers not received in time")
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle_timeout)
        self.received += n
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # A request without a version is answered as HTTP/1.0: with a status line.
    default_request_version = "HTTP/1.0"
    server: MirrorServer

    def setup(self) -> None:
        super().setup()
        limits = self.server.limits
        self.connection.settimeout(limits.idle_timeout)
        self.rfile.close()  # replaced: reads must honour the header deadline
        self._reader = _DeadlineReader(self.connection, limits.idle_timeout)
        self.rfile = io.BufferedReader(self._reader)
        self._started = False

    def version_string(self) -> str:
        return "update-mirror"

    def log_message(self, format: str, *args: object) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._started = True
        super().send_response(code, message)

    def handle_one_request(self) -> None:
        self._started = False
        head = self._read_head()
        if head is None:
            return
        self.raw_requestline, headers = head
        reader, self.rfile = self.rfile, io.BytesIO(headers)
        try:
            parsed = self.parse_request()  # answers 400/431/505 itself
        finally:
            self.rfile = reader
        if not parsed:
            self._linger()
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is never read: the next request is lost
        method = getattr(self, f"do_{self.command}", None)
        if method is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, "only GET and HEAD")
            return
        try:
            method()
        except OSError as e:  # the client went away or stopped reading
            logger.info("%s: %s: %s", self.address_string(), self.requestline, e)
            self.close_connection = True
        except Exception:
            logger.exception("%s: %s failed", self.address_string(), self.requestline)
            self.close_connection = True
            if not self._started:
                with contextlib.suppress(OSError):
                    self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _read_head(self) -> tuple[bytes, bytes] | None:
        """The request line and the header block (with its empty line), received
        within the header deadline and the size limits; None when the connection is
        done (closed, reset, timed out, or refused with a status already sent)."""
        limits = self.server.limits
        self.close_connection = True
        self.command = self.request_version = self.requestline = ""
        self._reader.deadline = time.monotonic() + limits.header_timeout
        start = self._reader.received
        try:
            line = self.rfile.readline(limits.max_request_line + 1)
            if len(line) > limits.max_request_line:
                self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                return None
            if not line.endswith(b"\n"):
                return None  # closed by the client
            if len(line.split()) < 3:
                return line, b"\r\n"  # no version, so no headers follow (HTTP/0.9 style)
            lines: list[bytes] = []
            size = 0
            while True:
                header = self.rfile.readline(limits.max_header_bytes - size + 1)
                size += len(header)
                if size > limits.max_header_bytes:
                    self._refuse(
                        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large"
                    )
                    return None
                if not header.endswith(b"\n"):
                    return None
                if header in (b"\r\n", b"\n"):
                    break
                lines.append(header)
                if len(lines) > limits.max_headers:
                    self._refuse(
                        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many request headers"
                    )
                    return None
        except TimeoutError:
            if self._reader.received > start:  # what it sent was read: nothing to drain
                self._refuse(
                    HTTPStatus.REQUEST_TIMEOUT, "request not received in time", linger=False
                )
            return None
        except OSError:
            return None
        finally:
            self._reader.deadline = None
        return line, b"".join(lines) + b"\r\n"

    def _refuse(self, status: HTTPStatus, why: str, *, linger: bool = True) -> None:
        """Answer an error and close (after draining what the client still sends)."""
        with contextlib.suppress(OSError):
            self.send_error(status, why)
            if linger:
                self._linger()

    def _linger(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self._reader.deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_BYTES and (chunk := self._reader.read(1 << 16)):
                drained += len(chunk)

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _open(self) -> BinaryIO | HTTPStatus:
        """The requested file of the current state, or the status to answer."""
        if self.path.startswith("/"):  # origin-form; urlsplit would read `//x` as a host
            path = self.path.partition("?")[0]
        else:  # absolute-form, e.g. from a proxy
            split = parse.urlsplit(self.path)
            if split.scheme not in ("http", "https") or not split.path.startswith("/"):
                return HTTPStatus.BAD_REQUEST
            path = split.path
        try:
            relative = parse.unquote(path, errors="strict").removeprefix("/")
        except UnicodeDecodeError:
            return HTTPStatus.BAD_REQUEST
        if not relative:
            return HTTPStatus.NOT_FOUND
        try:
            check_target_path(relative)
        except ValueError:
            return HTTPStatus.BAD_REQUEST
        try:
            base = (self.server.directory / "current").resolve(strict=True)
            candidate = (base / relative).resolve(strict=True)
        except (OSError, RuntimeError):
            return HTTPStatus.NOT_FOUND
        if not candidate.is_relative_to(base) or not candidate.is_file():
            return HTTPStatus.NOT_FOUND
        try:
            return candidate.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            return HTTPStatus.NOT_FOUND
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return HTTPStatus.SERVICE_UNAVAILABLE
            logger.error("cannot open %s: %s", candidate, e)
            return HTTPStatus.INTERNAL_SERVER_ERROR

    def _empty(self, status: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _respond(self, body: bool) -> None:
        f = self._open()
        if isinstance(f, HTTPStatus):
            if f in (HTTPStatus.BAD_REQUEST, HTTPStatus.INTERNAL_SERVER_ERROR):
                self.send_error(f)
            else:
                self._empty(f, {"Retry-After": "1"} if f == HTTPStatus.SERVICE_UNAVAILABLE else {})
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
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:  # file shrank: cannot happen to a published state
                    self.close_connection = True
                    return
                view = memoryview(chunk)
                for at in range(0, len(view), _SEND):
                    # Each slice must leave within the idle timeout; OSError ends it.
                    self.wfile.write(view[at : at + _SEND])
                left -= len(chunk)


def make_server(directory: Path, bind: str, limits: Limits | None = None) -> MirrorServer:
    """A bound (not yet serving) server for `directory`; `serve_forever()` to run.
    `limits.workers` is lowered to what RLIMIT_NOFILE allows (and a warning logged)."""
    limits = limits or Limits()
    limits.check()
    host, port = parse_bind(bind)
    if not (directory / "current").exists():
        raise ConfigError(f"{directory}: no synced state to serve (run update-mirror sync)")
    allowed = descriptor_workers()
    if limits.workers > allowed:
        logger.warning("--workers %d: lowered to %d (RLIMIT_NOFILE)", limits.workers, allowed)
        limits = dataclasses.replace(limits, workers=allowed)
    try:
        return MirrorServer(directory, (host, port), limits)
    except OSError as e:
        raise MirrorError(f"cannot listen on {bind}: {e.strerror}") from e
