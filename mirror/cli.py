"""`update-mirror`: the command line for air-gapped mirrors (verified sync, export, serve).

Thin: each command parses options, calls one function of `mirror.upstream` (or
`mirror.server`) and prints its result - text, or JSON with `--json`. Errors are
`UpdaterError`s turned into one line and an exit code by `ErrorHandlingGroup`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

import mirror
from core import __version__
from core.cli import ErrorHandlingGroup, echo_json
from mirror.server import Limits, make_server

_root_option = click.option(
    "--root",
    "trusted_root",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The trusted root.json (the one the nodes ship).",
)
_example_keys_option = click.option(
    "--allow-example-keys",
    is_flag=True,
    help="Trust a root naming a key of keys-example/ (published: demos and tests ONLY).",
)


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="update-mirror")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool) -> None:
    """Mirror a signed update repository for sites without internet access."""
    ctx.obj = {"json": as_json}


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


def _emit(ctx: click.Context, data: dict[str, Any], lines: list[str]) -> None:
    if ctx.find_root().obj.get("json"):
        echo_json(data)
    else:
        click.echo("\n".join(lines))


@cli.command()
@click.argument("metadata_url")
@click.argument("targets_url")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_root_option
@click.option("--hardware", multiple=True, help="Mirror only this hardware (repeatable).")
@click.option("--channel", help="Mirror only this channel.")
@click.option("--keep", type=int, help="Keep the N newest releases per hardware/role.")
@_example_keys_option
@click.pass_context
def sync(
    ctx: click.Context,
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
    _emit(ctx, result.to_json(), lines)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_root_option
@_example_keys_option
@click.pass_context
def verify(
    ctx: click.Context, directory: Path, trusted_root: Path, allow_example_keys: bool
) -> None:
    """Verify the served state from TRUSTED root, as a node would (metadata and images)."""
    data = mirror.verify(directory, trusted_root, allow_example_keys=allow_example_keys)
    lines = [
        f"state {data['state']} verifies: {data['images_verified']} image(s)",
        "releases:",
        *_release_lines(data["releases"]),
        "expiry:",
        *_expiry_lines(data["expiry"]),
    ]
    _emit(ctx, data, lines)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def status(ctx: click.Context, directory: Path) -> None:
    """Show the served state, its releases and each role's days left (no verification)."""
    data = mirror.status(directory)
    lines = [
        f"state {data['state']} synced {data['synced_at']} from {data['upstream']}",
        "releases:",
        *_release_lines(data["releases"]),
        "expiry:",
        *_expiry_lines(data["expiry"]),
    ]
    _emit(ctx, data, lines)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hardware", help="Export only this hardware's images.")
@click.option("--version", "version", help="Export only this release version.")
@click.pass_context
def export(
    ctx: click.Context, directory: Path, dest: Path, hardware: str | None, version: str | None
) -> None:
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
    _emit(ctx, data, lines)


_SECONDS = click.FloatRange(min=0, min_open=True)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
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
    click.echo(f"serving {directory} on {server.url}", err=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    cli(prog_name="update-mirror")
