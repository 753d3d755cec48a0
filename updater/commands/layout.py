"""`updater layout`: write a partition layout to a disk and show a disk's partitions.

Thin: options are parsed here, the work is done by `updater.disk.layout` and
`updater.disk.gpt`; their errors reach the user through `ErrorHandlingGroup`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from core.cli import ErrorHandlingGroup, echo_json
from core.errors import ConfigError
from updater.disk.gpt import GptDisk, read_gpt, repair_gpt
from updater.disk.layout import ALIAS_OF, apply_layout, load_layout, parse_size


def _size(value: str | None) -> int | None:
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


def _want_json(ctx: click.Context, flag: bool) -> bool:
    obj = ctx.find_root().obj
    return flag or (isinstance(obj, dict) and bool(obj.get("json")))


@click.group(cls=ErrorHandlingGroup)
def layout() -> None:
    """Partition layouts: apply one to a disk or image file, show a disk's partitions."""


@layout.command()
@click.argument("layout_file", metavar="LAYOUT", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--size", help="Create (or grow) TARGET as a sparse image file, e.g. 2G.")
@click.option("--force", is_flag=True, help="Overwrite an existing partition table.")
def apply(layout_file: Path, target: Path, size: str | None, force: bool) -> None:
    """Write the GPT of LAYOUT (a .toml file) to TARGET (block device or image file)."""
    spec = load_layout(layout_file)
    disk, notes = apply_layout(spec, target, size=_size(size), force=force)
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"{target}: wrote {len(disk.partitions)} partitions from {layout_file}")


@layout.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of partitions.")
@click.pass_context
def show(ctx: click.Context, target: Path, as_json: bool) -> None:
    """Print TARGET's partitions and any damage found in its GPT."""
    disk = read_gpt(target)
    rows = _rows(disk)
    if _want_json(ctx, as_json):
        echo_json(rows)
    else:
        click.echo(
            f"{target}: disk GUID {disk.disk_guid}, {disk.sector_size}-byte sectors, "
            f"usable LBA {disk.first_usable_lba}-{disk.last_usable_lba}"
        )
        head = f"{'#':>3} {'name':<12} {'type':<14} {'first':>10} {'last':>10} {'size':>10}"
        click.echo(f"{head} {'unique GUID':<36} prio tries ok")
        for r in rows:
            click.echo(
                f"{r['number']:>3} {r['name']:<12} {r['type']:<14} {r['first_lba']:>10} "
                f"{r['last_lba']:>10} {_human(r['size_bytes']):>10} "
                f"{r['unique_guid']:<36} {r['priority']:>4} {r['tries']:>5} "
                f"{int(r['successful']):>2}"
            )
    for note in disk.damaged:
        click.echo(f"damaged: {note} (run `updater layout repair {target}`)", err=True)


@layout.command()
@click.argument("target", type=click.Path(path_type=Path))
def repair(target: Path) -> None:
    """Rewrite a damaged GPT copy (or protective MBR) of TARGET from the good one."""
    fixed = repair_gpt(target)
    for note in fixed:
        click.echo(f"repaired: {note}")
    if not fixed:
        click.echo(f"{target}: both GPT copies are valid; nothing to repair")
