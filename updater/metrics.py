"""The node's facts as Prometheus metrics, for node_exporter's textfile collector.

The agent fills one `NodeFacts` (what it booted, its journal, the reboot lock, why the
rollout waits, where the TUF cache is) and `write_metrics` puts them in a `.prom` file
that node_exporter's `--collector.textfile.directory` exposes (docs/metrics.md lists
every metric). `render` builds the text with prometheus-client in a registry of its
own, so nothing of a process-wide default registry leaks into the file.

Invariants:

* the file is never half-written: node_exporter reads it at any moment, so it is
  replaced with `fsutil.atomic_write` (temp file, fsync, rename, directory fsync;
  a symlinked path keeps its link and the file it names is replaced), mode 0644 so
  an unprivileged node_exporter can read it; a failed write leaves the old file;
* a label value cannot forge a line: versions come from signed metadata and from
  the journal, a file on disk; prometheus-client escapes quotes, backslashes and
  newlines, and text that is not UTF-8-encodable (a lone surrogate from a JSON
  escape) is spelt as a backslash escape instead of failing the encode;
* facts that are not there are metrics that are not there: a fresh node (empty
  journal, no TUF cache) renders without error; a missing, unreadable or damaged
  cache file omits the expiry of that role, never fails the command;
* fast on the health-check path: the TUF cache is read as plain JSON (no `tuf`
  import), and prometheus-client is imported only when metrics are rendered, so a
  node without `[metrics] path` never loads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import UpdateFailed
from core.fsutil import atomic_write, read_regular
from core.textparse import loads_json
from updater.state import Journal

log = logging.getLogger(__name__)

PREFIX = "ab_updater_"
FILE_MODE = 0o644  # node_exporter usually runs as its own user
TOP_LEVEL_ROLES = ("root", "timestamp", "snapshot", "targets")
# The longest file ngclient accepts for each role (its UpdaterConfig defaults), so the
# trusted cache never holds a longer one: a longer file is not what ngclient wrote.
MAX_METADATA_BYTES = {
    "root": 512_000,
    "timestamp": 16_384,
    "snapshot": 2_000_000,
    "targets": 5_000_000,
}
# The reasons updater.fleet holds a node for: each is a sample (0 or 1) so that a
# node that stops waiting shows 0 instead of a series that disappears.
WAITING_REASONS = ("wave", "paused", "withdrawn", "window", "quorum", "lock")
SECONDS_PER_DAY = 86_400.0


class MetricsWriteFailed(UpdateFailed):
    """The metrics file could not be written (its directory, permissions, space)."""


@dataclass(frozen=True)
class NodeFacts:
    """What the metrics say, gathered by the agent; `render` does no I/O but read the
    TUF cache in `metadata_dir`."""

    booted_slot: str
    booted_version: str | None  # None: neither the journal nor os-release knows it
    primary_slot: str | None  # the slot the bootloader boots next; None: none bootable
    journal: Journal
    lock_held: bool | None  # None: no reboot coordination configured
    metadata_dir: Path  # the TUF cache, <state_dir>/tuf
    rollout_waiting: str | None  # a fleet.Hold reason (wave, window, lock...), or None
    now: datetime  # aware; the expiry is counted from it


def render(facts: NodeFacts) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of `facts`."""
    # Here, not at the top: prometheus-client loads http.server, wsgiref and more
    # (~0.1 s); only a node with [metrics] path pays for it.
    from prometheus_client import CollectorRegistry, Gauge, Info, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    metrics: dict[str, Gauge] = {}

    def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        metric = metrics.get(name)
        if metric is None:
            metric = Gauge(PREFIX + name, doc, sorted(labels or {}), registry=registry)
            metrics[name] = metric
        target = metric.labels(**{k: _label(v) for k, v in labels.items()}) if labels else metric
        target.set(value)

    def info(name: str, doc: str, labels: dict[str, str]) -> None:
        Info(PREFIX + name, doc, registry=registry).info({k: _label(v) for k, v in labels.items()})

    journal = facts.journal

    info(
        "booted",
        "The slot this node booted and the version in it (empty: unknown); always 1.",
        {"slot": facts.booted_slot, "version": facts.booted_version or ""},
    )
    if facts.primary_slot is not None:
        info(
            "primary_slot",
            "The slot the bootloader boots next; always 1. Differs from the booted slot "
            "while an update waits for its reboot or after a rollback.",
            {"slot": facts.primary_slot},
        )

    checked = _timestamp(journal.last_check)
    if checked is not None:
        gauge(
            "last_check_timestamp_seconds",
            "When the agent last checked the repository (Unix time).",
            checked,
        )
        gauge(
            "last_check_success",
            "1 if the last check ended without an error, else 0.",
            1.0 if journal.last_error is None else 0.0,
        )

    install = journal.last_install
    if install is not None:
        installed = _timestamp(install.at)
        if installed is not None:
            gauge(
                "last_install_timestamp_seconds",
                "When the last install finished writing a slot (Unix time).",
                installed,
            )
        info(
            "last_install",
            "The version and slot the last install wrote; always 1.",
            {"version": install.version, "slot": install.slot},
        )
        gauge(
            "last_install_fetched_bytes",
            "Bytes downloaded by the last install (compressed, as served).",
            install.bytes_fetched,
        )
        for slot, reused in install.bytes_reused.items():
            gauge(
                "last_install_reused_bytes",
                "Raw bytes the last install reused from a slot instead of fetching them "
                "(a delta install; docs/delta.md).",
                reused,
                {"slot": slot},
            )
        gauge(
            "last_install_duration_seconds",
            "How long the last install took, download and write.",
            install.seconds,
        )

    commit = journal.last_commit
    if commit is not None:
        committed = _timestamp(commit.at)
        if committed is not None:
            gauge(
                "last_commit_timestamp_seconds",
                "When a health check last committed a slot (Unix time).",
                committed,
            )
        info(
            "last_commit",
            "The version and slot the last health check committed (version empty: "
            "unknown); always 1.",
            {"version": commit.version or "", "slot": commit.slot},
        )

    gauge(
        "failed_versions",
        "Versions that failed on this node and are never installed again.",
        len(journal.failed_versions),
    )
    for version, failure in sorted(journal.failed_versions.items()):
        failed_at = _timestamp(failure.at)
        gauge(
            "failed_version_timestamp_seconds",
            "When each failed version failed on this node (Unix time; NaN: not recorded).",
            float("nan") if failed_at is None else failed_at,
            {"version": version},
        )

    if facts.lock_held is not None:
        gauge(
            "reboot_lock_held",
            "1 while this node holds a slot of its group's reboot lock (taken before "
            "the reboot, released after the commit), else 0.",
            1.0 if facts.lock_held else 0.0,
        )

    waiting = facts.rollout_waiting
    reasons = list(WAITING_REASONS)
    if waiting is not None and waiting not in reasons:
        reasons.append(waiting)  # a reason added to updater.fleet later is still shown
    for reason in reasons:
        gauge(
            "rollout_waiting",
            "1 for the reason the last cycle held this node back from a new release or "
            "its reboot (wave, paused, withdrawn, window, quorum, lock), else 0.",
            1.0 if reason == waiting else 0.0,
            {"reason": reason},
        )

    expiries = metadata_expiry(facts.metadata_dir)
    if expiries:
        now = _aware(facts.now)
        days = {role: (at - now).total_seconds() / SECONDS_PER_DAY for role, at in expiries.items()}
        gauge(
            "metadata_expiry_days",
            "Days until the first of the trusted TUF metadata (root, timestamp, snapshot, "
            "targets) expires, counted when this file was written; negative: expired.",
            min(days.values()),
        )
        for role in sorted(expiries):
            gauge(
                "metadata_role_expiry_days",
                "Days until each role's trusted TUF metadata expires, counted when this "
                "file was written.",
                days[role],
                {"role": role},
            )
            gauge(
                "metadata_expiry_timestamp_seconds",
                "When each role's trusted TUF metadata expires (Unix time).",
                expiries[role].timestamp(),
                {"role": role},
            )

    return generate_latest(registry)


