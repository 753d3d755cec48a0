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
click and the standard library only. The registry `COMMANDS` is lazy - a command line
imports the module of its own command, not the others' - and each command imports the
library it needs when it runs, so `updater status` and `updater health-check` (every
look, every boot) never load tuf, requests or cryptography
(tests/integration/test_cli_json.py, bench/startup.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from core.cli import program

DEFAULT_CONFIG = Path("/etc/updater/config.toml")
_AGENT = "updater.cli.agent"
# Every command: name -> "module:attribute", imported when the command is asked for.
COMMANDS = {
    "status": f"{_AGENT}:status",
    "check": f"{_AGENT}:check",
    "install": f"{_AGENT}:install",
    "activate": f"{_AGENT}:activate",
    "rollback": f"{_AGENT}:rollback",
    "mark-good": f"{_AGENT}:mark_good",
    "mark-bad": f"{_AGENT}:mark_bad",
    "health-check": f"{_AGENT}:health_check",
    "daemon": f"{_AGENT}:daemon",
    "reboot-lock": "updater.cli.fleet:reboot_lock",
    "layout": "updater.cli.layout:layout",
    "tuf-client": "updater.cli.tufclient:tuf_client",
}


@dataclass(frozen=True)
class Settings:
    """The group's options, for every command (`ctx.obj`)."""

    config_path: Path
    verbose: bool = False


@program("updater", lazy_commands=COMMANDS)
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
    ctx.obj = Settings(config_path=config_path, verbose=verbose)


def main() -> None:
    cli(prog_name="updater")
