"""The agent's commands: status, check, install, activate, rollback, mark-good, mark-bad,
health-check and daemon.

Each command builds an `Agent` from the config, calls one method and prints the result
with `core.cli.emit`; `install --json` prints `{"event": "progress", ...}` lines before
its `{"event": "result", ...}`. Every command that changes the node takes `--wait`; the
`Agent` takes the state directory's lock (`updater.lock`), the command only says
whether to wait for it.

Invariant: this module imports click and `updater.slots` only; the agent and its
libraries are imported by `_agent`, when a command runs (fast start, see `updater.cli`,
whose lazy registry `COMMANDS` names each command of this module).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from core.cli import echo_json, emit, json_mode
from updater.cli import Settings
from updater.slots import SLOTS

if TYPE_CHECKING:
    from updater.agent import Agent, Progress


# Options more than one command takes, defined once.
from_option = click.option(
    "--from",
    "source",
    type=click.Path(file_okay=False, path_type=Path),
    help="A mounted medium holding a repository (metadata/ and targets/).",
)
reboot_option = click.option(
    "--reboot", is_flag=True, help="Run the pre_reboot hook and reboot afterwards."
)
wait_option = click.option(
    "--wait",
    is_flag=True,
    help="If another updater is changing this node, wait for it instead of failing at once.",
)


def _agent(ctx: click.Context, *, wait: bool = False) -> Agent:
    # Imported here, not at the top: the agent pulls in its libraries, and a command
    # line that only asks for --help (or another group) must not pay for them.
    from updater.agent import Agent
    from updater.config import load_config
    from updater.logsetup import setup_logging

    settings = ctx.find_object(Settings)
    assert settings is not None, "the updater group sets its Settings"
    setup_logging(verbose=settings.verbose)
    return Agent(load_config(settings.config_path), wait=wait)


def _progress() -> Progress | None:
    """JSON lines with --json; a one-line bar on a terminal; nothing otherwise."""
    if json_mode():

        def as_json(role: str, done: int, total: int) -> None:
            echo_json({"event": "progress", "role": role, "done": done, "total": total})

        return as_json
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()

    def bar(role: str, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        width = 30
        filled = int(frac * width)
        rate = done / max(time.monotonic() - started, 1e-6) / 2**20
        line = (
            f"\r{role:8} [{'#' * filled}{'.' * (width - filled)}] {frac:6.1%} "
            f"{done / 2**20:8.1f}/{total / 2**20:.1f} MiB {rate:6.1f} MiB/s"
        )
        click.echo(line, nl=done >= total, err=True)

    return bar


@click.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the booted and primary slot, each slot's state and version, what is pending."""
    data = _agent(ctx).status()
    lines = [
        f"booted slot:  {data['booted_slot']}",
        f"primary slot: {data['primary_slot'] or 'none will boot!'}",
        f"bootloader:   {data['bootloader']}  hardware: {data['hardware']}"
        f"  channel: {data['channel']}",
    ]
    for slot, info in data["slots"].items():
        parts = ", ".join(f"{r}={label}" for r, label in info["partitions"].items())
        mark = " (booted)" if info["booted"] else ""
        lines.append(
            f"slot {slot}{mark}: {info['state']:7} version {info['version'] or '-'}  [{parts}]"
        )
    pending = data["pending"]
    lines.append(
        f"pending: {pending['version']} in slot {pending['slot']} since {pending['since']}"
        if pending
        else "pending: nothing"
    )
    if data["failed_versions"]:
        lines.append(f"failed versions: {', '.join(data['failed_versions'])}")
    if data["last_error"]:
        lines.append(f"last error: {data['last_error']}")
    if data["withdrawn"]:
        lines.append(
            f"withdrawn: the running release {data['withdrawn']} is withdrawn by its signed"
            " rollout plan; the next release installs as usual"
        )
    if data["waiting"]:
        lines.append(f"waiting: {data['waiting']}")
    if data["lock_held"]:
        lines.append(f"reboot lock: held (group {data['lock_held']})")
    emit(data, lines)


@click.command()
@from_option
@click.pass_context
def check(ctx: click.Context, source: Path | None) -> None:
    """Refresh the signed metadata and say whether a newer release is available."""
    data = _agent(ctx).check(source)
    text = (
        f"update available: {data['version']} (running {data['current_version'] or 'unknown'})"
        if data["update_available"]
        else f"up to date (running {data['current_version'] or 'unknown'})"
    )
    if data["waiting"]:
        text += f"; waiting for {data['waiting']['reason']}: {data['waiting']['detail']}"
    emit(data, text)


