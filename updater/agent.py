"""Orchestration of an update on one node: check, install, activate, reboot, verify.

This is the only module that combines the others (on top of `updater.node`, the node
as it is); each step below is one call into a module that does one thing. The order is
DESIGN.md's, the one that keeps a node bootable through a power cut at any point:

    install:  refresh TUF -> select release -> mark inactive slot bad (bootloader write)
              -> stream every image into its partition, read back, verify
              -> journal "slot holds version" -> set inactive primary with one try
              -> journal "pending" -> pre_reboot hook -> reboot command
    health-check (every boot):
              booted == pending (or booted not yet committed) -> checks -> commit, or
              mark bad + fall back + reboot; booted != pending and the bootloader
              already gave up on it -> record the version as failed, mark it bad.

Invariants:
* the booted slot is never written (`install.SlotGuard` refuses it, whatever the config);
* nothing becomes primary unless every image of the release verified (stream hashes,
  length, raw sha256 of what was read back from the partition);
* every step is idempotent and restartable from the journal: re-running a command
  after a crash converges (a slot already holding the verified version is re-verified,
  not re-downloaded);
* the agent never leaves the node without a bootable slot: with no good fallback a
  failed health check is reported, not turned into a rollback to an empty slot;
* one agent at a time changes a node: every method that does runs holding the state
  directory's lock (`updater.lock`; the daemon holds it per cycle, not while it sleeps),
  and `check` records its outcome only when it gets the lock without waiting;
* a release that cannot be installed (an image larger than its partition, a role
  without one, ...) is refused by `plan_writes` before the inactive slot is touched.

`UPDATER_FAILPOINT=<step>` makes the process die abruptly (`os._exit`) when it reaches
that step - fault injection for the crash/restart tests, inert otherwise.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from core import release
from core.errors import ConfigError, UpdateFailed, UpdateRejected, UpdaterError
from core.repository import Repository
from updater import health, install
from updater.boot.base import SlotState
from updater.config import Config
from updater.hooks import run_hook
from updater.lock import LockBusy
from updater.node import Node, changes_node
from updater.plan import Plan, plan_writes
from updater.slots import SLOTS, other
from updater.state import Journal

log = logging.getLogger(__name__)

FAILPOINT_ENV = "UPDATER_FAILPOINT"
FAILPOINT_EXIT = 137
Progress = Callable[[str, int, int], None]  # (role, done raw bytes, raw length)


class NoFallback(UpdateFailed):
    """Health checks failed but the other slot is not good: staying on the booted slot."""


def failpoint(step: str) -> None:
    """Die here, like a power cut, when the tests asked for it (see module docstring)."""
    if os.environ.get(FAILPOINT_ENV) == step:
        log.warning("failpoint %s: exiting abruptly", step)
        os._exit(FAILPOINT_EXIT)


@dataclass(frozen=True)
class InstallResult:
    version: str | None  # None: nothing to install
    slot: str | None = None
    activated: bool = False
    rebooting: bool = False
    reused: bool = False  # the slot already held the verified version (crash recovery)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "installed": self.version is not None,
            "version": self.version,
            "slot": self.slot,
            "activated": self.activated,
            "rebooting": self.rebooting,
            "reused": self.reused,
            "images": self.images,
        }


@dataclass(frozen=True)
class HealthOutcome:
    action: str  # nothing | waiting-for-reboot | committed | rolled-back | fell-back | no-fallback
    slot: str
    version: str | None
    detail: str = ""
    rebooting: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "slot": self.slot,
            "version": self.version,
            "detail": self.detail,
            "rebooting": self.rebooting,
        }


class Agent(Node):
    """The node agent for one configuration. Cheap to build; touches disks lazily.

    `wait`: when another process holds the state directory's lock, a method that changes
    the node waits for it instead of raising `LockBusy` at once.
    """

    def __init__(
        self, config: Config, *, session: requests.Session | None = None, wait: bool = False
    ) -> None:
        super().__init__(config, wait=wait)
        self.session = session or _session(config)

    def repository(self, source: Path | None = None) -> Repository:
        """The TUF repository of the config, or a mounted medium (`install --from`)."""
        urls: dict[str, str] = {}
        if source is not None:
            base = source.resolve()
            if not (base / "metadata").is_dir():
                raise ConfigError(f"--from {source}: no metadata/ directory on that medium")
            # Quoted (as_uri): a '#', '?' or '%' in the path is part of the path.
            urls = {
                "metadata_url": (base / "metadata").as_uri(),
                "targets_url": (base / "targets").as_uri(),
            }
        # from_config applies every [repository] key (timeouts, slow-retrieval limits).
        return Repository.from_config(
            self.config.repository, self.state_dir / "tuf", self.session, **urls
        )

    # --- check ---------------------------------------------------------------------

    def find_update(
        self,
        repo: Repository,
        journal: Journal,
        *,
        want_version: str | None = None,
        force: bool = False,
    ) -> Plan | None:
        """Refresh `repo`, select the release for this node and plan its writes into
        the inactive slot (a release that can never be installed is refused here). The
        outcome (None or its one-line error) is recorded, see `_record_check`."""
        try:
            repo.refresh()
            chosen = release.select(
                repo.targets(),
                hardware=self.config.device.hardware,
                channel=self.config.device.channel,
                installed_version=self.installed_version(journal),
                failed_versions=list(journal.failed_versions),
                want_version=want_version,
                force=force,
            )
            found = None
            if chosen is not None:
                inactive = self.targets[other(self.booted)]
                found = plan_writes(chosen, inactive, self.config.roles)
        except UpdaterError as e:
            self._record_check(str(e))
            raise
        self._record_check(None)
        return found

    def check(self, source: Path | None = None) -> dict[str, Any]:
        journal = self.journal()
        found = self.find_update(self.repository(source), journal)
        chosen = found.release if found else None
        return {
            "update_available": chosen is not None,
            "current_version": self.installed_version(journal),
            "version": chosen.version if chosen else None,
            "images": {
                role: {"path": img.path, "length": img.target.length, "raw_length": img.raw_length}
                for role, img in (chosen.images.items() if chosen else ())
            },
        }

    # --- install -------------------------------------------------------------------

    @changes_node
    def install(
        self,
        *,
        version: str | None = None,
        force: bool = False,
        activate: bool = True,
        reboot: bool = True,
        source: Path | None = None,
        progress: Progress | None = None,
    ) -> InstallResult:
        booted = self.booted
        inactive = other(booted)
        journal = self.journal()
        if journal.pending is not None and journal.pending.slot == booted:
            raise UpdateRejected(
                f"slot {booted} (version {journal.pending.version}) is booted but not yet "
                "committed; run `updater health-check` or `updater mark-good` first"
            )
        guard = install.SlotGuard(self.targets[booted].values())
        repo = self.repository(source)
        # Everything that can be known before a byte is written is checked by now: the
        # GPT (read for `self.targets`), the release's signatures and the plan.
        found = self.find_update(repo, journal, want_version=version, force=force)
        if found is None:
            log.info("no update: slot %s runs the newest release for this node", booted)
            return InstallResult(version=None)
        chosen = found.release

        log.info("installing %s into slot %s", chosen.version, inactive)
        images: dict[str, dict[str, Any]] = {}
        reused = self._holds(inactive, chosen)
        if reused:
            log.info(
                "slot %s already holds verified %s; not writing it again", inactive, chosen.version
            )
        else:
            # Invalidate before a single byte is written (Bottlerocket's and RAUC's order).
            self.boot.set_state(inactive, False)
            self._save(self.journal().with_invalidated(inactive))
            failpoint("invalidated")
            for write in found.writes:
                role, image, target = write.role, write.image, write.target
                stream = repo.stream_target(image.target, retries=self.config.repository.retries)
                result = install.write_image(
                    stream,
                    target,
                    compression=image.compression,
                    raw_length=image.raw_length,
                    raw_sha256=image.raw_sha256,
                    guard=guard,
                    progress=_for_role(progress, role),
                )
                images[role] = {
                    "partition": target.label,
                    "bytes": result.bytes_written,
                    "seconds": round(result.seconds, 3),
                }
                failpoint(f"written:{role}")
            self._save(self.journal().with_installed(inactive, chosen.version))
            failpoint("recorded")
        if not activate:
            return InstallResult(chosen.version, inactive, images=images, reused=reused)
        self.activate(inactive, reboot=reboot)
        return InstallResult(
            chosen.version, inactive, activated=True, rebooting=reboot, reused=reused, images=images
        )

    def _holds(self, slot: str, chosen: release.Release) -> bool:
        """Whether `slot` already holds every image of `chosen`, verified by reading it back."""
        if self.journal().version_in(slot) != chosen.version:
            return False
        try:
            for role, image in chosen.images.items():
                install.read_back_verify(
                    self.targets[slot][role], image.raw_length, image.raw_sha256
                )
        except UpdaterError as e:
            log.warning("slot %s no longer verifies (%s); writing it again", slot, e)
            return False
        return True

    # --- bootloader commands -------------------------------------------------------

    @changes_node
    def activate(self, slot: str, *, reboot: bool = False) -> None:
        """Boot `slot` next with one try; the journal remembers it is pending. With
        `reboot`, then run the pre_reboot hook and reboot (under the same lock)."""
        if slot not in SLOTS:
            raise ConfigError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        journal = self.journal()
        if slot == self.booted:
            # Back to the running slot: cancel whatever was pending, keep it committed.
            self.boot.set_primary(slot)
            self.boot.set_state(slot, True)
            self._save(journal.committed())
        else:
            self._make_pending(slot, journal)
        if reboot:
            self.reboot()

    def _make_pending(self, slot: str, journal: Journal) -> None:
        """Make the not booted `slot` primary with one try, if it holds a verified image."""
        version = journal.version_in(slot)
        if version is None:
            raise UpdateRejected(
                f"slot {slot} holds no verified image according to the journal; "
                "install into it first"
            )
        self.boot.set_primary(slot)
        failpoint("activated")
        self._save(journal.with_pending(slot, version))
        failpoint("pending")
        log.info("slot %s (%s) will be booted next, with one try", slot, version)

    @changes_node
    def rollback(self, *, reboot: bool = False) -> str:
        """Make the other slot primary again, as a committed (known good) slot; with
        `reboot`, then reboot into it."""
        target = other(self.booted)
        if self.boot.get_state(target) is not SlotState.GOOD:
            raise UpdateRejected(
                f"cannot roll back to slot {target}: its state is "
                f"{self.boot.get_state(target).value}"
            )
        self.boot.set_primary(target)
        self.boot.set_state(target, True)
        self._save(self.journal().committed())
        if reboot:
            self.reboot()
        return target

    @changes_node
    def mark_good(self) -> str:
        slot = self.booted
        self.boot.set_state(slot, True)
        journal = self.journal()
        if journal.pending is not None and journal.pending.slot == slot:
            journal = journal.committed()
        self._save(journal)
        return slot

    @changes_node
    def mark_bad(self, slot: str | None = None, *, force: bool = False) -> str:
        slot = slot or self.booted
        if slot not in SLOTS:
            raise ConfigError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        if not force and self.boot.get_state(other(slot)) is not SlotState.GOOD:
            raise UpdateRejected(
                f"refusing to mark slot {slot} bad: slot {other(slot)} is not good, so no slot "
                "would boot (use --force to do it anyway)"
            )
        self.boot.set_state(slot, False)
        journal = self.journal()
        if journal.pending is not None and journal.pending.slot == slot:
            journal = journal.with_failed(journal.pending.version, f"marked bad by hand in {slot}")
        self._save(journal)
        return slot

    @changes_node
    def reboot(self) -> None:
        hooks = self.config.hooks
        run_hook("pre_reboot", hooks.pre_reboot, hooks.timeout)
        failpoint("pre-reboot")
        log.info("rebooting: %s", " ".join(hooks.reboot))
        run_hook("reboot", hooks.reboot, hooks.timeout)

    # --- after every boot ----------------------------------------------------------

    @changes_node
    def health_check(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        reboot: bool = True,
    ) -> HealthOutcome:
        booted = self.booted
        journal = self.journal()
        pending = journal.pending
        if pending is not None and pending.slot != booted:
            if self.boot.get_primary() == pending.slot:
                return HealthOutcome(
                    "waiting-for-reboot",
                    booted,
                    journal.version_in(booted),
                    f"slot {pending.slot} ({pending.version}) boots next",
                )
            # The bootloader tried the pending slot and fell back to this one.
            reason = f"slot {pending.slot} did not come up; the bootloader fell back to {booted}"
            log.error("%s: %s recorded as failed", reason, pending.version)
            self.boot.set_state(pending.slot, False)
            failpoint("fell-back-marked")
            self._save(journal.with_failed(pending.version, reason))
            if self.boot.get_state(booted) is not SlotState.GOOD:
                self.boot.set_state(booted, True)
            return HealthOutcome("fell-back", booted, journal.version_in(booted), reason)

        tentative = pending is not None or self.boot.get_state(booted) is not SlotState.GOOD
        version = pending.version if pending is not None else self.installed_version(journal)
        if not tentative:
            return HealthOutcome("nothing", booted, version, f"slot {booted} is committed")

        result = health.run_health_checks(self.config.health, clock=clock, sleep=sleep)
        failpoint("checked")
        if result.passed:
            self.boot.set_state(booted, True)
            failpoint("committed")
            self._save(self.journal().with_good(version))
            log.info("slot %s (%s) passed its health checks: committed", booted, version)
            run_hook("post_commit", self.config.hooks.post_commit, self.config.hooks.timeout)
            return HealthOutcome("committed", booted, version, result.summary())

        fallback = other(booted)
        if self.boot.get_state(fallback) is not SlotState.GOOD:
            # Rolling back to a slot that is not good would strand the node: stay here.
            self.boot.set_state(booted, True)
            self._save(
                self.journal().committed().with_check(f"health checks failed: {result.summary()}")
            )
            raise NoFallback(
                f"slot {booted} failed its health checks ({result.summary()}) but slot "
                f"{fallback} is not good; staying on {booted}"
            )
        reason = f"health checks failed in slot {booted}: {result.summary()}"
        log.error("%s; rolling back to slot %s", reason, fallback)
        self.boot.set_state(booted, False)
        failpoint("rollback-marked")
        self.boot.set_primary(fallback)
        self.boot.set_state(fallback, True)
        if version is not None:
            self._save(self.journal().with_failed(version, reason))
        else:
            self._save(self.journal().committed())
        if reboot:
            self.reboot()
        return HealthOutcome("rolled-back", booted, version, reason, rebooting=reboot)

    # --- daemon --------------------------------------------------------------------

    def daemon(
        self,
        *,
        once: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """Poll for updates forever (interval + random jitter); install and reboot.

        Each cycle holds the lock (a busy lock skips the cycle, or waits with `wait`);
        the sleep between cycles does not, so commands run by hand get their turn."""
        rng = rng or random.Random()
        while True:
            self.forget_disk()  # each cycle reads (and so checks) the disk's GPT again
            try:
                with self.lock.hold(wait=self.wait):
                    self._cycle()
            except LockBusy as e:
                log.warning("skipping this check: %s", e)
            except UpdaterError as e:
                log.error("update check failed: %s", e)
            if once:
                return
            delay = self.config.daemon.interval + rng.uniform(0, self.config.daemon.jitter)
            log.info("next check in %.0f s", delay)
            sleep(delay)

    def _cycle(self) -> None:
        journal = self.journal()
        if journal.pending is not None and journal.pending.slot == self.booted:
            log.info("slot %s not yet committed; skipping this check", self.booted)
            return
        result = self.install()
        if result.version is not None:
            log.info("installed %s into slot %s", result.version, result.slot)


def _for_role(progress: Progress | None, role: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress

    def per_role(done: int, total: int) -> None:
        report(role, done, total)

    return per_role


def _session(config: Config) -> requests.Session:
    """The one HTTP session for metadata and images: proxies and TLS set once."""
    session = requests.Session()
    repo = config.repository
    if repo.proxy:
        session.proxies = {"http": repo.proxy, "https": repo.proxy}
    if repo.ca_bundle is not None:
        session.verify = str(repo.ca_bundle)
    return session
