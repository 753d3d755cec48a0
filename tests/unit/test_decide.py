"""updater.decide: every decision of the agent, as data - no disk, no process.

Each function is run on every combination of the journal (nothing pending, pending in
A, pending in B, an empty journal), the boot state of both slots (GOOD, TRYING, BAD
each, either slot first), the booted slot and - for the health check - no result yet,
a pass or a fail; for both backends' values (a grubenv's variables, a GPT built in
memory). The expectations are the table of `updater.decide`'s docstring and the
invariants every outcome keeps (checked on each of the combinations).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from core.errors import ConfigError, UpdateRejected
from updater import decide
from updater.boot.base import BootState, SlotState
from updater.boot.gptprio import GptPrioState
from updater.boot.grub import GrubState
from updater.config import HealthCheck
from updater.decide import HealthAction, HealthDecision
from updater.disk.gpt import Partition, new_gpt
from updater.health import CheckOutcome, HealthResult
from updater.slots import SLOTS, other
from updater.state import Journal

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
STATES = (SlotState.GOOD, SlotState.TRYING, SlotState.BAD)
CHECK = HealthCheck(command=("true",), http=None, timeout=1.0)
PASS = HealthResult(True, 1, 0.0, (CheckOutcome(CHECK, True, "exit 0", "", 1),))
FAIL = HealthResult(False, 3, 30.0, (CheckOutcome(CHECK, False, "exit 1", "", 3),))
OS_VERSION = "0.9.0"  # the booted image's os-release, for a journal that knows nothing


def installed(journal: Journal, booted: str) -> str:
    """What the agent passes as `installed`: the journal's record, else the image's."""
    return journal.version_in(booted) or OS_VERSION


def recorded() -> Journal:
    return Journal().with_installed("A", "1.0.0", T0).with_installed("B", "2.0.0", T0)


JOURNALS = {
    "nothing pending": recorded(),
    "pending A": recorded().with_pending("A", "1.0.0", T0),
    "pending B": recorded().with_pending("B", "2.0.0", T0),
    "empty": Journal(),
}


def grub_value(states: dict[str, SlotState], first: str) -> BootState:
    bits = {SlotState.GOOD: ("1", "0"), SlotState.TRYING: ("1", "1"), SlotState.BAD: ("0", "0")}
    env = {"ORDER": f"{first} {other(first)}"}
    for slot in SLOTS:
        env[f"{slot}_OK"], env[f"{slot}_TRY"] = bits[states[slot]]
    return GrubState.of(env)


def gptprio_value(states: dict[str, SlotState], first: str) -> BootState:
    def attributes(slot: str) -> int:
        priority = 2 if slot == first else 1
        tries, successful = {
            SlotState.GOOD: (0, 1),
            SlotState.TRYING: (1, 0),
            SlotState.BAD: (0, 0),
        }[states[slot]]
        if states[slot] is SlotState.BAD:
            priority = 0
        return (priority << 48) | (tries << 52) | (successful << 56)

    parts = [
        Partition(
            number=n,
            type_guid=uuid.UUID(int=1),
            unique_guid=uuid.UUID(int=n),
            first_lba=2048 * n,
            last_lba=2048 * n + 2047,
            attributes=attributes(s),
            name=f"root_{s.lower()}",
        )
        for n, s in ((2, "A"), (3, "B"))
    ]
    table = new_gpt(16384, disk_guid=uuid.UUID(int=7), partitions=parts)
    return GptPrioState(table, table, {"A": "root_a", "B": "root_b"})


BACKENDS = {"grub": grub_value, "gptprio": gptprio_value}


def boot_values() -> Iterator[tuple[str, BootState]]:
    for backend, make in BACKENDS.items():
        for a, b in itertools.product(STATES, STATES):
            for first in SLOTS:
                value = make({"A": a, "B": b}, first)
                assert (value.state("A"), value.state("B")) == (a, b)
                yield f"{backend} A={a.value} B={b.value} first={first}", value


BOOTS = dict(boot_values())
CASES = [
    (j, b, booted) for j in JOURNALS for b in BOOTS for booted in SLOTS
]  # 4 journals x 36 boot values x 2 booted slots


def expected_action(journal: Journal, boot: BootState, booted: str, passed: bool) -> HealthAction:
    """The table of updater.decide's docstring, row by row."""
    pending = journal.pending
    if pending is not None and pending.slot != booted:
        if boot.primary() == pending.slot:
            return HealthAction.WAITING_FOR_REBOOT
        return HealthAction.FELL_BACK
    if pending is None and boot.state(booted) is SlotState.GOOD:
        return HealthAction.NOTHING
    if passed:
        return HealthAction.COMMITTED
    if boot.state(other(booted)) is SlotState.GOOD:
        return HealthAction.ROLLED_BACK
    return HealthAction.NO_FALLBACK


