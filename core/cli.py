"""Shared click plumbing for the three console scripts.

Invariant: an expected failure (`core.errors.UpdaterError`) ends in exactly one line
on stderr, `<program>: error: <message>`, and the error class's exit code - never a
traceback. Unexpected exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import json
from typing import Any

import click

from core.errors import UpdaterError


class ErrorHandlingGroup(click.Group):
    """A click group that maps `UpdaterError` to one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UpdaterError as err:
            root = ctx.find_root()
            prog = root.info_name or "updater"
            obj = root.obj if isinstance(root.obj, dict) else {}
            if obj.get("json"):
                click.echo(json.dumps({"error": str(err), "kind": type(err).__name__}), err=False)
            click.echo(f"{prog}: error: {err}", err=True)
            ctx.exit(err.exit_code)


def echo_json(data: Any) -> None:
    """Print one JSON document on stdout (sorted keys, so output is stable)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))
