"""updater.metrics: the node's facts as Prometheus text, read back with prometheus-client's
own parser; the TUF expiry from a real client cache (the repository simulator, refreshed
by core.repository) and from keys-example's root.json; hostile label values; the file
written atomically (old or new, 0644, through a symlink, no temp file after a failure).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tuf.api.metadata import Metadata

from core.repository import Repository
from tests.reposim import METADATA_URL, TARGETS_URL, RepositorySimulator
from updater.metrics import (
    PREFIX,
    WAITING_REASONS,
    MetricsWriteFailed,
    NodeFacts,
    render,
    write_metrics,
)
from updater.state import Journal

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 3, 2, 0, 0, tzinfo=UTC)
NOWHERE = Path("/nonexistent/tuf")


def facts(
    journal: Journal | None = None,
    *,
    booted_version: str | None = "1.0.0",
    primary_slot: str | None = "A",
    lock_held: bool | None = None,
    metadata_dir: Path = NOWHERE,
    waiting: str | None = None,
    now: datetime = T0,
) -> NodeFacts:
    return NodeFacts(
        booted_slot="A",
        booted_version=booted_version,
        primary_slot=primary_slot,
        journal=journal or Journal(),
        lock_held=lock_held,
        metadata_dir=metadata_dir,
        rollout_waiting=waiting,
        now=now,
    )


def samples(text: bytes) -> dict[str, list[Sample]]:
    """Every sample of the exposition, by family name (without the prefix); each
    family has a HELP text."""
    parsed: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        assert family.name.startswith(PREFIX), family.name
        assert family.documentation, family.name
        assert family.type == "gauge", family.name
        parsed[family.name.removeprefix(PREFIX)] = list(family.samples)
    return parsed


def value(parsed: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in parsed[name] if s.labels == labels]
    assert len(found) == 1, (name, labels, parsed[name])
    return found[0]


def test_a_fresh_node_renders_what_it_knows_and_nothing_else() -> None:
    parsed = samples(render(facts(booted_version=None, primary_slot=None)))
    assert set(parsed) == {"booted_info", "failed_versions", "rollout_waiting"}
    assert value(parsed, "booted_info", slot="A", version="") == 1
    assert value(parsed, "failed_versions") == 0
    assert {s.labels["reason"]: s.value for s in parsed["rollout_waiting"]} == dict.fromkeys(
        WAITING_REASONS, 0.0
    )


def test_every_fact_of_the_journal_is_a_metric_with_its_value() -> None:
    journal = (
        Journal()
        .with_installed("B", "2.0.0", T0)
        .with_install_record(
            "B", "2.0.0", 123_456_789, 42.5, T0 + timedelta(seconds=1), reused={"A": 7_000_000}
        )
        .with_commit_record("A", "1.0.0", T0 - timedelta(days=1))
        .with_failed("1.5.0", "health checks failed", T0 - timedelta(hours=2))
        .with_failed("1.6.0", "boot failed", T0 - timedelta(hours=1))
        .with_check(None, T0 + timedelta(seconds=2))
    )
    parsed = samples(render(facts(journal, primary_slot="B", lock_held=True, waiting="window")))

    assert value(parsed, "booted_info", slot="A", version="1.0.0") == 1
    assert value(parsed, "primary_slot_info", slot="B") == 1
    assert value(parsed, "last_check_timestamp_seconds") == T0.timestamp() + 2
    assert value(parsed, "last_check_success") == 1
    assert value(parsed, "last_install_timestamp_seconds") == T0.timestamp() + 1
    assert value(parsed, "last_install_info", version="2.0.0", slot="B") == 1
    assert value(parsed, "last_install_fetched_bytes") == 123_456_789
    assert value(parsed, "last_install_duration_seconds") == 42.5
    assert value(parsed, "last_install_reused_bytes", slot="A") == 7_000_000
    assert value(parsed, "last_commit_timestamp_seconds") == T0.timestamp() - 86_400
    assert value(parsed, "last_commit_info", version="1.0.0", slot="A") == 1
    assert value(parsed, "failed_versions") == 2
    assert value(parsed, "failed_version_timestamp_seconds", version="1.5.0") == (
        T0.timestamp() - 7200
    )
    assert value(parsed, "failed_version_timestamp_seconds", version="1.6.0") == (
        T0.timestamp() - 3600
    )
    assert value(parsed, "reboot_lock_held") == 1
    assert value(parsed, "rollout_waiting", reason="window") == 1
    assert sum(s.value for s in parsed["rollout_waiting"]) == 1


def test_a_failed_check_a_free_lock_and_an_unknown_commit_version() -> None:
    journal = Journal().with_check("repository unreachable", T0).with_commit_record("A", None, T0)
    parsed = samples(render(facts(journal, lock_held=False, waiting="maintenance")))
    assert value(parsed, "last_check_success") == 0
    assert value(parsed, "reboot_lock_held") == 0
    assert value(parsed, "last_commit_info", version="", slot="A") == 1
    # A reason updater.fleet learns later is shown too, beside the known ones at 0.
    assert value(parsed, "rollout_waiting", reason="maintenance") == 1
    assert value(parsed, "rollout_waiting", reason="wave") == 0


def test_no_coordination_means_no_lock_metric() -> None:
    assert "reboot_lock_held" not in samples(render(facts(lock_held=None)))


def test_a_hand_edited_journal_time_omits_its_metric_and_never_fails() -> None:
    data = Journal().with_check(None, T0).with_failed("1.5.0", "bad", T0).to_json()
    data["last_check"] = "yesterday"
    data["failed_versions"]["1.5.0"]["at"] = "not a time"
    parsed = samples(render(facts(Journal.from_json(data))))
    assert "last_check_timestamp_seconds" not in parsed
    assert value(parsed, "failed_versions") == 1
    assert math.isnan(value(parsed, "failed_version_timestamp_seconds", version="1.5.0"))


HOSTILE = [
    'x"} 1\nab_updater_forged 1',
    "\n# TYPE ab_updater_forged counter\nab_updater_forged 1\n",
    "trailing backslash\\",
    'backslash-quote\\"',
    "carriage\rreturn",
    "line\u2028separator",
    "nul\x00byte",
    "{}=,",
]


@pytest.mark.parametrize("version", HOSTILE)
def test_a_label_value_cannot_forge_a_line(version: str) -> None:
    journal = (
        Journal()
        .with_failed(version, "bad", T0)
        .with_install_record("B", version, 1, 1.0, T0)
        .with_commit_record("B", version, T0)
    )
    text = render(facts(journal, booted_version=version, waiting=version))
    # One line per sample or comment, each ours: nothing was injected.
    for line in text.decode().split("\n")[:-1]:
        assert line.startswith(("# HELP ab_updater_", "# TYPE ab_updater_", PREFIX)), line
    parsed = samples(text)
    assert "forged" not in parsed
    assert value(parsed, "booted_info", slot="A", version=version) == 1
    assert value(parsed, "failed_version_timestamp_seconds", version=version) == T0.timestamp()
    assert value(parsed, "last_install_info", slot="B", version=version) == 1
    assert value(parsed, "last_commit_info", slot="B", version=version) == 1
    assert value(parsed, "rollout_waiting", reason=version) == 1


def test_a_lone_surrogate_from_the_journal_is_spelt_not_a_crash() -> None:
    # JSON's "\ud800" decodes to a str that UTF-8 cannot encode.
    data = Journal().to_json()
    data["failed_versions"] = json.loads('{"1.0\\ud800": {"reason": "bad", "at": "2026-01-01"}}')
    parsed = samples(render(facts(Journal.from_json(data))))
    assert [s.labels["version"] for s in parsed["failed_version_timestamp_seconds"]] == [
        "1.0\\ud800"
    ]


# --- the expiry of the trusted metadata -------------------------------------------------


def days(at: datetime, now: datetime) -> float:
    return (at - now).total_seconds() / 86_400


def test_expiry_of_a_real_client_cache_per_role_and_the_first(tmp_path: Path) -> None:
    sim = RepositorySimulator()
    now = datetime.now(UTC).replace(microsecond=0)
    expires = {
        "root": now + timedelta(days=365),
        "timestamp": now + timedelta(hours=12),
        "snapshot": now + timedelta(days=7),
        "targets": now + timedelta(days=90),
    }
    sim.root.expires = expires["root"]
    sim.next_root()
    sim.timestamp.expires = expires["timestamp"]
    sim.snapshot.expires = expires["snapshot"]
    sim.targets.expires = expires["targets"]
    sim.update_snapshot()
    shipped = tmp_path / "shipped-root.json"
    shipped.write_bytes(sim.signed_roots[0])
    Repository(METADATA_URL, TARGETS_URL, shipped, tmp_path / "tuf", fetcher=sim).refresh()

    parsed = samples(render(facts(metadata_dir=tmp_path / "tuf", now=now)))
    for role, at in expires.items():
        assert value(parsed, "metadata_role_expiry_days", role=role) == pytest.approx(days(at, now))
        assert value(parsed, "metadata_expiry_timestamp_seconds", role=role) == at.timestamp()
    assert value(parsed, "metadata_expiry_days") == pytest.approx(0.5)


def test_expiry_agrees_with_python_tuf_on_the_example_root(tmp_path: Path) -> None:
    shutil.copy(REPO / "keys-example" / "root.json", tmp_path / "root.json")
    signed = Metadata.from_bytes((tmp_path / "root.json").read_bytes()).signed
    parsed = samples(render(facts(metadata_dir=tmp_path)))
    assert value(parsed, "metadata_role_expiry_days", role="root") == pytest.approx(
        days(signed.expires, T0)
    )
    assert value(parsed, "metadata_expiry_days") == pytest.approx(days(signed.expires, T0))
    # Expired metadata counts down below zero.
    later = signed.expires + timedelta(days=3)
    assert value(
        samples(render(facts(metadata_dir=tmp_path, now=later))), "metadata_expiry_days"
    ) == (pytest.approx(-3))


def test_an_unreadable_cache_file_omits_its_role_and_never_blocks(tmp_path: Path) -> None:
    root = (REPO / "keys-example" / "root.json").read_bytes()
    (tmp_path / "root.json").write_bytes(root)
    (tmp_path / "timestamp.json").write_bytes(b"{ not json")
    os.mkfifo(tmp_path / "snapshot.json")  # opened non-blocking: refused, never waited on
    (tmp_path / "targets.json").write_bytes(root)  # JSON, but root's, not targets'
    parsed = samples(render(facts(metadata_dir=tmp_path)))
    assert [s.labels["role"] for s in parsed["metadata_role_expiry_days"]] == ["root"]

    for name, content in {
        "root.json": b'{"signed": {"_type": "root", "expires": "2030-01-01T00:00:00"}}',
        "timestamp.json": b'{"signed": {"_type": "timestamp", "expires": 5}}',
        "targets.json": b'{"signed": {"_type": "targets", "expires": "soon"}}',
    }.items():
        (tmp_path / name).write_bytes(content)
    assert "metadata_expiry_days" not in samples(render(facts(metadata_dir=tmp_path)))


def test_rendering_imports_no_tuf_and_importing_loads_no_prometheus_client(
    tmp_path: Path,
) -> None:
    shutil.copy(REPO / "keys-example" / "root.json", tmp_path / "root.json")
    script = textwrap.dedent(
        f"""
        import sys
        from datetime import UTC, datetime
        from pathlib import Path
        from updater.metrics import NodeFacts, render
        from updater.state import Journal
        assert "prometheus_client" not in sys.modules
        facts = NodeFacts("A", "1.0.0", "A", Journal(), None, Path({str(tmp_path)!r}), None,
                          datetime.now(UTC))
        assert b"metadata_expiry_days" in render(facts)
        heavy = sorted(n for n in sys.modules
                       if n.split(".")[0] in ("tuf", "securesystemslib", "requests"))
        assert not heavy, heavy
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


