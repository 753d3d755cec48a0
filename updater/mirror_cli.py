"""`update-mirror`: the command line for air-gapped mirrors (verified sync, export, serve)."""

from __future__ import annotations

import click

from updater import __version__
from updater.cliutil import ErrorHandlingGroup


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="update-mirror")
def cli() -> None:
    """Mirror a signed update repository for sites without internet access."""


def main() -> None:
    cli(prog_name="update-mirror")
