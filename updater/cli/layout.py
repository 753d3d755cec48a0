"""`updater layout`: write a partition layout to a disk and show or repair a disk's GPT.

Thin: options are parsed here, the work is done by `updater.disk.layout` and
`updater.disk.gpt` (imported when a command runs); their errors reach the user through
the program's error handler (`core.cli.ProgramGroup`). With --json each command prints
one object: `apply` what it wrote, `show` the disk and its `partitions`, `repair` what
it repaired. Warnings and damage notes also go to stderr, for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from core.cli import JsonGroup, emit
from core.errors import ConfigError

if TYPE_CHECKING:
    from updater.disk.gpt import GptDisk


def _size(value: str | None) -> int | None:
    from updater.disk.layout import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise ConfigError(f"--size: {e}") from None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _rows(disk: GptDisk) -> list[dict[str, Any]]:
    from updater.disk.layout import ALIAS_OF

    return [
        {
            "number": p.number,
            "name": p.name,
            "type_guid": str(p.type_guid),
            "type": ALIAS_OF.get(p.type_guid, str(p.type_guid)),
            "unique_guid": str(p.unique_guid),
            "first_lba": p.first_lba,
            "last_lba": p.last_lba,
            "size_bytes": p.size_bytes(disk.sector_size),
            "priority": p.priority,
            "tries": p.tries,
            "successful": p.successful,
            "attributes": p.attributes,
        }
        for p in disk.partitions
    ]


@click.group(cls=JsonGroup)
def layout() -> None:
    """Partition layouts: apply one to a disk or image file, show a disk's partitions."""


@layout.command()
@click.argument("layout_file", metavar="LAYOUT", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--size", help="Create (or grow) TARGET as a sparse image file, e.g. 2G.")
@click.option("--force", is_flag=True, help="Overwrite an existing partition table.")
def apply(layout_file: Path, target: Path, size: str | None, force: bool) -> None:
    """Write the GPT of LAYOUT (a .toml file) to TARGET (block device or image file)."""
    from updater.disk.layout import apply_layout, load_layout

    spec = load_layout(layout_file)
    disk, notes = apply_layout(spec, target, size=_size(size), force=force)
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    emit(
        {
            "target": str(target),
            "layout": str(layout_file),
            "partitions": len(disk.partitions),
            "warnings": list(notes),
        },
        f"{target}: wrote {len(disk.partitions)} partitions from {layout_file}",
    )


@layout.command()
@click.argument("target", type=click.Path(path_type=Path))
def show(target: Path) -> None:
    """Print TARGET's partitions and any damage found in its GPT."""
    from updater.disk.gpt import read_gpt

    disk = read_gpt(target)
    rows = _rows(disk)
    head = f"{'#':>3} {'name':<12} {'type':<14} {'first':>10} {'last':>10} {'size':>10}"
    lines = [
        f"{target}: disk GUID {disk.disk_guid}, {disk.sector_size}-byte sectors, "
        f"usable LBA {disk.first_usable_lba}-{disk.last_usable_lba}",
        f"{head} {'unique GUID':<36} prio tries ok",
    ]
    lines += [
        f"{r['number']:>3} {r['name']:<12} {r['type']:<14} {r['first_lba']:>10} "
        f"{r['last_lba']:>10} {_human(r['size_bytes']):>10} "
        f"{r['unique_guid']:<36} {r['priority']:>4} {r['tries']:>5} "
        f"{int(r['successful']):>2}"
        for r in rows
    ]
    emit(
        {
            "target": str(target),
            "disk_guid": str(disk.disk_guid),
            "sector_size": disk.sector_size,
            "first_usable_lba": disk.first_usable_lba,
            "last_usable_lba": disk.last_usable_lba,
            "partitions": rows,
            "damaged": list(disk.damaged),
        },
        lines,
    )
    for note in disk.damaged:
        click.echo(f"damaged: {note} (run `updater layout repair {target}`)", err=True)


@layout.command()
@click.argument("target", type=click.Path(path_type=Path))
def repair(target: Path) -> None:
    """Rewrite a damaged GPT copy (or protective MBR) of TARGET from the good one."""
    from updater.disk.gpt import repair_gpt

    fixed = repair_gpt(target)
    lines = [f"repaired: {note}" for note in fixed]
    emit(
        {"target": str(target), "repaired": list(fixed)},
        lines or [f"{target}: both GPT copies are valid; nothing to repair"],
    )
