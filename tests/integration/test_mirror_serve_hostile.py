"""`update-mirror serve` under hostile clients, on 127.0.0.1: half-sent requests and a
client dripping one byte at a time are cut off at the header deadline, idle sockets
beyond the process's descriptor limit (RLIMIT_NOFILE 256) wait in the kernel backlog
instead of denying service, and every malformed request (NUL in the path, a climbing
path, a 5,000-digit Range, a 100 KB request line, 1,000 headers, an unexpected error)
gets a status line. The server runs in-process on port 0, or as the console script
with the descriptor limit set in the child.

Every wait is a bounded loop with a generous timeout; no test measures time."""

from __future__ import annotations

import contextlib
import logging
import resource
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mirror
from mirror import server as mirror_serve
from mirror.server import Limits, MirrorServer, make_server
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo, write_image

BIN = Path(sys.executable).parent
PATIENCE = 120.0  # seconds: a bound for loops that end much sooner when the server is right


@pytest.fixture(scope="module")
def mdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    repo = make_repo(tmp / "upstream", [ImageSpec(write_image(tmp / "img", 300_000), "1.0.0")])
    out = tmp / "mirror"
    mirror.sync(
        f"file://{repo}/metadata", f"file://{repo}/targets", out, ROOT_JSON, allow_example_keys=True
    )
    return out


def image_of(mdir: Path) -> tuple[str, bytes]:
    """(URL path, content) of the mirrored image."""
    (image,) = (mdir / "current" / "targets").rglob("*.zst")
    return f"/targets/{image.relative_to(mdir / 'current' / 'targets')}", image.read_bytes()


@contextlib.contextmanager
def running(mdir: Path, limits: Limits | None = None) -> Iterator[MirrorServer]:
    server = make_server(mdir, "127.0.0.1:0", limits or Limits())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=PATIENCE)


def address(server: MirrorServer) -> tuple[str, int]:
    return "127.0.0.1", int(server.server_address[1])


