"""`sign-release status`: where each role of a repository stands.

For every role, published and staged: version, valid signatures against the
threshold (counted by python-tuf against the keys root gives the role), the keyids
that may sign it, the expiry date and the days left; for targets, the rollout plan of
every release that has one (as a node parses it). Read-only; pure reporting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]

from core.release import ReleaseFields, RolloutPlan
from signing.store import OFFLINE_ROLES, ROLES, Store, now, threshold_of


def _describe(md: Metadata[Any], root: Root, role: str) -> dict[str, Any]:
    t = threshold_of(root, role, md)
    left = md.signed.expires - now()
    entry: dict[str, Any] = {
        "version": md.signed.version,
        "signatures": len(t.signed),
        "threshold": t.threshold,
        "missing": t.missing,
        "signed_by": list(t.signed),
        "keyids": sorted(root.roles[role].keyids),
        "expires": md.signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": round(left.total_seconds() / 86400, 1),
        "expired": md.signed.is_expired(now()),
    }
    if role == "targets":
        entry["targets"] = len(md.signed.targets)
        entry["rollouts"] = _rollouts(md)
    return entry


def _rollouts(md: Metadata[Any]) -> list[dict[str, Any]]:
    """[{hardware, version, rollout: plan or None, agree}] of each release with a plan;
    `agree` False: its images carry different plans (nodes skip it), `rollout` None."""
    plans: dict[tuple[str, str], set[RolloutPlan | None]] = {}
    for path, target in md.signed.targets.items():
        try:
            fields = ReleaseFields.from_target(path, target)
        except ValueError:
            continue
        for hw in fields.hardware:
            plans.setdefault((hw, fields.version.text), set()).add(fields.rollout)
    out = []
    for (hw, version), found in sorted(plans.items()):
        (plan,) = found if len(found) == 1 else (None,)
        if found != {None}:
            rollout = None if plan is None else plan.to_custom()
            out.append({"hardware": hw, "version": version, "rollout": rollout,
                        "agree": len(found) == 1})  # fmt: skip
    return out


def repository_status(path: Path) -> dict[str, Any]:
    """Status of every role: {"roles": {role: {"published": {...}, "staged": {...}}}}."""
    with Store(path) as store:
        published_root = store.published_root()
        current_root = store.current_root()
        roles: dict[str, Any] = {}
        for role in ROLES:
            entry: dict[str, Any] = {}
            published = store.published(role)
            if published is not None and published_root is not None:
                entry["published"] = _describe(published, published_root.signed, role)
            staged = store.staged(role) if role in OFFLINE_ROLES else None
            if staged is not None:
                entry["staged"] = _describe(staged, current_root.signed, role)
                if role == "root" and published_root is not None:
                    # A new root also needs the threshold of the root it replaces.
                    prev = threshold_of(published_root.signed, "root", staged)
                    entry["staged"]["previous_root_missing"] = prev.missing
            roles[role] = entry
        return {"repository": str(path), "roles": roles}


def format_status(status: dict[str, Any]) -> list[str]:
    """Human-readable lines for `status` (the --json form is `status` itself)."""
    lines = [
        f"{'role':<10} {'state':<10} {'version':>7} {'sigs':>5} {'expires':<20} "
        f"{'days left':>9}  keyids"
    ]
    for role, entry in status["roles"].items():
        if not entry:
            lines.append(f"{role:<10} -")
        for state in ("published", "staged"):
            e = entry.get(state)
            if e is None:
                continue
            sigs = f"{e['signatures']}/{e['threshold']}"
            left = "EXPIRED" if e["expired"] else f"{e['days_left']:.1f}"
            keyids = " ".join(k[:8] for k in e["keyids"])
            lines.append(
                f"{role:<10} {state:<10} {e['version']:>7} {sigs:>5} "
                f"{e['expires']:<20} {left:>9}  {keyids}"
            )
            for r in e.get("rollouts", ()):
                plan = (
                    RolloutPlan.from_custom(r["rollout"]).describe()
                    if r["agree"]
                    else ("its images carry different plans: nodes skip it")
                )
                lines.append(f"{'':<10} rollout {r['hardware']} {r['version']}: {plan}")
            if e.get("previous_root_missing"):
                lines.append(
                    f"{'':<10} {'':<10} needs {e['previous_root_missing']} more "
                    "signature(s) from the keys of the published root"
                )
    return lines
