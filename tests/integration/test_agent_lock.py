"""Two agents at once on one node: every command that changes the node takes the state
directory's lock, so a second one fails at once naming the holder (or waits, with
`--wait`), while `status` and `check` keep working.

Real processes through the console script; the first install is held in the middle of
its image download by a real HTTP server that trickles that one file until the test
releases it - no timing decides what the test sees.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib import parse

from tests.agentnode import Node, journal_bytes, node, sha, spawn
from tests.httpserver import HTTPTestServer, _Handler
from tests.signing_helpers import ImageSpec, add_release, publish

__all__ = ["node"]

TRICKLE = 1024  # bytes per write while held: a 3 MiB image would take minutes
TRICKLE_PAUSE = 0.05  # seconds between two trickled writes (keeps read timeouts away)
BOUND = 90.0  # seconds any wait of this test may take at most


class _TrickleHandler(_Handler):
    def _write(self, chunk: bytes) -> bool:
        owner = self.owner
        assert isinstance(owner, TrickleServer)
        if parse.unquote(parse.urlsplit(self.path).path) != owner.slow_path:
            return super()._write(chunk)
        sent = 0
        while sent < len(chunk) and not owner.released.is_set():
            if not super()._write(chunk[sent : sent + TRICKLE]):
                return False
            sent += TRICKLE
            owner.sending.set()
            owner.released.wait(TRICKLE_PAUSE)
        return super()._write(chunk[sent:])


class TrickleServer(HTTPTestServer):
    """An HTTPTestServer that sends `slow_path` a trickle at a time until `released`."""

    def __init__(self, root: Path, slow_path: str) -> None:
        super().__init__(root)
        self.slow_path = slow_path
        self.sending = threading.Event()  # the slow body has started
        self.released = threading.Event()
        self._httpd.RequestHandlerClass = _TrickleHandler

    def stop(self) -> None:
        self.released.set()
        super().stop()


def image_path(node: Node, version: str) -> str:
    """The URL path of the root image of `version` in the node's repository."""
    targets = node.repo / "targets"
    found = next(p for p in targets.rglob("*.root.img.zst") if version in p.parts)
    return "/" + str(found.relative_to(node.repo))


def wait_for(predicate: object, what: str) -> None:
    """Poll `predicate` (a callable) until true; fail after BOUND seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def held_install(node: Node, *args: str) -> Iterator[tuple[subprocess.Popen[str], TrickleServer]]:
    """`updater install *args` running, held in the middle of its image download until
    the server is `released`; the server keeps serving until the block ends."""
    server = TrickleServer(node.repo, image_path(node, "2.0.0"))
    with server:
        node.server = server
        proc = spawn(node, "install", *args, log=node.root / "first")
        try:
            wait_for(
                lambda: server.sending.is_set() or proc.poll() is not None, "the slow download"
            )
            assert proc.poll() is None, (node.root / "first.err").read_text()
            yield proc, server
        finally:
            server.released.set()
            finish(proc)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_second_agent_is_refused_at_once_while_the_first_installs(node: Node) -> None:
    # A real second release, so that without the lock the second install would write B.
    add_release(node.repo, [ImageSpec(node.images["1.0.0"], "1.0.0")])
    publish(node.repo)
    lock = node.root / "state" / "lock"
    with held_install(node, "--no-reboot") as (first, _):
        assert lock.read_text().split() == [str(first.pid)]
        assert lock.stat().st_mode & 0o777 == 0o600
        for args in (
            ("install", "--version", "1.0.0", "--force", "--no-reboot"),
            ("activate", "A"),
            ("rollback",),
            ("mark-good",),
            ("mark-bad", "B"),
            ("health-check", "--no-reboot"),
        ):
            done = node.run(*args)
            assert done.returncode == 4, (args, done.stderr)
            line = one_error_line(done)
            assert f"pid {first.pid}" in line and str(lock) in line, (args, line)
        # The daemon skips its cycle (and says why) instead of writing B as well.
        daemon = node.run("daemon", "--once")
        assert daemon.returncode == 0 and f"pid {first.pid}" in daemon.stderr, daemon.stderr

        # Read-only commands never block; check does not record while the lock is held
        # (its write would race the install's own journal writes).
        before = journal_bytes(node)
        assert node.ok("status")["slots"]["B"]["version"] is None  # being written
        assert node.ok("check")["version"] == "2.0.0"
        assert journal_bytes(node) == before
        assert first.poll() is None  # still held: everything above ran meanwhile
    assert first.returncode == 0, (node.root / "first.err").read_text()
    result = json.loads((node.root / "first.out").read_text().splitlines()[-1])
    assert (result["version"], result["slot"], result["activated"]) == ("2.0.0", "B", True)
    assert node.slot_sha("B", node.images["2.0.0"].stat().st_size) == sha(node.images["2.0.0"])
    env = node.env()
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    assert node.ok("status")["pending"]["version"] == "2.0.0"


def test_wait_waits_for_the_holder_then_runs(node: Node) -> None:
    with held_install(node, "--no-reboot") as (first, server):
        waiter = spawn(node, "install", "--wait", "--no-reboot", log=node.root / "second")
        err = node.root / "second.err"
        try:
            wait_for(lambda: "waiting" in err.read_text() or waiter.poll() is not None, "wait")
            assert waiter.poll() is None, err.read_text()
            assert f"pid {first.pid}" in err.read_text()
            server.released.set()
            assert finish(first) == 0, (node.root / "first.err").read_text()
        finally:
            assert finish(waiter) == 0, err.read_text()
    # It ran after the first: B already held the verified 2.0.0, so nothing was rewritten.
    result = json.loads((node.root / "second.out").read_text().splitlines()[-1])
    assert result["version"] == "2.0.0" and result["reused"] is True
    assert node.holds("B", "2.0.0")