def exchange(addr: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, half-close, and read the whole answer (until the server closes)."""
    with socket.create_connection(addr, timeout=PATIENCE) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def status(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), answer[:200]
    return int(line.split()[1])


def get(path: str, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Host: mirror", "Connection: close", *headers))
    return f"GET {path} HTTP/1.1\r\n{head}\r\n".encode()


def wait_closed(socks: list[socket.socket]) -> tuple[list[socket.socket], list[bytes]]:
    """Read every socket until the server closes it or PATIENCE passes; returns the
    sockets still open and what the closed ones received."""
    pending = {s.fileno(): s for s in socks}
    received: dict[int, bytes] = dict.fromkeys(pending, b"")
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    for _ in range(int(PATIENCE * 10)):
        if not pending:
            break
        for fd, _event in poller.poll(100):
            try:
                chunk = pending[fd].recv(1 << 16)
            except ConnectionError:
                chunk = b""
            received[fd] += chunk
            if not chunk:
                poller.unregister(fd)
                del pending[fd]
    return list(pending.values()), [v for k, v in received.items() if k not in pending]


def test_hostile_requests_each_get_a_status_line(mdir: Path) -> None:
    path, data = image_of(mdir)
    many = "".join(f"X-Header-{i}: {i}\r\n" for i in range(1000))
    cases = {
        "NUL in the path": (get("/%00"), 400),
        "climbing path": (get("/..%2f..%2fetc/passwd"), 400),
        "climbing into the mirror": (get("/metadata/../../manifests/1.json"), 400),
        "start of 5,000 digits": (get(path, "Range: bytes=" + "9" * 5000 + "-"), 416),
        "end of 5,000 digits": (get(path, "Range: bytes=0-" + "9" * 5000), 206),
        "suffix of 5,000 digits": (get(path, "Range: bytes=-" + "9" * 5000), 206),
        "zeros then a small number": (get(path, "Range: bytes=" + "0" * 5000 + "5-9"), 206),
        "100 KB request line": (f"GET /{'a' * 100_000} HTTP/1.1\r\n\r\n".encode(), 414),
        "1,000 headers": (f"GET / HTTP/1.1\r\n{many}\r\n".encode(), 431),
        "one 40 KB header": (get("/", "X-Big: " + "b" * 40_000), 431),
        "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        "HTTP/0.9 style": (b"GET /metadata/timestamp.json\r\n", 200),
        "unknown method": (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        "double slash (the stdlib collapses it)": (get("//etc/passwd"), 404),
        "not UTF-8": (get("/metadata/%ff%fe"), 400),
    }
    with running(mdir) as server:
        for name, (request, expected) in cases.items():
            answer = exchange(address(server), request)
            assert status(answer) == expected, (name, answer[:300])
        # A huge end or suffix is the whole file (RFC 9110: clipped to the length).
        body = exchange(address(server), get(path, "Range: bytes=-" + "9" * 5000))
        assert body.split(b"\r\n\r\n", 1)[1] == data
        # The server still serves after all that.
        assert requests.get(f"{server.url}{path}", timeout=PATIENCE).content == data


def test_an_unexpected_error_is_a_500_and_logged(
    mdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, data = image_of(mdir)

    def broken(header: str | None, size: int) -> None:
        raise RuntimeError("injected fault")

    with running(mdir) as server:
        monkeypatch.setattr(mirror_serve, "byte_range", broken)
        with caplog.at_level(logging.ERROR, logger="mirror.server"):
            answer = exchange(address(server), get(path))
        assert status(answer) == 500
        assert any("injected fault" in (r.exc_text or "") for r in caplog.records)
        monkeypatch.undo()
        assert requests.get(f"{server.url}{path}", timeout=PATIENCE).content == data


def test_half_sent_requests_are_closed_at_the_header_deadline(mdir: Path) -> None:
    path, data = image_of(mdir)
    with running(mdir, Limits(header_timeout=1.0)) as server:
        addr = address(server)
        socks = [socket.create_connection(addr, timeout=PATIENCE) for _ in range(200)]
        try:
            for s in socks:
                s.sendall(b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: mirror\r\n")
            # A normal client is served while they wait.
            got = requests.get(f"{server.url}{path}", timeout=PATIENCE)
            assert got.status_code == 200 and got.content == data
            still_open, answers = wait_closed(socks)
            assert still_open == []
            assert all(a == b"" or status(a) == 408 for a in answers)
        finally:
            for s in socks:
                s.close()


def test_a_client_dripping_bytes_is_cut_off(mdir: Path) -> None:
    limits = Limits(header_timeout=1.0, idle_timeout=30.0)
    with running(mdir, limits) as server, socket.create_connection(address(server), PATIENCE) as s:
        request = b"GET /metadata/timestamp.json HTTP/1.1\r\nX-Slow: " + b"x" * 10_000
        cut = False
        for byte in request:  # each byte well within the idle timeout
            try:
                s.sendall(bytes([byte]))
            except ConnectionError:
                cut = True
                break
            ready, _, _ = select.select([s], [], [], 0.05)
            if ready:
                answer = s.recv(1 << 16)
                assert answer == b"" or status(answer) == 408
                cut = True
                break
        assert cut, "the server waited for the whole 10 KB drip"


def test_idle_sockets_beyond_the_descriptor_limit_do_not_deny_service(
    mdir: Path, tmp_path: Path
) -> None:
    path, data = image_of(mdir)

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(BIN / "update-mirror"),
            "serve",
            str(mdir),
            "--bind=127.0.0.1:0",
            "--header-timeout=1",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=limit_descriptors,
    )
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), (tmp_path / "serve.log").read_text()
        url = line.rsplit(" on ", 1)[1].strip()
        port = int(url.rsplit(":", 1)[1])
        # One after the other, each connected before the next (as an attacker paces
        # them), more than the server's 256 descriptors; then the real client.
        established = 0
        for _ in range(300):
            s = socket.socket()
            idle.append(s)
            s.settimeout(1.0)
            with contextlib.suppress(OSError):
                s.connect(("127.0.0.1", port))
                established += 1
        got = requests.get(f"{url}{path}", timeout=PATIENCE)
        assert got.status_code == 200 and got.content == data
        assert established == len(idle)  # the ones not served yet wait in the backlog
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_serve_options_are_checked(tmp_path: Path, mdir: Path) -> None:
    for option, value in (("--header-timeout", "0"), ("--idle-timeout", "-1"), ("--workers", "0")):
        done = subprocess.run(
            [str(BIN / "update-mirror"), "serve", str(mdir), option, value],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and f"Invalid value for '{option}'" in done.stderr