NEEDS_CHECKS = {HealthAction.COMMITTED, HealthAction.ROLLED_BACK, HealthAction.NO_FALLBACK}


def decide_after_boot(
    journal: Journal, boot: BootState, booted: str, health: HealthResult, reboot: bool = True
) -> HealthDecision:
    version = installed(journal, booted)
    first = decide.after_boot(journal, boot, booted, version, None, reboot=reboot, now=T0)
    if first is not None:
        # Decided without the checks: a result would not change the decision.
        again = decide.after_boot(journal, boot, booted, version, health, reboot=reboot, now=T0)
        assert again == first
        return first
    return decide.after_boot(journal, boot, booted, version, health, reboot=reboot, now=T0)


@pytest.mark.parametrize("passed", [True, False], ids=["pass", "fail"])
@pytest.mark.parametrize(("journal_name", "boot_name", "booted"), CASES)
def test_after_boot(journal_name: str, boot_name: str, booted: str, passed: bool) -> None:
    journal, boot = JOURNALS[journal_name], BOOTS[boot_name]
    pending = journal.pending
    action = expected_action(journal, boot, booted, passed)
    unchecked = decide.after_boot(journal, boot, booted, installed(journal, booted), None, now=T0)
    assert (unchecked is None) == (action in NEEDS_CHECKS)

    decision = decide_after_boot(journal, boot, booted, PASS if passed else FAIL)
    outcome, step = decision.outcome, decision.step
    new, after = step.boot, step.journal
    assert outcome.action is action and outcome.slot == booted
    # The node always keeps a slot to boot, whatever it decides.
    assert new.primary() is not None
    # Only a failed slot is an error (SlotFailed), only a rollback reboots, only a
    # commit runs the post_commit hook.
    assert (decision.error is not None) == (action in decide.FAILED)
    assert decision.reboot == (action is HealthAction.ROLLED_BACK) == outcome.rebooting
    assert decision.post_commit == (action is HealthAction.COMMITTED)
    # Failed versions only grow, by the one that failed here.
    assert set(journal.failed_versions) <= set(after.failed_versions)
    grown = set(after.failed_versions) - set(journal.failed_versions)
    assert len(grown) <= 1 and grown <= {outcome.version, getattr(pending, "version", None)}

    booted_version = journal.version_in(booted)
    if action in (HealthAction.WAITING_FOR_REBOOT, HealthAction.NOTHING):
        assert new == boot and after == journal and not step.save
        mine = installed(journal, booted) if pending is None else booted_version
        assert outcome.version == mine
        return
    assert step.save
    assert after.pending is None  # every other outcome settles what was pending
    version = pending.version if pending is not None else installed(journal, booted)
    if action is HealthAction.FELL_BACK:
        assert pending is not None
        assert outcome.version == booted_version
        assert new.state(pending.slot) is SlotState.BAD
        assert new.state(booted) is SlotState.GOOD
        assert pending.version in after.failed_versions
        assert "did not come up" in after.failed_versions[pending.version].reason
    elif action is HealthAction.COMMITTED:
        assert outcome.version == version
        assert new.state(booted) is SlotState.GOOD
        assert new.state(other(booted)) is boot.state(other(booted))
        assert version not in after.failed_versions
    elif action is HealthAction.NO_FALLBACK:
        assert outcome.version == version
        assert new.state(booted) is SlotState.GOOD  # stays here: nothing better to boot
        assert new.state(other(booted)) is boot.state(other(booted))
        assert after.last_error is not None and after.last_error.startswith(
            "health checks failed: "
        )
        assert after.failed_versions == journal.failed_versions
    else:
        assert action is HealthAction.ROLLED_BACK
        assert outcome.version == version
        assert new.state(booted) is SlotState.BAD
        assert new.state(other(booted)) is SlotState.GOOD and new.primary() == other(booted)
        assert version in after.failed_versions
        assert f"rolling back to slot {other(booted)}" in (decision.error or "")
    if decision.error is not None:  # the one line, shaped as every outcome's text
        assert decision.error.startswith(f"{action}: slot {booted}. {outcome.detail}")


