"""updater.health with real commands and a real HTTP server on 127.0.0.1.

Time is a fake clock that only moves when the checker sleeps, so rounds and deadlines
are asserted exactly and no test waits for a deadline.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from updater.config import HealthCheck, HealthConfig
from updater.health import OUTPUT_TAIL, HealthResult, run_health_checks


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def cmd(*argv: str, timeout: float = 10.0) -> HealthCheck:
    return HealthCheck(command=tuple(argv), http=None, timeout=timeout)


def passes_on_run(n: int, counter: Path) -> HealthCheck:
    """A real script that fails until its n-th run (a counter file keeps the count)."""
    script = (
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"; '
        f'echo "run $n"; [ $n -ge {n} ]'
    )
    return cmd("sh", "-c", script)


def run(
    *checks: HealthCheck, deadline: float = 30, interval: float = 10
) -> tuple[HealthResult, FakeTime]:
    fake = FakeTime()
    config = HealthConfig(deadline=deadline, interval=interval, checks=checks)
    return run_health_checks(config, clock=fake.clock, sleep=fake.sleep), fake


def test_no_checks_pass_at_once() -> None:
    result, fake = run()
    assert result.passed and result.rounds == 1 and fake.sleeps == []


def test_true_passes_in_one_round() -> None:
    result, fake = run(cmd("true"))
    assert result.passed and result.rounds == 1 and fake.sleeps == []
    assert result.outcomes[0].detail == "exit 0"


def test_false_fails_at_the_deadline() -> None:
    result, fake = run(cmd("false"), deadline=30, interval=10)
    assert not result.passed
    assert result.rounds == 4 and fake.sleeps == [10, 10, 10]  # rounds at t=0, 10, 20, 30
    assert result.elapsed == 30
    assert result.outcomes[0].runs == 4 and result.outcomes[0].detail == "exit 1"
    assert result.summary() == (
        "health checks failed after 4 rounds in 30s: FAIL: command false: exit 1"
    )


def test_last_sleep_is_cut_to_the_deadline() -> None:
    result, fake = run(cmd("false"), deadline=25, interval=10)
    assert fake.sleeps == [10, 10, 5] and result.rounds == 4


def test_zero_deadline_still_runs_one_round() -> None:
    result, fake = run(cmd("false"), deadline=0)
    assert not result.passed and result.rounds == 1 and fake.sleeps == []


def test_script_that_passes_on_its_third_run(tmp_path: Path) -> None:
    result, fake = run(passes_on_run(3, tmp_path / "count"), cmd("true"))
    assert result.passed and result.rounds == 3 and fake.sleeps == [10, 10]
    first = result.outcomes[0]
    assert first.runs == 3 and first.output == "run 3\n"
    assert result.summary() == "2 health checks passed (round 3)"


def test_every_check_must_pass_in_the_same_round(tmp_path: Path) -> None:
    result, _ = run(passes_on_run(2, tmp_path / "c1"), cmd("false"), deadline=20)
    assert not result.passed
    assert [o.passed for o in result.outcomes] == [True, False]
    assert "FAIL: command false: exit 1" in result.summary()
    assert "sh -c" not in result.summary()  # only failing checks are named


def test_command_timeout_kills_the_whole_group() -> None:
    # The shell's child `sleep` would keep the output pipe open if only sh were killed.
    result, _ = run(cmd("sh", "-c", "echo started; sleep 60; echo never", timeout=0.3), deadline=0)
    outcome = result.outcomes[0]
    assert not outcome.passed
    assert outcome.detail == "timed out after 0.3s" and outcome.output == "started\n"


def test_missing_command_is_a_failed_check() -> None:
    result, _ = run(cmd("/nonexistent/health-probe"), deadline=0)
    assert not result.passed
    assert result.outcomes[0].detail.startswith("cannot run /nonexistent/health-probe: ")


def test_signal_and_output_tail() -> None:
    result, _ = run(
        cmd("sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; kill -TERM $$"), deadline=0
    )
    outcome = result.outcomes[0]
    assert outcome.detail == "killed by signal 15"
    assert outcome.output == "x" * OUTPUT_TAIL


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []  # replaced per server by the fixture
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        status = self.statuses.pop(0) if self.statuses else 200
        body = f"status {status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"statuses": [], "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def http_check(url: str, timeout: float = 5.0) -> HealthCheck:
    return HealthCheck(command=None, http=url, timeout=timeout)


def test_http_500_then_200(server: tuple[str, type[_Handler]]) -> None:
    base, handler = server
    handler.statuses.extend([500, 503])
    result, fake = run(http_check(f"{base}/healthz"))
    assert result.passed and result.rounds == 3 and fake.sleeps == [10, 10]
    assert result.outcomes[0].detail == "HTTP 200"
    assert result.outcomes[0].output == "status 200\n"
    assert handler.requests == ["/healthz"] * 3


def test_http_failing_until_deadline(server: tuple[str, type[_Handler]]) -> None:
    base, handler = server
    handler.statuses.extend([500] * 10)
    result, _ = run(http_check(f"{base}/healthz"), deadline=10)
    assert not result.passed and result.rounds == 2
    assert result.outcomes[0].describe() == f"FAIL: http {base}/healthz: HTTP 500"


def test_http_connection_refused_is_a_failed_check() -> None:

    with socket.socket() as sock:  # a port that nobody listens on: bound, not listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result, _ = run(http_check(f"http://127.0.0.1:{port}/"), deadline=0)
    assert not result.passed
    assert result.outcomes[0].detail.startswith("request failed (ConnectionError)")
