"""The rollout plan of a release in the signing tools: `sign-release rollout` (pause,
resume, withdraw or re-plan a published release), the plan `add` gives each image, and
the rule that a published target changes in nothing but its plan.

A plan (`core.release.RolloutPlan`, in `custom.rollout`) is signed into every target of a
release; nodes skip a release whose images disagree on it. So:

* `sign-release rollout REPO HARDWARE VERSION` rewrites the plan of every target of that
  version for that hardware, one change for all of them, and stages targets as `add`
  does (signatures dropped, re-signed with `--sign-with`, expiry renewed); `publish`
  makes it visible. Length, hashes, `custom.release` and every other field of each
  target are kept: the image a node verifies is the image that was signed at `add`.
* `add` of one more image (another role) of a version inherits the plan its other
  images carry when no `--waves` is given, and refuses a `--waves` that differs.
* `publish` refuses staged targets metadata that changes a published target in anything
  but `custom.rollout` (`check_only_plans_changed`): versions stay immutable whatever
  edited staged/targets.json.

Invariants: every check runs before the first write (the repository is unchanged on
bad input); every plan written is one `core.release.ReleaseFields.from_target` parsed
back, the node's own parser; relative `--waves` times are taken from the clock once,
when the command runs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]

from core.release import FieldError, ReleaseFields, RolloutPlan, Wave, parse_waves
from signing.errors import RepositoryStateError, SigningError
from signing.keys import Secrets
from signing.roles import load_signers, sign_all
from signing.store import Store, expiry, now, role_keys

ACTIONS = ("pause", "resume", "withdraw", "waves")


def waves_option(spec: str) -> tuple[Wave, ...]:
    """The waves of a `--waves SPEC`, relative times from now; one-line `SigningError`."""
    try:
        return parse_waves(spec, now())
    except FieldError as e:
        raise SigningError(f"--waves: {e}") from e


@dataclass(frozen=True)
class RolloutChange:
    """What `sign-release rollout` does to a plan: one of ACTIONS (`waves` with `waves`)."""

    action: str
    waves: tuple[Wave, ...] = ()

    def apply(self, plan: RolloutPlan | None, what: str) -> RolloutPlan:
        """The new plan; `RepositoryStateError` when the change would change nothing.
        A release without a plan (installed at once) is paused or withdrawn as one wave
        of the whole fleet starting now."""
        if self.action == "waves":
            new = RolloutPlan(self.waves) if plan is None else replace(plan, waves=self.waves)
        elif self.action == "resume":
            if plan is None:
                raise RepositoryStateError(
                    f"{what} has no rollout plan (it installs at once): nothing to resume"
                )
            new = replace(plan, state="active")
        else:
            state = "paused" if self.action == "pause" else "withdrawn"
            if plan is None:
                new = RolloutPlan((Wave(1.0, now()),), state)  # the whole fleet, now
            else:
                new = replace(plan, state=state)
        if new == plan:
            raise RepositoryStateError(f"{what} already has this plan ({new.describe()})")
        return new


def release_targets(
    targets: Mapping[str, TargetFile], hardware: str, version: str
) -> dict[str, ReleaseFields]:
    """The targets of `version` for `hardware` (as a node parses them), by path."""
    found = {}
    for path, target in targets.items():
        fields = _parsed(path, target)
        if fields is not None and fields.version.text == version and hardware in fields.hardware:
            found[path] = fields
    return found


def _parsed(path: str, target: TargetFile) -> ReleaseFields | None:
    try:
        return ReleaseFields.from_target(path, target)
    except ValueError:
        return None  # a node skips it: it is no image of any release


def existing_plan(
    targets: Mapping[str, TargetFile], hardware: str, version: str
) -> tuple[bool, RolloutPlan | None]:
    """(whether `version` has images for `hardware` already, the plan they carry);
    `RepositoryStateError` when they disagree (`sign-release rollout --waves` fixes it)."""
    plans = {fields.rollout for fields in release_targets(targets, hardware, version).values()}
    if len(plans) > 1:
        raise RepositoryStateError(
            f"version {version} for hardware {hardware}: its images carry different rollout "
            "plans (nodes skip it); set one with `sign-release rollout --waves`"
        )
    return bool(plans), next(iter(plans), None)


def add_plans(
    targets: Mapping[str, TargetFile],
    hardware: Sequence[str],
    version: str,
    rollout: RolloutPlan | None,
) -> dict[str, RolloutPlan | None]:
    """The plan of each hardware's new target of `add`: all images of a release carry
    one plan, so an image added to a version that has images already takes their plan
    (`rollout` None), and a `--waves` that differs from it is refused."""
    plans = {}
    for hw in hardware:
        exists, plan = existing_plan(targets, hw, version)
        if rollout is not None and exists and plan != rollout:
            have = "no rollout plan" if plan is None else f"rollout plan {plan.describe()}"
            raise RepositoryStateError(
                f"version {version} for hardware {hw} has images with {have}: add this one "
                "without --waves to take the same plan, and change the plan of all of them "
                "with `sign-release rollout`"
            )
        plans[hw] = plan if rollout is None else rollout
    return plans


def with_plan(target: TargetFile, plan: RolloutPlan | None) -> TargetFile:
    """`target` with `custom.rollout` set to `plan` and everything else as it was."""
    fields = copy.deepcopy(target.unrecognized_fields)
    custom = dict(fields.get("custom") or {})
    custom.pop("rollout", None)
    if plan is not None:
        custom["rollout"] = plan.to_custom()
    fields["custom"] = custom
    new = TargetFile(target.length, dict(target.hashes), target.path, fields)
    ReleaseFields.from_target(new.path, new)  # what a node accepts (cannot fail: parsed)
    return new


def change_rollout(
    path: Path,
    hardware: str,
    version: str,
    change: RolloutChange,
    sign_with: Sequence[str],
    *,
    expires_days: int | None = None,
    secrets: Secrets | None = None,
    allow_example_keys: bool = False,
) -> tuple[RolloutPlan, list[TargetFile]]:
    """Stage `change` to the plan of every target of `version` for `hardware`, signed;
    returns the new plan and the targets staged."""
    secrets = secrets or Secrets()
    if change.action not in ACTIONS:
        raise SigningError(f"rollout action {change.action!r}: use one of {', '.join(ACTIONS)}")
    if expires_days is not None and expires_days < 0:
        raise SigningError(f"--expires {expires_days}: days must be >= 0")
    with Store(path) as store:
        root = store.current_root()
        signers = load_signers(
            sign_with,
            role_keys(root.signed, "targets"),
            "targets",
            secrets,
            allow_example_keys=allow_example_keys,
        )
        if not signers:
            raise SigningError("rollout needs at least one --sign-with targets key")
        targets, _ = store.editable("targets", expires_days)
        found = release_targets(targets.signed.targets, hardware, version)
        what = f"version {version} for hardware {hardware}"
        if not found:
            parsed = (_parsed(p, t) for p, t in targets.signed.targets.items())
            have = sorted({f.version for f in parsed if f is not None and hardware in f.hardware})
            raise RepositoryStateError(
                f"{what}: no such release in the targets metadata "
                f"(versions for {hardware}: {', '.join(map(str, have)) or 'none'})"
            )
        plans = {fields.rollout for fields in found.values()}
        if len(plans) > 1 and change.action != "waves":
            raise RepositoryStateError(
                f"{what}: its images carry different rollout plans; set one with --waves"
            )
        plan = change.apply(next(iter(plans)) if len(plans) == 1 else None, what)
        staged = [with_plan(targets.signed.targets[p], plan) for p in sorted(found)]
        for tf in staged:
            targets.signed.targets[tf.path] = tf
        targets.signatures.clear()  # the signed content changed
        if expires_days is None:
            targets.signed.expires = expiry(store.expiry_days("targets"))
        sign_all(targets, signers)
        store.write_staged(targets)
        return plan, staged


def _fixed_part(target: TargetFile) -> dict[str, Any]:
    """Everything of a target that never changes once published: all but its plan."""
    data = target.to_dict()
    custom = data.get("custom")
    if isinstance(custom, dict):
        data["custom"] = {k: v for k, v in custom.items() if k != "rollout"}
    return data


def check_only_plans_changed(
    published: Metadata[Targets] | None, staged: Metadata[Targets]
) -> None:
    """Refuse staged targets that change a published target in anything but its
    rollout plan (`custom.rollout`): published versions are immutable."""
    if published is None:
        return
    for tpath, old in published.signed.targets.items():
        new = staged.signed.targets.get(tpath)
        if new is None or _fixed_part(new) == _fixed_part(old):
            continue
        before, after = _fixed_part(old), _fixed_part(new)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        raise RepositoryStateError(
            f"staged targets change published target {tpath} ({', '.join(changed)}); "
            "a published target changes only in its rollout plan (`sign-release rollout`): "
            "versions are immutable, use a new one"
        )