def test_every_outcome_and_backend_is_reached() -> None:
    seen = {
        (name.split()[0], decide_after_boot(JOURNALS[j], BOOTS[name], booted, h).outcome.action)
        for j, name, booted in CASES
        for h in (PASS, FAIL)
    }
    assert seen == {(backend, action) for backend in BACKENDS for action in HealthAction}


def test_a_rollback_without_reboot_says_so() -> None:
    journal = JOURNALS["pending B"]
    boot = BOOTS["grub A=good B=trying first=B"]
    decision = decide.after_boot(journal, boot, "B", None, FAIL, reboot=False, now=T0)
    assert decision.outcome.action is HealthAction.ROLLED_BACK
    assert not decision.reboot and not decision.outcome.rebooting
    assert decision.error is not None and "rebooting" not in decision.error
    assert decision.outcome.to_json() == {
        "action": "rolled-back",
        "slot": "B",
        "version": "2.0.0",
        "detail": decision.outcome.detail,
        "rebooting": False,
    }


def test_the_rollback_writes_the_variables_of_the_three_calls_it_replaces() -> None:
    boot = BOOTS["grub A=good B=trying first=B"]
    decision = decide.after_boot(JOURNALS["pending B"], boot, "B", None, FAIL, now=T0)
    assert isinstance(decision.step.boot, GrubState)
    assert dict(decision.step.boot.env) == {
        "ORDER": "A B",
        "A_OK": "1",
        "A_TRY": "0",
        "B_OK": "0",
        "B_TRY": "0",
    }


def test_fell_back_changes_only_the_variables_it_did_before() -> None:
    # GRUB tried B (B_TRY=1) and fell back to A (A_TRY=1): B invalidated, A committed,
    # ORDER left as it was.
    boot = GrubState.of({"ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1", "B_TRY": "1"})
    decision = decide.after_boot(JOURNALS["pending B"], boot, "A", None, None, now=T0)
    assert decision is not None and decision.outcome.action is HealthAction.FELL_BACK
    assert isinstance(decision.step.boot, GrubState)
    assert dict(decision.step.boot.env) == {
        "ORDER": "B A",
        "A_OK": "1",
        "A_TRY": "0",
        "B_OK": "0",
        "B_TRY": "0",
    }


# --- the commands' decisions ----------------------------------------------------------


