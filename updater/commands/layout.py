"""`updater layout`: write a partition layout to a disk and show a disk's partitions."""

from __future__ import annotations

import click


@click.group()
def layout() -> None:
    """Partition layouts: apply one to a disk or image file, show a disk's partitions."""
