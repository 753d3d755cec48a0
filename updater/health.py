"""Post-boot health checks: is the freshly booted slot good enough to commit?

The configured checks (`[health] checks`) run in rounds - every check, every round -
until one round passes entirely or the deadline passes. A `command` check passes when
it exits 0 within its timeout; an `http` check passes on a 2xx answer within its
timeout. The caller (the agent) commits on a pass and rolls back on a fail.

Invariants:

* a check never hangs the agent: each run has a timeout, a timed-out command is killed
  with its whole process group, and only a bounded tail of any output is kept;
* a check that cannot even start, for whatever reason (command not found, not
  executable, a NUL byte in an argument, connection refused), is a failed check, never
  an exception - only the verdict after the deadline matters, and an exception would
  leave the booted slot neither committed nor rolled back;
* the clock and sleep are injectable, so tests drive rounds without waiting;
* at least one round always runs, even with a zero deadline; no checks means pass;
* `requests` is imported, and an HTTP session made, only when an http check runs:
  `updater health-check` runs on every boot and must start fast.

Library code: nothing is printed; the result carries every check's last outcome.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from updater.config import HealthCheck, HealthConfig

if TYPE_CHECKING:
    import requests

OUTPUT_TAIL = 2048  # bytes of a check's output kept for the report
HTTP_BODY_LIMIT = 64 * 1024  # bytes of a health endpoint's answer read at most


@dataclass(frozen=True)
class CheckOutcome:
    """The last run of one check."""

    check: HealthCheck
    passed: bool
    detail: str  # one line: "exit 0", "exit 3", "HTTP 500", "timed out after 5s", ...
    output: str  # tail of stdout+stderr, or of the HTTP body
    runs: int  # how many times this check ran

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        what = self.check.describe()
        if not what.isprintable():  # one line, no control bytes, in logs and the journal
            what = repr(what)
        return f"{verdict}: {what}: {self.detail}"


@dataclass(frozen=True)
class HealthResult:
    passed: bool
    rounds: int
    elapsed: float  # seconds by the injected clock
    outcomes: tuple[CheckOutcome, ...]

    def summary(self) -> str:
        """One line for logs and errors, naming the failing checks."""
        if self.passed:
            return f"{len(self.outcomes)} health checks passed (round {self.rounds})"
        failing = "; ".join(o.describe() for o in self.outcomes if not o.passed)
        return f"health checks failed after {self.rounds} rounds in {self.elapsed:.0f}s: {failing}"


def _tail(data: bytes) -> str:
    return data[-OUTPUT_TAIL:].decode("utf-8", errors="replace")


def run_command_check(check: HealthCheck) -> tuple[bool, str, str]:
    """Run a command check once: (passed, detail, output tail)."""
    assert check.command is not None
    if not check.command:
        return False, "cannot run an empty command", ""
    try:
        # A new session, so that a timeout can kill everything the check started,
        # including grandchildren that would otherwise keep the output pipe open.
        proc = subprocess.Popen(
            check.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        # ValueError: e.g. an embedded NUL byte, refused before anything is executed.
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err)
        name = check.command[0]
        shown = name if name.isprintable() else repr(name)
        return False, f"cannot run {shown}: {' '.join(reason.split())}", ""
    try:
        output, _ = proc.communicate(timeout=check.timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return False, f"timed out after {check.timeout:g}s", _tail(output)
    if proc.returncode == 0:
        return True, "exit 0", _tail(output)
    if proc.returncode < 0:
        return False, f"killed by signal {-proc.returncode}", _tail(output)
    return False, f"exit {proc.returncode}", _tail(output)


def run_http_check(check: HealthCheck, session: requests.Session) -> tuple[bool, str, str]:
    """GET an http check's URL once: (passed, detail, body tail)."""
    import requests  # here, not at the top: `health-check` must start fast (issue 10)

    assert check.http is not None
    try:
        with session.get(check.http, timeout=check.timeout, stream=True) as response:
            body = response.raw.read(HTTP_BODY_LIMIT, decode_content=True) or b""
            status = response.status_code
    except requests.Timeout:
        return False, f"timed out after {check.timeout:g}s", ""
    except requests.RequestException as err:
        reason = type(err).__name__
        return False, f"request failed ({reason}): {' '.join(str(err).split())[:200]}", ""
    return 200 <= status < 300, f"HTTP {status}", _tail(body)


def run_check(check: HealthCheck, session: Callable[[], requests.Session]) -> tuple[bool, str, str]:
    """Run one check once; `session` gives the HTTP session (made on first use)."""
    if check.command is not None:
        return run_command_check(check)
    return run_http_check(check, session())


def run_health_checks(
    config: HealthConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    session: requests.Session | None = None,
) -> HealthResult:
    """Run `config.checks` in rounds until a round passes or `config.deadline` passes."""
    sessions: list[requests.Session] = []  # ours, made only if an http check runs

    def http_session() -> requests.Session:
        if session is not None:
            return session
        if not sessions:
            # requests only here: most nodes have command checks only, and
            # `health-check` runs on every boot (fast start, issue 10).
            import requests

            own = requests.Session()
            # Health endpoints are local to the node: a fleet proxy from the
            # environment must not decide whether the workload is up.
            own.trust_env = False
            sessions.append(own)
        return sessions[0]

    runs = [0] * len(config.checks)
    start = clock()
    rounds = 0
    try:
        while True:
            rounds += 1
            outcomes = []
            for index, check in enumerate(config.checks):
                runs[index] += 1
                passed, detail, output = run_check(check, http_session)
                outcomes.append(CheckOutcome(check, passed, detail, output, runs[index]))
            elapsed = clock() - start
            if all(o.passed for o in outcomes):
                return HealthResult(True, rounds, elapsed, tuple(outcomes))
            remaining = config.deadline - elapsed
            if remaining <= 0:
                return HealthResult(False, rounds, elapsed, tuple(outcomes))
            sleep(min(config.interval, remaining))
    finally:
        for own in sessions:
            own.close()