# --- writing the file -------------------------------------------------------------------


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_the_file_is_the_rendering_and_readable_by_node_exporter(
    tmp_path: Path, strict_umask: None
) -> None:
    path = tmp_path / "updater.prom"
    write_metrics(path, facts())
    assert path.read_bytes() == render(facts())
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["updater.prom"]


def test_the_file_is_replaced_never_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "updater.prom"
    write_metrics(path, facts())
    old = path.read_bytes()
    with path.open("rb") as reader:  # node_exporter, mid-read
        write_metrics(path, facts(Journal().with_check(None, T0)))
        assert reader.read() == old  # it still reads the whole old file
    assert path.read_bytes() == render(facts(Journal().with_check(None, T0)))


def test_a_symlinked_path_keeps_its_link_and_replaces_its_target(tmp_path: Path) -> None:
    textfile, real = tmp_path / "textfile", tmp_path / "real"
    textfile.mkdir()
    real.mkdir()
    (textfile / "updater.prom").symlink_to(real / "updater.prom")
    write_metrics(textfile / "updater.prom", facts())
    write_metrics(textfile / "updater.prom", facts(lock_held=True))
    assert (textfile / "updater.prom").is_symlink()
    assert (real / "updater.prom").read_bytes() == render(facts(lock_held=True))
    assert (real / "updater.prom").stat().st_mode & 0o777 == 0o644
    assert os.listdir(real) == ["updater.prom"]


