"""Run one fuzz target under atheris (libFuzzer): `python -m tests.fuzz.run TARGET [ARGS]`.

ARGS are libFuzzer's: corpus directories, `-runs=N`, `-max_total_time=S`, `-dict=F`,
`-merge=1`, `-artifact_prefix=DIR/`... `tests/fuzz/campaign.sh` runs every target with
the arguments of the recorded campaign. The project's packages (and tomllib, whose
syntax paths lead to odd TOML values) are instrumented for coverage; python-tuf,
construct and the rest of the standard library are not.

atheris is an optional dependency (`pip install -e '.[fuzz]'`); nothing else imports it,
so the corpus replays without it (`tests/unit/test_fuzz_replay.py`).
"""

from __future__ import annotations

import atexit
import importlib
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

INSTRUMENTED = ["core", "updater", "mirror", "tomllib"]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer args]")
    name = argv[1]
    try:
        atheris: Any = importlib.import_module("atheris")
    except ImportError:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]'")
    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz import targets
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r} (known: {', '.join(targets.TARGETS)})")
    atheris.Setup([_relauncher(name), *argv[2:]], targets.TARGETS[name].run)
    with targets.strict_logging():
        atheris.Fuzz()


def _relauncher(name: str) -> str:
    """An executable that runs this target again: libFuzzer re-executes its argv[0]
    with its own arguments for -merge=1 (and -fork), so argv[0] must name the target."""
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    atexit.register(shutil.rmtree, work, True)
    script = work / "run"
    root = Path(__file__).resolve().parent.parent.parent
    script.write_text(
        f"#!/bin/sh\ncd {shlex.quote(str(root))} && exec {shlex.quote(sys.executable)} "
        f'-m tests.fuzz.run {shlex.quote(name)} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


if __name__ == "__main__":
    main(sys.argv)
