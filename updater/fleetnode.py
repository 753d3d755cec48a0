"""The node as a member of a fleet: its gates (`updater.fleet`), the reboot lock it
holds across a reboot, and the metrics it publishes.

`updater.agent.Agent` builds on `FleetNode` (which builds on `updater.node.Node`):
what is here is what the agent's commands share about the fleet, kept out of the
orchestration module so that each stays readable.

Invariants:
* the reboot lock is given back only by a node running a committed slot whose health
  checks pass (`release_after_boot`), or by an operator (`release_reboot_lock`); a
  backend that cannot be reached leaves `Journal.lock_held` set, for the daemon to retry;
* the journal records `lock_held` cleared only after the backend confirmed the release;
* metrics never fail a command: a write that fails is logged (`write_metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core.errors import ConfigError, UpdaterError
from updater import health
from updater.config import Config
from updater.decide import HealthAction, HealthOutcome
from updater.fleet import Clock, Fleet, utc_now
from updater.node import Node, changes_node
from updater.state import Journal

log = logging.getLogger(__name__)


class FleetNode(Node):
    """A `Node` with its fleet gates (`fleet`) and reboot lock; `clock` gives "now"
    (UTC) to the wave and window gates."""

    def __init__(self, config: Config, *, wait: bool = False, clock: Clock = utc_now) -> None:
        super().__init__(config, wait=wait)
        self.fleet = Fleet(config, clock=clock)

    def release_after_boot(
        self,
        journal: Journal,
        outcome: HealthOutcome,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Give the reboot slot back once this node is healthy on a committed slot: the
        new one (just committed), or the old one after a rollback or a fall-back - whose
        checks run first, so a node that comes back sick keeps its slot and stops the
        rollout of its group."""
        if outcome.action is not HealthAction.COMMITTED:
            result = health.run_health_checks(self.config.health, clock=clock, sleep=sleep)
            if not result.passed:
                log.error(
                    "slot %s is not healthy (%s): keeping the reboot lock of group %s",
                    outcome.slot,
                    result.summary(),
                    journal.lock_held,
                )
                return
        if self.fleet.release_lock(journal.lock_held):
            self._save(journal.with_lock(None))

    def reboot_lock(self) -> dict[str, Any]:
        """The group's reboot semaphore as the backend has it, and this node's record."""
        if not self.fleet.coordinated:
            raise ConfigError(f"config {self.config.path}: [coordination] backend is none")
        journal = self.journal()
        return {
            "group": self.fleet.group,
            "max_concurrent": self.config.coordination.max_concurrent,
            "holders": list(self.fleet.lock.holders()),
            "node_id": self.fleet.node_id,
            "held_by_this_node": journal.lock_held is not None,
        }

    @changes_node
    def release_reboot_lock(self, node_id: str | None = None) -> bool:
        """An operator gives back the reboot slot of `node_id` (default: this node) - of
        a node that never came back, say; True if it was held."""
        if not self.fleet.coordinated:
            raise ConfigError(f"config {self.config.path}: [coordination] backend is none")
        own = node_id is None or node_id == self.fleet.node_id
        released = self.fleet.lock.release(node_id or self.fleet.node_id)
        journal = self.journal()
        if own and journal.lock_held is not None:
            self._save(journal.with_lock(None))
        return released

    def write_metrics(self) -> None:
        """The node's facts for node_exporter's textfile collector, if configured. A
        failure is logged: metrics never fail the command they describe."""
        path = self.config.metrics.path
        if path is None:
            return
        from updater.metrics import NodeFacts
        from updater.metrics import write_metrics as write

        try:
            journal = self.journal()
            booted = self.booted
            boot = self.boot.load()
            facts = NodeFacts(
                booted_slot=booted,
                booted_version=self.installed_version(journal),
                primary_slot=boot.primary(),
                journal=journal,
                lock_held=(journal.lock_held is not None) if self.fleet.coordinated else None,
                metadata_dir=self.state_dir / "tuf",
                rollout_waiting=journal.waiting.split(":", 1)[0] if journal.waiting else None,
                now=self.fleet.clock(),
            )
            write(path, facts)
        except (OSError, UpdaterError) as e:
            log.warning("metrics %s not written: %s", path, e)
