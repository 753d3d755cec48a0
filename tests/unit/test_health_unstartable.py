"""updater.health: a command check that cannot even be started is a failed check, for
whatever reason it cannot start - never an exception out of `run_health_checks` (which
would leave the booted slot neither committed nor rolled back)."""

from __future__ import annotations

from pathlib import Path

import pytest

from updater.config import HealthCheck, HealthConfig
from updater.health import run_health_checks


def no_sleep(seconds: float) -> None:
    pass


def clock() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (("sh\0", "-c", "true"), "embedded null"),  # ValueError from Popen
        (("true", "a\0b"), "embedded null"),  # ... in an argument too
        (("/nonexistent/health-check",), "No such file"),  # OSError
        (("/",), "Permission denied"),  # a directory: OSError EACCES
    ],
)
def test_a_check_that_cannot_start_is_a_failed_check(argv: tuple[str, ...], why: str) -> None:
    config = HealthConfig(
        deadline=0, interval=1, checks=(HealthCheck(command=argv, http=None, timeout=5),)
    )
    result = run_health_checks(config, clock=clock, sleep=no_sleep)
    assert not result.passed and result.rounds == 1
    outcome = result.outcomes[0]
    assert outcome.detail.startswith("cannot run ") and why in outcome.detail, outcome.detail
    assert result.summary().isprintable(), result.summary()  # one line, no NUL


def test_other_checks_still_run_after_one_that_cannot_start(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    checks = (
        HealthCheck(command=("bad\0",), http=None, timeout=5),
        HealthCheck(command=("touch", str(ran)), http=None, timeout=5),
    )
    result = run_health_checks(
        HealthConfig(deadline=0, interval=1, checks=checks), clock=clock, sleep=no_sleep
    )
    assert [o.passed for o in result.outcomes] == [False, True] and ran.exists()
