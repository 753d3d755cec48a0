"""`update-mirror`: the command line for air-gapped mirrors (verified sync, export, serve).

Thin: each command parses options, calls one function of the `mirror` API (or
`mirror.server`) and prints its result with `core.cli.emit` - text, or with `--json`
(before or after the command) one JSON object. Errors are `UpdaterError`s turned into
one line and their class's exit code by `core.cli.ProgramGroup`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

import mirror
from core.cli import allow_example_keys_option, emit, program, trusted_root_option
from mirror.server import Limits, make_server

_DIRECTORY = click.Path(file_okay=False, path_type=Path)


@program("update-mirror")
def cli() -> None:
    """Mirror a signed update repository for sites without internet access."""


def _expiry_lines(expiry: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for role, e in expiry.items():
        warn = (
            "  EXPIRED"
            if e["days_left"] <= 0
            else ("  (expires soon)" if e["days_left"] < 2 else "")
        )
        lines.append(
            f"  {role:10} v{e['version']:<5} {e['days_left']:>7} days left "
            f"(expires {e['expires']}){warn}"
        )
    return lines


def _release_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"  {r['hardware']:16} {r['channel']:10} {r['version']:12} {', '.join(sorted(r['images']))}"
        for r in rows
    ]


@cli.command()
@click.argument("metadata_url")
@click.argument("targets_url")
@click.argument("directory", type=_DIRECTORY)
@trusted_root_option()
@click.option("--hardware", multiple=True, help="Mirror only this hardware (repeatable).")
@click.option("--channel", help="Mirror only this channel.")
@click.option("--keep", type=int, help="Keep the N newest releases per hardware/role.")
@allow_example_keys_option()
def sync(
    metadata_url: str,
    targets_url: str,
    directory: Path,
    trusted_root: Path,
    hardware: tuple[str, ...],
    channel: str | None,
    keep: int | None,
    allow_example_keys: bool,
) -> None:
    """Verify upstream as a node would and publish what is new, atomically."""
    result = mirror.sync(
        metadata_url,
        targets_url,
        directory,
        trusted_root,
        hardware=hardware,
        channel=channel,
        keep=keep,
        allow_example_keys=allow_example_keys,
    )
    lines = [
        f"published state {result.state} in {directory}: "
        f"{len(result.downloaded)} image(s) downloaded "
        f"({result.bytes_downloaded} bytes), {len(result.reused)} already present, "
        f"{len(result.removed_objects)} removed",
        *(
            [f"skipped {len(result.skipped)} target(s) with unsafe paths:"]
            + [f"  {why}" for why in result.skipped.values()]
            if result.skipped
            else []
        ),
        "releases:",
        *_release_lines(result.releases),
        "expiry:",
        *_expiry_lines(result.expiry),
    ]
    emit(result.to_json(), lines)


@cli.command()
@click.argument("directory", type=_DIRECTORY)
@trusted_root_option()
@allow_example_keys_option()
def verify(directory: Path, trusted_root: Path, allow_example_keys: bool) -> None:
    """Verify the served state from TRUSTED root, as a node would (metadata and images)."""
    data = mirror.verify(directory, trusted_root, allow_example_keys=allow_example_keys)
    lines = [
        f"state {data['state']} verifies: {data['images_verified']} image(s)",
        "releases:",
        *_release_lines(data["releases"]),
        "expiry:",
        *_expiry_lines(data["expiry"]),
    ]
    emit(data, lines)


@cli.command()
@click.argument("directory", type=_DIRECTORY)
def status(directory: Path) -> None:
    """Show the served state, its releases and each role's days left (no verification)."""
    data = mirror.status(directory)
    lines = [
        f"state {data['state']} synced {data['synced_at']} from {data['upstream']}",
        "releases:",
        *_release_lines(data["releases"]),
        "expiry:",
        *_expiry_lines(data["expiry"]),
    ]
    emit(data, lines)


@cli.command()
@click.argument("directory", type=_DIRECTORY)
@click.argument("dest", type=_DIRECTORY)
@click.option("--hardware", help="Export only this hardware's images.")
@click.option("--version", "version", help="Export only this release version.")
def export(directory: Path, dest: Path, hardware: str | None, version: str | None) -> None:
    """Write a self-contained repository (metadata, images, README) to DEST."""
    data = mirror.export(directory, dest, hardware, version)
    lines = [
        f"exported {len(data['releases'])} release(s), {data['bytes']} bytes of images, to {dest}",
        "releases:",
        *_release_lines(data["releases"]),
        "expiry:",
        *_expiry_lines(data["expiry"]),
        f"on a node: updater install --from {dest}",
    ]
    emit(data, lines)


_SECONDS = click.FloatRange(min=0, min_open=True)


@cli.command()
@click.argument("directory", type=_DIRECTORY)
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
@click.option(
    "--header-timeout",
    type=_SECONDS,
    default=Limits.header_timeout,
    show_default=True,
    help="Seconds a client has to send a request line and its headers, in total.",
)
@click.option(
    "--idle-timeout",
    type=_SECONDS,
    default=Limits.idle_timeout,
    show_default=True,
    help="Seconds a connection may stay silent (reading or writing) before it is closed.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=Limits.workers,
    show_default=True,
    help="Connections served at once; more wait in the listen backlog.",
)
def serve(
    directory: Path, bind: str, header_timeout: float, idle_timeout: float, workers: int
) -> None:
    """Serve DIRECTORY's current state over HTTP (Range requests, many clients)."""
    logging.basicConfig(level=logging.WARNING)
    limits = Limits(idle_timeout=idle_timeout, header_timeout=header_timeout, workers=workers)
    server = make_server(directory, bind, limits)
    emit({"directory": str(directory), "url": server.url}, f"serving {directory} on {server.url}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    cli(prog_name="update-mirror")
