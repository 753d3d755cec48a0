"""`updater`: the command line of the node agent.

Thin by design: it parses options, calls the library, prints the result (text or
`--json`) and maps `core.errors` to exit codes (see README, "Exit codes"). Each
command group lives in its own module under `updater/commands/` and is registered here.
"""

from __future__ import annotations

from pathlib import Path

import click

from core import __version__
from core.cli import ErrorHandlingGroup

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
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
@click.version_option(__version__, prog_name="updater")
@click.pass_context
def cli(ctx: click.Context, config_path: Path, as_json: bool, verbose: bool) -> None:
    """Image-based A/B updater agent for immutable Linux nodes.

    Exit codes: 0 success (also "nothing to install"), 1 other failure, 2 bad usage or
    configuration, 3 update rejected (untrusted or bad data), 4 environment failure
    (network, disk, permissions), 5 health check failed and the node rolled back.
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["json"] = as_json
    ctx.obj["verbose"] = verbose


def _register() -> None:
    from updater.commands import agent, layout

    for command in agent.COMMANDS:
        cli.add_command(command)

    cli.add_command(layout.layout)
    from updater.commands.tufclient import tuf_client

    cli.add_command(tuf_client)


_register()


def main() -> None:
    cli(prog_name="updater")