@click.command()
@click.option("--version", "version", help="Install exactly this version (may retry a failed one).")
@click.option("--force", is_flag=True, help="With --version: allow a downgrade or re-install.")
@click.option("--no-activate", is_flag=True, help="Write and verify only; do not switch slots.")
@click.option("--no-reboot", is_flag=True, help="Switch slots but do not reboot.")
@click.option(
    "--full", is_flag=True, help="Download whole images; reuse nothing the slots hold (no delta)."
)
@from_option
@wait_option
@click.pass_context
def install(
    ctx: click.Context,
    version: str | None,
    force: bool,
    no_activate: bool,
    no_reboot: bool,
    full: bool,
    source: Path | None,
    wait: bool,
) -> None:
    """Install the newest release (or --version) into the inactive slot and switch to it."""
    if force and version is None:
        raise click.UsageError("--force needs --version")
    result = _agent(ctx, wait=wait).install(
        version=version,
        force=force,
        activate=not no_activate,
        reboot=not (no_reboot or no_activate),
        source=source,
        progress=_progress(),
        full=full,
    )
    if result.version is None and result.waiting is not None:
        text = f"not installing now: {result.waiting.line()}"
    elif result.version is None:
        text = "nothing to install: already running the newest release"
    else:
        text = f"installed {result.version} into slot {result.slot}" + (
            " (already there, verified)" if result.reused else ""
        )
        if result.activated:
            text += f"; slot {result.slot} boots next"
        if result.rebooting:
            text += "; rebooting"
        if result.waiting is not None:
            text += f"; not switching yet: {result.waiting.line()}"
    emit({"event": "result", **result.to_json()}, text)


@click.command()
@click.argument("slot", type=click.Choice(SLOTS))
@reboot_option
@wait_option
@click.pass_context
def activate(ctx: click.Context, slot: str, reboot: bool, wait: bool) -> None:
    """Boot SLOT next, with one try (it must hold a verified image)."""
    _agent(ctx, wait=wait).activate(slot, reboot=reboot)
    emit({"primary_slot": slot, "rebooting": reboot}, f"slot {slot} boots next")


@click.command()
@reboot_option
@wait_option
@click.pass_context
def rollback(ctx: click.Context, reboot: bool, wait: bool) -> None:
    """Make the other (known good) slot primary again."""
    slot = _agent(ctx, wait=wait).rollback(reboot=reboot)
    emit({"primary_slot": slot, "rebooting": reboot}, f"slot {slot} boots next")


@click.command("mark-good")
@wait_option
@click.pass_context
def mark_good(ctx: click.Context, wait: bool) -> None:
    """Commit the booted slot: the bootloader keeps booting it."""
    slot = _agent(ctx, wait=wait).mark_good()
    emit({"slot": slot, "state": "good"}, f"slot {slot} marked good")


@click.command("mark-bad")
@click.argument("slot", type=click.Choice(SLOTS), required=False)
@click.option("--force", is_flag=True, help="Even if no other slot would boot.")
@wait_option
@click.pass_context
def mark_bad(ctx: click.Context, slot: str | None, force: bool, wait: bool) -> None:
    """Invalidate SLOT (default: the booted one) so the bootloader will not boot it."""
    done = _agent(ctx, wait=wait).mark_bad(slot, force=force)
    emit({"slot": done, "state": "bad"}, f"slot {done} marked bad")


@click.command("health-check")
@click.option("--no-reboot", is_flag=True, help="After a rollback, do not reboot.")
@wait_option
@click.pass_context
def health_check(ctx: click.Context, no_reboot: bool, wait: bool) -> None:
    """After every boot: commit the booted slot if healthy, else roll back (exit 5)."""
    # A failed slot is the agent's SlotFailed (details: the outcome); the error handler
    # prints it and exits 5.
    outcome = _agent(ctx, wait=wait).health_check(reboot=not no_reboot)
    emit(outcome.to_json(), f"{outcome.action}: slot {outcome.slot}. {outcome.detail}")


@click.command()
@click.option("--once", is_flag=True, help="Check (and install) once, then exit.")
@wait_option
@click.pass_context
def daemon(ctx: click.Context, once: bool, wait: bool) -> None:
    """Poll for updates at the configured interval plus random jitter. A cycle that
    finds another updater changing the node is skipped (without --wait)."""
    _agent(ctx, wait=wait).daemon(once=once)
