"""`sign-release`: the command line of the offline release tooling."""

from __future__ import annotations

import click

from updater import __version__
from updater.cliutil import ErrorHandlingGroup


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sign-release")
def cli() -> None:
    """Sign OS images into a TUF repository that every node verifies."""


def main() -> None:
    cli(prog_name="sign-release")