def write_metrics(path: Path, facts: NodeFacts) -> None:
    """Replace the file `path` names with `render(facts)`, atomically, mode 0644.
    MetricsWriteFailed (one line naming the path) if it cannot; the old file stays."""
    data = render(facts)
    try:
        atomic_write(path, data, mode=FILE_MODE)
    except OSError as err:
        raise MetricsWriteFailed(f"cannot write metrics {path}: {err.strerror or err}") from err


def metadata_expiry(metadata_dir: Path) -> dict[str, datetime]:
    """`signed.expires` of each top-level role cached in `metadata_dir` that can be read:
    a role whose file is missing (a fresh node), unreadable or not TUF metadata of that
    role is left out (logged, unless missing)."""
    found: dict[str, datetime] = {}
    for role in TOP_LEVEL_ROLES:
        path = metadata_dir / f"{role}.json"
        try:
            found[role] = _expires(loads_json(read_regular(path, MAX_METADATA_BYTES[role])), role)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("metrics: cannot read %s: %s", path, err.strerror or err)
        except ValueError as err:
            log.warning("metrics: %s: %s", path, err)
    return found


def _expires(document: Any, role: str) -> datetime:
    """The aware `signed.expires` of a decoded metadata file of `role`; ValueError."""
    signed = document.get("signed") if isinstance(document, dict) else None
    if not isinstance(signed, dict) or signed.get("_type") != role:
        raise ValueError(f"not {role} metadata")
    expires = signed.get("expires")
    if not isinstance(expires, str):
        raise ValueError("no signed.expires")
    at = datetime.fromisoformat(expires)  # ValueError names the text
    if at.tzinfo is None:
        raise ValueError(f"signed.expires {expires!r} has no time zone")
    return at


def _timestamp(iso: str | None) -> float | None:
    """Unix time of a journal timestamp (ISO 8601, UTC); None if absent or unparsable
    (a hand-edited journal omits the metric rather than failing the command)."""
    if iso is None:
        return None
    try:
        return _aware(datetime.fromisoformat(iso)).timestamp()
    except ValueError:
        return None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _label(value: str) -> str:
    """A label value that encodes as UTF-8: a lone surrogate (JSON's "\\ud800" decodes
    to one) is spelt as its escape; quotes, backslashes and newlines are escaped by
    prometheus-client itself."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
