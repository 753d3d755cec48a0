"""`python -m tools.node`: build, boot and clean e2e nodes by hand.

python -m tools.node build [--version 2] [--health fail] [--panic] [--label root_b]
python -m tools.node boot WORKDIR [--version 1] [--updates-dir DIR] [--command CMD]...
python -m tools.node clean [--all]
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from tools.node import (
    boot_until,
    build_node,
    build_release,
    default_cache_dir,
    make_node,
    make_updates_disk,
)
from tools.node.cache import clean as clean_cache


def _version(text: str) -> int | str:
    """`2` on the command line means release 2.0.0, as in the Python API."""
    return int(text) if text.isdigit() else text


@click.group()
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Cache directory (default: $AB_E2E_CACHE or .cache/e2e).")  # fmt: skip
@click.pass_context
def cli(ctx: click.Context, cache: Path | None) -> None:
    """Build and boot virtual ab-updater nodes (QEMU, OVMF, real GRUB)."""
    ctx.obj = cache or default_cache_dir()


@cli.command()
@click.option("--version", "version", default="1", show_default=True)
@click.option("--health", type=click.Choice(["pass", "fail"]), default="pass", show_default=True)
@click.option("--panic", is_flag=True, help="A release whose init exits: the kernel panics.")
@click.option("--label", default="root_a", show_default=True, help="Filesystem label.")
@click.pass_obj
def build(cache: Path, version: str, health: str, panic: bool, label: str) -> None:
    """Build (or find cached) a release image and, for root_a, the node template disk."""
    start = time.monotonic()
    image = build_release(_version(version), cache=cache, label=label, health=health,  # type: ignore[arg-type]
                          panic=panic)  # fmt: skip
    click.echo(f"release image: {image}")
    if label == "root_a" and health == "pass" and not panic:
        click.echo(f"node template: {build_node(cache, version=_version(version))}")
    click.echo(f"took {time.monotonic() - start:.1f}s")


@cli.command("boot")
@click.argument("workdir", type=click.Path(path_type=Path))
@click.option("--version", "version", default="1", show_default=True)
@click.option("--updates-dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--command", "commands", multiple=True, help="Run on the node (repeatable).")
@click.option("--timeout", default=180.0, show_default=True)
@click.option("--max-boots", default=1, show_default=True)
@click.pass_obj
def boot_cmd(
    cache: Path,
    workdir: Path,
    version: str,
    updates_dir: Path | None,
    commands: tuple[str, ...],
    timeout: float,
    max_boots: int,
) -> None:
    """Make a fresh node in WORKDIR running VERSION in slot A and boot it."""
    node = make_node(workdir, build_release(_version(version), cache=cache), cache=cache)
    updates = None
    if updates_dir is not None or commands:
        updates = make_updates_disk(updates_dir, workdir / "updates.img", commands=commands)
    for result in boot_until(node, updates_disk=updates, max_boots=max_boots, timeout=timeout):
        for marker in result.markers:
            click.echo(f"  E2E: {marker}")
        click.echo(f"boot: {result.exit_reason} after {result.seconds:.1f}s "
                   f"(console: {result.log_path})")  # fmt: skip
    click.echo(f"grubenv: {node.read_grubenv()}")


@cli.command()
@click.option("--all", "everything", is_flag=True, help="Also the debootstrap layer.")
@click.pass_obj
def clean(cache: Path, everything: bool) -> None:
    """Delete the cached artefacts (keeping debootstrap's output unless --all)."""
    keep = [] if everything else list(cache.glob("debootstrap-*"))
    for path in clean_cache(cache, keep=keep):
        click.echo(f"removed {path}")


cli(prog_name="python -m tools.node")