def test_a_failed_rename_is_one_line_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "updater.prom"
    path.mkdir()  # a directory where the file should be: the rename fails
    (path / "keep").write_text("x")
    with pytest.raises(MetricsWriteFailed) as err:
        write_metrics(path, facts())
    assert str(err.value) == f"cannot write metrics {path}: Is a directory"
    assert os.listdir(tmp_path) == ["updater.prom"]
    assert os.listdir(path) == ["keep"]


def test_a_write_failing_midway_keeps_the_old_file(tmp_path: Path) -> None:
    """The file size limit (RLIMIT_FSIZE) makes the write itself fail after the temp
    file was created: the old file must be intact and the temp file gone."""
    path = tmp_path / "updater.prom"
    path.write_bytes(b"# old metrics\n")
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from datetime import UTC, datetime
        from pathlib import Path
        from updater.metrics import MetricsWriteFailed, NodeFacts, write_metrics
        from updater.state import Journal
        facts = NodeFacts("A", "1.0.0", "A", Journal(), None, Path("/nonexistent"), None,
                          datetime.now(UTC))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        try:
            write_metrics(Path({str(path)!r}), facts)
        except MetricsWriteFailed as err:
            print(err)
            sys.exit(0)
        sys.exit("written despite the limit")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cannot write metrics {path}: File too large\n"
    assert path.read_bytes() == b"# old metrics\n"
    assert os.listdir(tmp_path) == ["updater.prom"]
