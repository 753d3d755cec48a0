"""Replay of the fuzz corpus: every input the campaign kept, and every crash input it
found, through its target's one-input function (tests/fuzz/targets.py), in plain
pytest - atheris is not needed. A target fails here exactly as it would under the
fuzzer: a reader raised something other than its documented error, wrote a message of
more than one line, or an accepted input did not survive its round trip.

Crash inputs (tests/fuzz/crashes/<target>/) are the regression tests of the defects the
campaign found (docs/fuzzing.md); each is also proven by a named test elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, strict_logging

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _inputs(target: str) -> list[Path]:
    found: list[Path] = []
    for kind in ("corpus", "crashes"):
        directory = FUZZ / kind / target
        if directory.is_dir():
            found += sorted(p for p in directory.iterdir() if p.is_file())
    return found


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays(target: str) -> None:
    inputs = _inputs(target)
    # Seeds are real inputs made by real tools (tests/fuzz/seeds.py); never none.
    assert any(p.name.startswith("seed-") for p in inputs), f"no seeds for {target}"
    failures: list[str] = []
    with strict_logging():
        for path in inputs:
            try:
                TARGETS[target].run(path.read_bytes())
            except Exception as err:  # any escape is the failure reported
                failures.append(f"{path.relative_to(FUZZ)}: {type(err).__name__}: {err}")
    assert not failures, f"{len(failures)} of {len(inputs)} inputs fail:\n" + "\n".join(
        failures[:20]
    )


def test_every_corpus_has_a_target() -> None:
    """A corpus directory whose target was renamed would silently stop replaying."""
    for kind in ("corpus", "crashes"):
        directory = FUZZ / kind
        if directory.is_dir():
            assert {p.name for p in directory.iterdir()} <= set(TARGETS)
