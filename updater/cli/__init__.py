"""`updater`: the command line of the node agent, all of it in this package.

Thin by design: a command parses its options, calls the library once and prints the
result with `core.cli.emit` - text for people, or with `--json` (before or after the
command name) one JSON document per line; errors become one line and the exit code of
their class in `core.cli.ProgramGroup` (README, "Exit codes").

`updater.cli` holds the group and its options; `updater.cli.agent` the agent's commands
(status ... daemon), `updater.cli.layout` the `layout` group, `updater.cli.tufclient`
the tuf-conformance client protocol - one module per audience, because together they
would pass ~500 lines.

Invariant (fast start): importing this package and building its command tree costs
click and the standard library only. Each command imports the library it needs when it
runs, so `updater status` and `updater health-check` - every look, every boot - never
load tuf, requests or cryptography (tests/integration/test_cli_json.py,
bench/startup.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from core.cli import program
from updater.cli import agent, layout, tufclient

DEFAULT_CONFIG = Path("/etc/updater/config.toml")


@program("updater")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    envvar="UPDATER_CONFIG",
    help="Agent configuration file.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
@click.pass_context
def cli(ctx: click.Context, config_path: Path, verbose: bool) -> None:
    """Image-based A/B updater agent for immutable Linux nodes.

    Exit codes: 0 success (also "nothing to install"), 1 other failure, 2 bad usage or
    configuration, 3 update rejected (untrusted or bad data), 4 environment failure
    (network, disk, permissions), 5 health check failed and the node rolled back.
    """
    ctx.obj = agent.Settings(config_path=config_path, verbose=verbose)


for _command in (*agent.COMMANDS, layout.layout, tufclient.tuf_client):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="updater")
