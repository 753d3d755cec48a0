"""The agent's decisions, as pure functions of values: what a command does to the
journal and the bootloader state, or why it refuses.

As `updater.select.select`, and python-tuf's `TrustedMetadataSet` beside its `Updater`: each
function takes the journal, the loaded boot state (`updater.boot.base.BootState`), the
booted slot and - for the health check - the checks' result, and returns a `Step` (the
new boot state and the new journal) or raises the error the user sees. `updater.agent`
loads both values once per command, calls one of these, and carries the step out: the
boot state first (one write), then the journal, then hooks or the reboot - the order
that keeps a node bootable through a power cut at any point (DESIGN.md).

The health check after a boot ends in one of six outcomes (`HealthAction`):

| journal | boot state | checks | outcome |
| --- | --- | --- | --- |
| pending in the other slot | the pending slot is primary | - | waiting-for-reboot |
| pending in the other slot | it is not | - | fell-back: it is invalidated, booted committed |
| nothing pending | booted GOOD | - | nothing |
| pending here, or booted not GOOD | | pass | committed |
| pending here, or booted not GOOD | other slot GOOD | fail | rolled-back to the other slot |
| pending here, or booted not GOOD | other slot not GOOD | fail | no-fallback: booted committed |

Invariants: nothing here does I/O or reads the clock (`now` is passed to the journal
transitions; None means "now" there); a decision never makes a slot primary unless the
journal records a verified image in it (or it is the booted slot, or a GOOD one); a
failed health check never rolls back to a slot that is not GOOD.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, overload

from core.errors import ConfigError, UpdateRejected
from updater.boot.base import BootState, SlotState
from updater.health import HealthResult
from updater.slots import SLOTS, other
from updater.state import Journal


class NotCommitted(UpdateRejected):
    """The booted slot is a pending update that is not committed yet: no install."""


@dataclass(frozen=True)
class Step:
    """What a command writes: `boot` (nothing if unchanged since it was loaded), then
    `journal` - unless `save` is False (a step that only looked)."""

    boot: BootState
    journal: Journal
    save: bool = True


def _check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise ConfigError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")


# --- install, activate, rollback, mark-good, mark-bad -----------------------------------


def check_can_install(journal: Journal, booted: str) -> None:
    """Refuse an install while the booted slot waits for its health check: the other
    slot, about to be overwritten, is its only fallback."""
    pending = journal.pending
    if pending is not None and pending.slot == booted:
        raise NotCommitted(
            f"slot {booted} (version {pending.version}) is booted but not yet "
            "committed; run `updater health-check` or `updater mark-good` first"
        )


def before_writing(journal: Journal, boot: BootState, slot: str) -> Step:
    """`slot` is about to be overwritten: it will not boot, and holds nothing verified
    (so a crash mid-write leaves nothing to activate)."""
    return Step(boot.invalidate(slot), journal.with_invalidated(slot))


def activate(
    journal: Journal, boot: BootState, booted: str, slot: str, now: datetime | None = None
) -> Step:
    """Boot `slot` next with one try, pending in the journal; the booted slot instead
    cancels whatever was pending and stays committed."""
    _check_slot(slot)
    if slot == booted:
        return Step(boot.try_next(slot).commit(slot), journal.committed())
    version = journal.version_in(slot)
    if version is None:
        raise UpdateRejected(
            f"slot {slot} holds no verified image according to the journal; install into it first"
        )
    trial = boot.try_next(slot)
    if trial.primary() != slot:
        # Never record a pending slot the bootloader would not boot: systemd-boot, say,
        # orders UKIs by version and cannot try an older one while a newer is good.
        raise UpdateRejected(
            f"slot {slot} ({version}) would not be booted next: the bootloader's own order "
            f"puts {_slot_or_none(trial.primary())} first; nothing was changed"
        )
    return Step(trial, journal.with_pending(slot, version, now))


def _slot_or_none(slot: str | None) -> str:
    return "no slot" if slot is None else f"slot {slot}"


def rollback(journal: Journal, boot: BootState, booted: str) -> tuple[str, Step]:
    """The other slot primary again, committed - only if it is GOOD."""
    target = other(booted)
    state = boot.state(target)
    if state is not SlotState.GOOD:
        raise UpdateRejected(f"cannot roll back to slot {target}: its state is {state.value}")
    return target, Step(boot.try_next(target).commit(target), journal.committed())


def mark_good(journal: Journal, boot: BootState, booted: str) -> Step:
    """Commit the booted slot (and its pending update)."""
    pending = journal.pending
    done = journal.committed() if pending is not None and pending.slot == booted else journal
    return Step(boot.commit(booted), done)


def mark_bad(
    journal: Journal,
    boot: BootState,
    slot: str,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Step:
    """Invalidate `slot` - unless the other is not GOOD (no slot would boot) and not
    `force`; a pending version in it is recorded as failed."""
    _check_slot(slot)
    if not force and boot.state(other(slot)) is not SlotState.GOOD:
        raise UpdateRejected(
            f"refusing to mark slot {slot} bad: slot {other(slot)} is not good, so no slot "
            "would boot (use --force to do it anyway)"
        )
    pending = journal.pending
    if pending is not None and pending.slot == slot:
        journal = journal.with_failed(pending.version, f"marked bad by hand in {slot}", now)
    return Step(boot.invalidate(slot), journal)


# --- the health check after every boot ---------------------------------------------------


class HealthAction(enum.StrEnum):
    NOTHING = "nothing"
    WAITING_FOR_REBOOT = "waiting-for-reboot"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    FELL_BACK = "fell-back"
    NO_FALLBACK = "no-fallback"


FAILED = frozenset({HealthAction.ROLLED_BACK, HealthAction.FELL_BACK, HealthAction.NO_FALLBACK})


@dataclass(frozen=True)
class HealthOutcome:
    action: HealthAction
    slot: str  # the booted slot
    version: str | None
    detail: str = ""
    rebooting: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "slot": self.slot,
            "version": self.version,
            "detail": self.detail,
            "rebooting": self.rebooting,
        }


@dataclass(frozen=True)
class HealthDecision:
    """The outcome, the step to write, and what follows it: the post_commit hook, a
    reboot, and for a failed slot the one-line `error` (SlotFailed) to raise last."""

    outcome: HealthOutcome
    step: Step
    post_commit: bool = False
    reboot: bool = False
    error: str | None = None


def _line(action: HealthAction, booted: str, detail: str) -> str:
    """A failed slot's one line, shaped as every outcome's text is: `<action>: slot <X>.`"""
    return f"{action}: slot {booted}. {detail}"


@overload
def after_boot(
    journal: Journal,
    boot: BootState,
    booted: str,
    installed: str | None,
    health: HealthResult,
    *,
    reboot: bool = True,
    now: datetime | None = None,
) -> HealthDecision: ...


@overload
def after_boot(
    journal: Journal,
    boot: BootState,
    booted: str,
    installed: str | None,
    health: None,
    *,
    reboot: bool = True,
    now: datetime | None = None,
) -> HealthDecision | None: ...


def after_boot(
    journal: Journal,
    boot: BootState,
    booted: str,
    installed: str | None,
    health: HealthResult | None,
    *,
    reboot: bool = True,
    now: datetime | None = None,
) -> HealthDecision | None:
    """The health check's decision (see the table in the module docstring). `installed`
    is the booted slot's version (the journal's, else the image's os-release); `health`
    the checks' result, or None if they have not run: then None means "run them first".
    `reboot`: a rollback reboots into the other slot."""
    pending = journal.pending
    if pending is not None and pending.slot != booted:
        version = journal.version_in(booted)
        if boot.primary() == pending.slot:
            detail = f"slot {pending.slot} ({pending.version}) boots next"
            waiting = HealthOutcome(HealthAction.WAITING_FOR_REBOOT, booted, version, detail)
            return HealthDecision(waiting, Step(boot, journal, save=False))
        # The bootloader tried the pending slot and fell back to this one.
        reason = f"slot {pending.slot} did not come up; the bootloader fell back to {booted}"
        marked = boot.invalidate(pending.slot)
        if marked.state(booted) is not SlotState.GOOD:
            marked = marked.commit(booted)
        return HealthDecision(
            HealthOutcome(HealthAction.FELL_BACK, booted, version, reason),
            Step(marked, journal.with_failed(pending.version, reason, now)),
            error=_line(
                HealthAction.FELL_BACK,
                booted,
                f"{reason}; {pending.version} is recorded as failed on this node",
            ),
        )

    version = pending.version if pending is not None else installed
    if pending is None and boot.state(booted) is SlotState.GOOD:
        detail = f"slot {booted} is committed"
        return HealthDecision(
            HealthOutcome(HealthAction.NOTHING, booted, version, detail),
            Step(boot, journal, save=False),
        )
    if health is None:
        return None  # tentative: only the checks can decide
    summary = health.summary()
    if health.passed:
        return HealthDecision(
            HealthOutcome(HealthAction.COMMITTED, booted, version, summary),
            Step(
                boot.commit(booted),
                journal.with_good(version).with_commit_record(booted, version, now),
            ),
            post_commit=True,
        )
    fallback = other(booted)
    if boot.state(fallback) is not SlotState.GOOD:
        # Rolling back to a slot that is not good would strand the node: stay here.
        detail = (
            f"slot {booted} failed its health checks ({summary}) but slot "
            f"{fallback} is not good; staying on {booted}"
        )
        stay = journal.committed().with_check(f"health checks failed: {summary}", now)
        return HealthDecision(
            HealthOutcome(HealthAction.NO_FALLBACK, booted, version, detail),
            Step(boot.commit(booted), stay),
            error=_line(HealthAction.NO_FALLBACK, booted, detail),
        )
    reason = f"health checks failed in slot {booted}: {summary}"
    # A version that failed is never installed again (an unknown one: nothing to record).
    back = journal.committed() if version is None else journal.with_failed(version, reason, now)
    return HealthDecision(
        HealthOutcome(HealthAction.ROLLED_BACK, booted, version, reason, rebooting=reboot),
        Step(boot.fall_back(booted), back),
        reboot=reboot,
        error=_line(
            HealthAction.ROLLED_BACK,
            booted,
            f"{reason}; rolling back to slot {fallback}" + ("; rebooting" if reboot else ""),
        ),
    )
