"""Run the `updater` console script on a test node whose generated config has some
keys changed: `edited_config(node, trusted_root="/x", drop=("allow_example_keys",))`.

For tests of one config key at a time (the slow-retrieval limits, the example-key
option, files that must be regular files); the config text itself comes from
`tests.agentnode.Node.write_config`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Collection
from pathlib import Path

from tests.agentnode import BIN, Node
from tests.bounded import BOUND


def edited_config(
    node: Node, *, drop: Collection[str] = (), add: str = "", **replace: str | float
) -> Path:
    """The node's config (booted slot A) with `key = value` lines replaced (strings are
    quoted), keys in `drop` removed and the lines `add` appended to [repository]."""
    node.write_config("A")
    lines = []
    for line in node.config.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in drop:
            continue
        if key in replace:
            value = replace[key]
            line = f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        lines.append(line)
        if line == "[repository]" and add:
            lines.append(add)
    node.config.write_text("\n".join(lines) + "\n")
    return node.config


def run_updater(*args: str | Path, timeout: float = BOUND) -> subprocess.CompletedProcess[str]:
    """The console script, bounded; TimeoutExpired (a test failure) if it hangs."""
    return subprocess.run(
        [str(BIN / "updater"), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> str:
    """The single `updater: error:` line of a failed run, checked to contain `expected`."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    # Log lines (`updater: INFO: ...`) may come before it; the error is one line.
    lines = [line for line in done.stderr.splitlines() if line.startswith("updater: error: ")]
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert done.stderr.rstrip().endswith(lines[0]), done.stderr
    return lines[0]
