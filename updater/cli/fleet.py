"""`updater reboot-lock`: the operator's view of the group's reboot semaphore.

`status` lists the nodes holding a slot of this node's group; `release [NODE_ID]` gives
back a slot - this node's, or that of a node that never came back from its reboot (its
slot stays held on purpose: a bad release stops its group instead of spreading;
docs/fleet.md). Thin like every command module: parse, call the agent, emit.
"""

from __future__ import annotations

import click

from core.cli import JsonGroup, emit
from updater.cli.agent import _agent, wait_option


@click.group("reboot-lock", cls=JsonGroup)
def reboot_lock() -> None:
    """Show or release slots of the reboot lock ([coordination])."""


@reboot_lock.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """List the nodes holding a reboot slot of this node's group."""
    data = _agent(ctx).reboot_lock()
    holders = data["holders"]
    lines = [
        f"group {data['group']}: {len(holders)} of {data['max_concurrent']} reboot slots held",
        *(f"  {h}{' (this node)' if h == data['node_id'] else ''}" for h in holders),
    ]
    emit(data, lines)


@reboot_lock.command()
@click.argument("node_id", required=False)
@wait_option
@click.pass_context
def release(ctx: click.Context, node_id: str | None, wait: bool) -> None:
    """Give back the reboot slot of NODE_ID (default: this node)."""
    released = _agent(ctx, wait=wait).release_reboot_lock(node_id)
    who = node_id or "this node"
    text = f"released the reboot slot of {who}" if released else f"{who} held no reboot slot"
    emit({"released": released, "node_id": node_id}, text)
