"""The fleet layer of one node: may it install this release now, may it reboot now?

A node of a fleet does not go on when it could, but when the fleet lets it
(docs/fleet.md). Three gates, in the order the agent meets them:

1. the **wave** - before a byte is downloaded: the release's signed rollout plan
   (`core.release.RolloutPlan`) and this node's stable position in the fleet
   (`updater.rollout.position`: its machine id and the release) say whether its wave
   has started; a paused plan holds every node that does not have the release yet;
2. the **maintenance window** - before the new slot is activated: downloads and writes
   happen at any time, the switch to the new slot (and so the reboot) only inside one
   of `[daemon] windows`;
3. the **reboot lock** - last, so that no node holds a slot of its group's semaphore
   while it waits for a window: an etcd member first checks that the cluster keeps its
   quorum without it, then the node takes a slot of `[coordination] group`'s semaphore
   (`updater.coordination`); it is released only after `health-check` has committed
   the new slot, or the node is back on a healthy old one.

Each gate answers `None` (go on) or a `Hold`: why, one line, and until when if that is
known. The agent records the first hold in the journal (`Journal.waiting`), `check`
reports it, the metrics show it.

Invariants:
* no reboot into a new slot without the lock when coordination is configured: a
  backend that cannot be reached is a `Hold("lock", ...)`, never a go;
* `--version` (an operator's explicit choice) passes the wave gate, never the
  window or the lock;
* the machine id is read only when a gate needs it (a release with a rollout plan,
  or a reboot lock without `node_id`), so a node outside a fleet needs none;
* the reboot lock is built once per `Fleet` and only when a gate or a release uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from updater.config import Config

if TYPE_CHECKING:
    from core.release import Release
    from updater.coordination.base import RebootLock
    from updater.windows import Windows

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Hold:
    """Why a node does not go on now: `reason` is wave, paused, withdrawn, window,
    quorum or lock; `detail` one line; `until` when it may, if that is known."""

    reason: str
    detail: str
    until: datetime | None = None
    unanswered: bool = False  # the backend did not answer: the outcome is not known

    def line(self) -> str:
        return f"{self.reason}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "detail": self.detail,
            "until": None if self.until is None else _iso(self.until),
        }


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Fleet:
    """The gates of one node's configuration; cheap to build, reads lazily."""

    def __init__(self, config: Config, *, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self._machine_id: str | None = None
        self._windows: Windows | None = None
        self._lock: RebootLock | None = None

    # --- identity --------------------------------------------------------------------

    @property
    def machine_id(self) -> str:
        if self._machine_id is None:
            from updater.rollout import read_machine_id

            self._machine_id = read_machine_id(self.config.device.machine_id)
        return self._machine_id

    @property
    def node_id(self) -> str:
        """The name this node holds the reboot lock under."""
        return self.config.coordination.node_id or self.machine_id

    @property
    def coordinated(self) -> bool:
        return self.config.coordination.backend != "none"

    @property
    def group(self) -> str:
        return self.config.coordination.group

    @property
    def lock(self) -> RebootLock:
        if self._lock is None:
            from updater.coordination import make_lock

            lock = make_lock(self.config.coordination, self.node_id)
            assert lock is not None  # callers check `coordinated` first
            self._lock = lock
        return self._lock

    # --- gate 1: the wave ----------------------------------------------------------

    def wave(self, release: Release) -> Hold | None:
        """Whether this node's wave of `release` has started (None: install it)."""
        plan = release.rollout
        if plan is None:
            return None
        from updater.rollout import gate, position

        where = position(self.machine_id, self.config.device.hardware, release.version)
        waiting = gate(plan, where, self.clock())
        if waiting is None:
            return None
        return Hold(waiting.reason, f"{release.version}: {waiting.detail}", waiting.until)

    # --- gate 2: the maintenance window --------------------------------------------

    def window(self) -> Hold | None:
        daemon = self.config.daemon
        if not daemon.windows:
            return None
        if self._windows is None:
            from updater.windows import parse_windows

            self._windows = parse_windows(daemon.windows, daemon.timezone)
        now = self.clock()
        if self._windows.is_open(now):
            return None
        opens = self._windows.next_open(now)
        when = "never" if opens is None else _iso(opens)
        spec = ", ".join(daemon.windows)
        return Hold("window", f"outside the maintenance windows ({spec}); next opens {when}", opens)

    # --- gate 3: quorum and the reboot lock ----------------------------------------

    def quorum(self) -> Hold | None:
        member = self.config.coordination.etcd_member
        if member is None or not self.coordinated:
            return None
        from updater.coordination import CoordinationUnavailable

        try:
            why = self.lock.quorum_without(member)
        except CoordinationUnavailable as e:
            return Hold("quorum", f"cannot check etcd quorum: {e}")
        return None if why is None else Hold("quorum", why)

    def take_lock(self) -> Hold | None:
        """Take a slot of the group's semaphore (idempotent for a holder); None: held."""
        if not self.coordinated:
            return None
        from updater.coordination import CoordinationUnavailable

        try:
            if self.lock.acquire(self.node_id):
                return None
            holders = self.lock.holders()
        except CoordinationUnavailable as e:
            return Hold("lock", f"no reboot without the lock: {e}", unanswered=True)
        limit = self.config.coordination.max_concurrent
        shown = ", ".join(holders[:5]) + (", ..." if len(holders) > 5 else "")
        return Hold(
            "lock",
            f"group {self.group} is full: {len(holders)} of {limit} reboot slots held ({shown})",
        )

    def peek_lock(self) -> Hold | None:
        """What `take_lock` would answer, without taking anything (for `check`)."""
        if not self.coordinated:
            return None
        from updater.coordination import CoordinationUnavailable

        try:
            holders = self.lock.holders()
        except CoordinationUnavailable as e:
            return Hold("lock", f"no reboot without the lock: {e}")
        limit = self.config.coordination.max_concurrent
        if self.node_id in holders or len(holders) < limit:
            return None
        return Hold("lock", f"group {self.group} is full: {len(holders)} of {limit} held")

    def may_reboot(self, *, take: bool = True) -> Hold | None:
        """The window, then quorum, then the lock (taken when `take`): None means go."""
        return self.window() or self.quorum() or (self.take_lock() if take else self.peek_lock())

    def release_lock(self, group: str | None = None) -> bool:
        """Give the slot of `group` back (the journal's record: the group the node took
        it in, even if the config names another one since); True if done (or nothing was
        held), False if the backend could not be reached (the journal keeps `lock_held`
        and the daemon retries)."""
        if not self.coordinated:
            return True
        from updater.coordination import CoordinationUnavailable, make_lock

        group = group or self.group
        lock = self.lock
        if group != self.group:
            settings = dataclasses.replace(self.config.coordination, group=group)
            other = make_lock(settings, self.node_id)
            assert other is not None  # coordinated
            lock = other
        try:
            released = lock.release(self.node_id)
        except CoordinationUnavailable as e:
            log.warning("reboot lock of group %s not released yet: %s", group, e)
            return False
        if released:
            log.info("released the reboot lock of group %s", group)
        return True
