"""Hooks: the site's commands the agent runs around a reboot and after a commit.

A hook is an argv list (no shell) from the config's `[hooks]`; an empty list is "no
hook". Invariant: a hook that fails or runs past its timeout raises `HookFailed`
naming the hook and its exit status, and the caller stops before the next step
(a failed `pre_reboot` drain means no reboot).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from core.errors import UpdateFailed

log = logging.getLogger(__name__)


class HookFailed(UpdateFailed):
    """A configured hook command failed or timed out."""


def run_hook(name: str, argv: Sequence[str], timeout: float) -> None:
    """Run a configured hook; an empty command is "no hook"."""
    if not argv:
        return
    log.info("running %s hook: %s", name, " ".join(argv))
    try:
        done = subprocess.run(list(argv), timeout=timeout, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise HookFailed(f"{name} hook: command not found: {argv[0]}") from e
    except subprocess.TimeoutExpired as e:
        raise HookFailed(f"{name} hook {argv[0]}: timed out after {timeout:g}s") from e
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).split())[-200:]
        raise HookFailed(f"{name} hook {argv[0]}: exit {done.returncode}: {tail}")
