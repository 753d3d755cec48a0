"""Orchestration of an update on one node: check, install, activate, reboot, verify.

This is the only module that combines the others (on top of `updater.node`, the node
as it is); each step below is one call into a module that does one thing. The order is
DESIGN.md's, the one that keeps a node bootable through a power cut at any point:

    install:  refresh TUF -> select release -> plan -> invalidate the inactive slot
              (one bootloader write) -> stream every image into its partition, read
              back, verify -> journal "slot holds version" -> inactive primary with
              one try (one bootloader write) -> journal "pending" -> pre_reboot hook
              -> reboot command
    health-check (every boot):
              booted == pending (or booted not yet committed) -> checks -> commit, or
              fall back (one write) + reboot; booted != pending and the bootloader
              already gave up on it -> record the version as failed, mark it bad.

The agent decides nothing itself: every command loads the journal and the boot state
once (under the lock), asks `updater.decide` (pure functions of those values) what to
do, and carries the answer out - the boot state first (one write), then the journal,
then hooks and the reboot. A failed slot (rolled-back, fell-back, no-fallback) is
`core.errors.SlotFailed`, raised after all of that is done.

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
  without one, ...) is refused by `plan_writes` before the inactive slot is touched;
* `status` and `health-check` import no network, TUF or decompression code: those
  modules are imported by the methods that use them (fast start on every boot).

`UPDATER_FAILPOINT=<step>` makes the process die abruptly (`os._exit`) when it reaches
that step - fault injection for the crash/restart tests, inert otherwise.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, SlotFailed, UpdaterError
from updater import decide, health
from updater.boot.base import BootState, SlotState
from updater.config import Config
from updater.decide import HealthAction, HealthOutcome, Step
from updater.fleet import Clock, Hold, utc_now
from updater.fleetnode import FleetNode
from updater.hooks import run_hook
from updater.lock import LockBusy
from updater.node import changes_node
from updater.slots import FileTarget, PartitionTarget, other
from updater.state import Journal

if TYPE_CHECKING:
    import requests

    from core.release import Release
    from core.repository import Repository
    from updater.plan import Plan

__all__ = ["Agent", "HealthOutcome", "InstallResult", "Progress", "failpoint"]

log = logging.getLogger(__name__)

FAILPOINT_ENV = "UPDATER_FAILPOINT"
FAILPOINT_EXIT = 137
Progress = Callable[[str, int, int], None]  # (role, done raw bytes, raw length)

# Health outcomes after which a node on a committed slot may give its reboot slot back
# (rolled-back and no-fallback keep it: the node reboots, or runs a failed release).
_RELEASES = frozenset({HealthAction.COMMITTED, HealthAction.NOTHING, HealthAction.FELL_BACK})

# The failpoint between a health check's bootloader write and its journal save.
_MARKED = {
    HealthAction.COMMITTED: "committed",
    HealthAction.ROLLED_BACK: "rollback-marked",
    HealthAction.FELL_BACK: "fell-back-marked",
}


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
    waiting: Hold | None = None  # why it stopped short: wave, window, lock (updater.fleet)

    def to_json(self) -> dict[str, Any]:
        return {
            "installed": self.version is not None,
            "version": self.version,
            "slot": self.slot,
            "activated": self.activated,
            "rebooting": self.rebooting,
            "reused": self.reused,
            "images": self.images,
            "bytes_fetched": sum(int(i.get("fetched", 0)) for i in self.images.values()),
            "bytes_reused": _reused_by_slot(self.images.values()),
            "waiting": None if self.waiting is None else self.waiting.to_json(),
        }


class Agent(FleetNode):
    """The node agent for one configuration. Cheap to build; touches disks lazily.

    `wait`: when another process holds the state directory's lock, a method that changes
    the node waits for it instead of raising `LockBusy` at once.
    """

    def __init__(
        self,
        config: Config,
        *,
        session: requests.Session | None = None,
        wait: bool = False,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(config, wait=wait, clock=clock)
        self._session = session

    @property
    def session(self) -> requests.Session:
        """The one HTTP session for metadata and images, made on first use."""
        if self._session is None:
            self._session = _session(self.config)
        return self._session

    def repository(self, source: Path | None = None) -> Repository:
        """The TUF repository of the config, or a mounted medium (`install --from`)."""
        from core.repository import Repository  # tuf and requests: not for status/health

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

    def _find_update(
        self,
        repo: Repository,
        journal: Journal,
        *,
        want_version: str | None = None,
        force: bool = False,
    ) -> Plan | None:
        """Refresh `repo`, select the release for this node and plan its writes into
        the inactive slot (a release that can never be installed is refused here)."""
        # Here, not at the top: tuf's metadata classes are not for status/health-check.
        from updater.plan import plan_writes
        from updater.select import select

        repo.refresh()
        chosen = select(
            repo.targets(),
            hardware=self.config.device.hardware,
            channel=self.config.device.channel,
            installed_version=self.installed_version(journal),
            failed_versions=list(journal.failed_versions),
            want_version=want_version,
            force=force,
        )
        if chosen is None:
            return None
        return plan_writes(chosen, self.slot_targets[other(self.booted)], self.config.roles)

    def check(self, source: Path | None = None) -> dict[str, Any]:
        """Whether a newer release is available. Read-only: the outcome is recorded
        only if the lock is free (see `Node._record_check`)."""
        journal = self.journal()
        repo = self.repository(source)
        try:
            found = self._find_update(repo, journal)
        except UpdaterError as e:
            self._record_check(str(e))
            raise
        self._record_check(None)
        chosen = found.release if found else None
        hold = None
        if chosen is not None:
            hold = self.fleet.wave(chosen) or self.fleet.may_reboot(take=False)
        self.write_metrics()
        return {
            "update_available": chosen is not None,
            "waiting": None if hold is None else hold.to_json(),
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
        full: bool = False,
    ) -> InstallResult:
        try:
            return self._install(
                self.journal(),
                version=version,
                force=force,
                activate=activate,
                reboot=reboot,
                source=source,
                progress=progress,
                full=full,
            )
        finally:
            self.write_metrics()

    def _install(
        self,
        journal: Journal,
        *,
        version: str | None = None,
        force: bool = False,
        activate: bool = True,
        reboot: bool = True,
        source: Path | None = None,
        progress: Progress | None = None,
        full: bool = False,
    ) -> InstallResult:
        # decompression (zstandard): not for status/health
        from updater import delta, fileimage, install

        booted = self.booted
        inactive = other(booted)
        decide.check_can_install(journal, booted)
        guard = install.SlotGuard(self.targets[booted].values())
        booted_files = [t for t in self.slot_targets[booted].values() if isinstance(t, FileTarget)]
        file_guard = fileimage.FileGuard(booted, booted_files)
        boot = self.boot.load()
        repo = self.repository(source)
        # Everything that can be known before a byte is written is checked by now: the
        # GPT (read for `self.targets`), the bootloader state, the release's signatures
        # and the plan. The lock is held: the check's outcome goes into this journal.
        try:
            found = self._find_update(repo, journal, want_version=version, force=force)
        except UpdaterError as e:
            self._save(journal.with_check(str(e)))
            raise
        journal = journal.with_check(None).with_waiting(None)
        self._save(journal)
        if found is None:
            log.info("no update: slot %s runs the newest release for this node", booted)
            return InstallResult(version=None)
        chosen = found.release
        # The wave: an operator's explicit --version is a choice that passes it.
        hold = self.fleet.wave(chosen) if version is None else None
        if hold is None and activate and journal.version_in(inactive) == chosen.version:
            # Written already and waiting for a window, quorum or a free reboot slot:
            # asked without taking anything, so that a node of a full group does not
            # read its slot back at every cycle (a GiB of reads per poll).
            hold = self.fleet.may_reboot(take=False)
        if hold is not None:
            return self._hold(journal, hold)

        images: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        reused = self._holds(journal, inactive, chosen)
        if reused:
            log.info(
                "slot %s already holds verified %s; not writing it again", inactive, chosen.version
            )
        else:
            log.info("installing %s into slot %s", chosen.version, inactive)
            # Invalidate before a single byte is written (Bottlerocket's and RAUC's order).
            step = decide.before_writing(journal, boot, inactive)
            boot, journal = self._carry_out(step, between="invalidated")
            for write in found.writes:
                role, image, target = write.role, write.image, write.target
                retries = self.config.repository.retries
                reused_from: dict[str, int] = {}
                if isinstance(target, FileTarget):
                    written = fileimage.write_file_image(
                        repo.stream_target(image.target, retries=retries),
                        target,
                        compression=image.compression,
                        raw_length=image.raw_length,
                        raw_sha256=image.raw_sha256,
                        guard=file_guard,
                        progress=_for_role(progress, role),
                    )
                    fetched, done, seconds = (
                        image.target.length,
                        written.bytes_written,
                        written.seconds,
                    )
                else:
                    # By delta when the release and the slots have chunk indexes
                    # (docs/delta.md), else the whole stream; read back either way.
                    booted_target = self.slot_targets[booted].get(role)
                    if not isinstance(booted_target, PartitionTarget):
                        booted_target = None
                    result = delta.install_partition(
                        repo,
                        image,
                        target,
                        guard=guard,
                        index_dir=self.state_dir / "index",
                        booted=booted_target,
                        full=full,
                        retries=retries,
                        progress=_for_role(progress, role),
                    )
                    fetched, reused_from = result.fetched, result.reused
                    done, seconds = result.bytes_written, result.seconds
                images[role] = {
                    "partition": target.label,  # a PARTLABEL, or file:PATH
                    "bytes": done,
                    "fetched": fetched,
                    "reused": reused_from,
                    "seconds": round(seconds, 3),
                }
                failpoint(f"written:{role}")
            if any(isinstance(w.target, FileTarget) for w in found.writes):
                # A file on the ESP may be a boot entry (a UKI) that the write just
                # created: the boot state is what is on the ESP now.
                boot = self.boot.load()
            fetched = sum(int(i["fetched"]) for i in images.values())
            journal = journal.with_installed(inactive, chosen.version).with_install_record(
                inactive,
                chosen.version,
                fetched,
                time.monotonic() - started,
                reused=_reused_by_slot(images.values()),
            )
            self._save(journal)
            failpoint("recorded")
        if not activate:
            return InstallResult(chosen.version, inactive, images=images, reused=reused)
        # The window, quorum, then the reboot lock, taken last. Write-ahead: the journal
        # says the node holds a slot before it asks for one, so no crash leaves a slot
        # held in etcd that the node does not know of (giving back a slot it never got
        # is harmless); a refusal clears the record again.
        hold = self.fleet.may_reboot(take=False)
        if hold is None and self.fleet.coordinated:
            self._save(journal.with_lock(self.fleet.group))
            failpoint("lock-intent")
            hold = self.fleet.take_lock()
        if hold is not None:
            if self.fleet.coordinated:
                # Refused: the record before the intent - unless etcd did not answer,
                # when the request may have been applied (kept; giving back is harmless).
                held = self.fleet.group if hold.unanswered else journal.lock_held
                journal = journal.with_lock(held).with_waiting(hold.line())
                log.info("waiting: %s", hold.line())
                self._save(journal)
            else:
                self._hold(journal, hold)
            return InstallResult(
                chosen.version, inactive, images=images, reused=reused, waiting=hold
            )
        if self.fleet.coordinated or journal.waiting is not None:
            journal = journal.with_waiting(None)
            if self.fleet.coordinated:
                journal = journal.with_lock(self.fleet.group)
                log.info("took a reboot slot of group %s", self.fleet.group)
            self._save(journal)
        failpoint("locked")
        self._activate(journal, boot, booted, inactive, reboot=reboot)
        return InstallResult(
            chosen.version, inactive, activated=True, rebooting=reboot, reused=reused, images=images
        )

    def _hold(self, journal: Journal, hold: Hold) -> InstallResult:
        """Stop short of installing or rebooting, and say why (journal, log)."""
        log.info("waiting: %s", hold.line())
        if journal.waiting != hold.line():
            self._save(journal.with_waiting(hold.line()))
        return InstallResult(version=None, waiting=hold)

    def _holds(self, journal: Journal, slot: str, chosen: Release) -> bool:
        """Whether `slot` already holds every image of `chosen`, verified by reading it back."""
        from updater import fileimage, install

        if journal.version_in(slot) != chosen.version:
            return False
        try:
            for role, image in chosen.images.items():
                target = self.slot_targets[slot][role]
                if isinstance(target, FileTarget):
                    fileimage.read_back_verify_file(target, image.raw_length, image.raw_sha256)
                else:
                    install.read_back_verify(target, image.raw_length, image.raw_sha256)
        except UpdaterError as e:
            log.warning("slot %s no longer verifies (%s); writing it again", slot, e)
            return False
        return True

    # --- carrying a decision out -----------------------------------------------------

    def _carry_out(self, step: Step, *, between: str | None = None) -> tuple[BootState, Journal]:
        """Write `step`: the boot state (one write, or none if unchanged), the failpoint
        `between`, then the journal. Returns both values as they now are on disk."""
        boot = self.boot.write(step.boot)
        if between is not None:
            failpoint(between)
        if step.save:
            self._save(step.journal)
        return boot, step.journal

    # --- bootloader commands -------------------------------------------------------

    @changes_node
    def activate(self, slot: str, *, reboot: bool = False) -> None:
        """Boot `slot` next with one try; the journal remembers it is pending. With
        `reboot`, then run the pre_reboot hook and reboot (under the same lock)."""
        booted = self.booted  # the disk first: its errors come before the grubenv's
        self._activate(self.journal(), self.boot.load(), booted, slot, reboot=reboot)

    def _activate(
        self, journal: Journal, boot: BootState, booted: str, slot: str, *, reboot: bool
    ) -> None:
        _, journal = self._carry_out(
            decide.activate(journal, boot, booted, slot), between="activated"
        )
        failpoint("pending")
        if journal.pending is not None:
            pending = journal.pending
            log.info("slot %s (%s) will be booted next, with one try", slot, pending.version)
        if reboot:
            self.reboot()

    @changes_node
    def rollback(self, *, reboot: bool = False) -> str:
        """Make the other slot primary again, as a committed (known good) slot; with
        `reboot`, then reboot into it."""
        booted = self.booted
        target, step = decide.rollback(self.journal(), self.boot.load(), booted)
        self._carry_out(step)
        if reboot:
            self.reboot()
        return target

    @changes_node
    def mark_good(self) -> str:
        slot = self.booted
        self._carry_out(decide.mark_good(self.journal(), self.boot.load(), slot))
        return slot

    @changes_node
    def mark_bad(self, slot: str | None = None, *, force: bool = False) -> str:
        slot = slot or self.booted
        self._carry_out(decide.mark_bad(self.journal(), self.boot.load(), slot, force=force))
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
        """Commit the booted slot if it is a pending (or uncommitted) one and passes its
        checks, else fall back; see `decide.after_boot`. A failed slot is `SlotFailed`
        (details: the outcome), raised after the writes, hooks and reboot."""
        booted = self.booted
        journal = self.journal()
        boot = self.boot.load()
        installed = self.installed_version(journal)
        decision = decide.after_boot(journal, boot, booted, installed, None, reboot=reboot)
        if decision is None:
            result = health.run_health_checks(self.config.health, clock=clock, sleep=sleep)
            failpoint("checked")
            decision = decide.after_boot(journal, boot, booted, installed, result, reboot=reboot)
        outcome = decision.outcome
        if decision.error is not None and decision.reboot:
            log.error("%s", decision.error)  # said before the reboot cuts the process off
        _, journal = self._carry_out(decision.step, between=_MARKED.get(outcome.action))
        if decision.post_commit:
            log.info("slot %s (%s) passed its health checks: committed", booted, outcome.version)
            run_hook("post_commit", self.config.hooks.post_commit, self.config.hooks.timeout)
        if journal.lock_held is not None and outcome.action in _RELEASES:
            self.release_after_boot(journal, outcome, clock=clock, sleep=sleep)
        self.write_metrics()
        if decision.reboot:
            self.reboot()
        if decision.error is not None:
            raise SlotFailed(decision.error, details=outcome.to_json())
        return outcome

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
        try:
            self._cycle_once()
        finally:
            self.write_metrics()

    def _cycle_once(self) -> None:
        journal = self.journal()
        # A release that failed at boot (etcd unreachable then) is retried here, once
        # the node runs a committed slot again.
        if (
            journal.lock_held is not None
            and journal.pending is None
            and self.boot.load().state(self.booted) is SlotState.GOOD
            and self.fleet.release_lock(journal.lock_held)
        ):
            journal = journal.with_lock(None)
            self._save(journal)
        try:
            decide.check_can_install(journal, self.booted)
        except decide.NotCommitted:
            log.info("slot %s not yet committed; skipping this check", self.booted)
            return
        result = self._install(journal)
        if result.version is not None and not result.reused:
            log.info("installed %s into slot %s", result.version, result.slot)


def _reused_by_slot(images: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Raw bytes a delta install reused, per slot they were read from (docs/delta.md)."""
    total: dict[str, int] = {}
    for image in images:
        for slot, n in image.get("reused", {}).items():
            total[slot] = total.get(slot, 0) + int(n)
    return dict(sorted(total.items()))


def _for_role(progress: Progress | None, role: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress

    def per_role(done: int, total: int) -> None:
        report(role, done, total)

    return per_role


def _session(config: Config) -> requests.Session:
    """The one HTTP session for metadata and images: proxies and TLS set once."""
    import requests

    session = requests.Session()
    repo = config.repository
    if repo.proxy:
        session.proxies = {"http": repo.proxy, "https": repo.proxy}
    if repo.ca_bundle is not None:
        session.verify = str(repo.ca_bundle)
    return session