@pytest.mark.parametrize(("journal_name", "boot_name", "booted"), CASES)
def test_install_is_refused_exactly_while_the_booted_slot_is_pending(
    journal_name: str, boot_name: str, booted: str
) -> None:
    journal = JOURNALS[journal_name]
    pending = journal.pending
    if pending is not None and pending.slot == booted:
        with pytest.raises(decide.NotCommitted, match=f"slot {booted} .* not yet committed"):
            decide.check_can_install(journal, booted)
        return
    decide.check_can_install(journal, booted)
    step = decide.before_writing(journal, BOOTS[boot_name], other(booted))
    assert step.boot.state(other(booted)) is SlotState.BAD
    assert step.boot.state(booted) is BOOTS[boot_name].state(booted)
    assert step.journal.version_in(other(booted)) is None and step.save
    assert step.journal.version_in(booted) == journal.version_in(booted)


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize(("journal_name", "boot_name", "booted"), CASES)
def test_activate(journal_name: str, boot_name: str, booted: str, slot: str) -> None:
    journal, boot = JOURNALS[journal_name], BOOTS[boot_name]
    version = journal.version_in(slot)
    if slot != booted and version is None:
        with pytest.raises(UpdateRejected, match=f"slot {slot} holds no verified image"):
            decide.activate(journal, boot, booted, slot, T0)
        return
    step = decide.activate(journal, boot, booted, slot, T0)
    assert step.boot.primary() == slot and step.save
    assert step.boot.state(other(slot)) is boot.state(other(slot))
    if slot == booted:  # back to the running slot: cancels what was pending, committed
        assert step.boot.state(slot) is SlotState.GOOD
        assert step.journal == journal.committed()
    else:
        assert step.boot.state(slot) is not SlotState.BAD
        assert step.journal.pending is not None
        assert (step.journal.pending.slot, step.journal.pending.version) == (slot, version)


def test_activate_an_unknown_slot() -> None:
    with pytest.raises(ConfigError, match="unknown slot 'C'"):
        decide.activate(recorded(), BOOTS["grub A=good B=good first=A"], "A", "C")


@pytest.mark.parametrize(("journal_name", "boot_name", "booted"), CASES)
def test_rollback(journal_name: str, boot_name: str, booted: str) -> None:
    journal, boot = JOURNALS[journal_name], BOOTS[boot_name]
    target = other(booted)
    state = boot.state(target)
    if state is not SlotState.GOOD:
        with pytest.raises(UpdateRejected, match=f"slot {target}: its state is {state.value}"):
            decide.rollback(journal, boot, booted)
        return
    slot, step = decide.rollback(journal, boot, booted)
    assert slot == target and step.boot.primary() == target
    assert step.boot.state(target) is SlotState.GOOD
    assert step.boot.state(booted) is boot.state(booted)
    assert step.journal == journal.committed() and step.save


@pytest.mark.parametrize(("journal_name", "boot_name", "booted"), CASES)
def test_mark_good(journal_name: str, boot_name: str, booted: str) -> None:
    journal, boot = JOURNALS[journal_name], BOOTS[boot_name]
    step = decide.mark_good(journal, boot, booted)
    assert step.boot.state(booted) is SlotState.GOOD and step.save
    assert step.boot.state(other(booted)) is boot.state(other(booted))
    pending = journal.pending
    here = pending is not None and pending.slot == booted
    assert step.journal == (journal.committed() if here else journal)


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize(("journal_name", "boot_name"), list(itertools.product(JOURNALS, BOOTS)))
def test_mark_bad(journal_name: str, boot_name: str, slot: str, force: bool) -> None:
    journal, boot = JOURNALS[journal_name], BOOTS[boot_name]
    if not force and boot.state(other(slot)) is not SlotState.GOOD:
        with pytest.raises(UpdateRejected, match=f"refusing to mark slot {slot} bad"):
            decide.mark_bad(journal, boot, slot, force=force, now=T0)
        return
    step = decide.mark_bad(journal, boot, slot, force=force, now=T0)
    assert step.boot.state(slot) is SlotState.BAD and step.save
    assert step.boot.state(other(slot)) is boot.state(other(slot))
    if not force:
        assert step.boot.primary() == other(slot)  # something still boots
    pending = journal.pending
    if pending is not None and pending.slot == slot:
        assert step.journal.pending is None
        assert (
            step.journal.failed_versions[pending.version].reason == f"marked bad by hand in {slot}"
        )
    else:
        assert step.journal == journal


def test_mark_bad_an_unknown_slot() -> None:
    with pytest.raises(ConfigError, match="unknown slot 'C'"):
        decide.mark_bad(recorded(), BOOTS["grub A=good B=good first=A"], "C")
