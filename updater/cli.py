"""`updater`: the command line of the node agent.

Thin by design: it parses options, calls the library, prints the result (text or
`--json`) and maps `updater.errors` to exit codes (see README, "Exit codes"). Each
command group lives in its own module under `updater/commands/` and is registered here.
"""

from __future__ import annotations

from pathlib import Path

import click

from updater import __version__
from updater.cliutil import ErrorHandlingGroup

DEFAULT_CONFIG = Path("/etc/updater/config.toml")


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    envvar="UPDATER_CONFIG",
    help="Agent configuration file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(__version__, prog_name="updater")
@click.pass_context
def cli(ctx: click.Context, config_path: Path, as_json: bool) -> None:
    """Image-based A/B updater agent for immutable Linux nodes."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["json"] = as_json


def _register() -> None:
    from updater.commands import layout

    cli.add_command(layout.layout)
    from updater.commands.tufclient import tuf_client

    cli.add_command(tuf_client)


_register()


def main() -> None:
    cli(prog_name="updater")
