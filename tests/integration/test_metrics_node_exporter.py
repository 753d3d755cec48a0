"""The metrics file as node_exporter itself reads it: the real `prometheus-node-exporter`
(Debian's), with only its textfile collector, serves what `write_metrics` wrote - every
metric, hostile label values included, with no textfile scrape error (node_exporter
drops a whole file it cannot parse and says so in `node_textfile_scrape_error`)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import require_tool
from tests.etcdcluster import free_port
from tests.unit.test_metrics import HOSTILE, REPO
from updater.metrics import NodeFacts, render, write_metrics
from updater.state import Journal

T0 = datetime(2026, 12, 3, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A textfile directory and the URL of a node_exporter reading it."""
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    port = free_port()
    log = (tmp_path / "node_exporter.log").open("wb")
    process = subprocess.Popen(
        [
            require_tool("prometheus-node-exporter"),
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={textfile}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield textfile, f"http://127.0.0.1:{port}/metrics"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def scrape(url: str) -> str:
    """The exposition, once node_exporter answers (bounded: 60 s of attempts)."""
    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode("utf-8"))
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"node_exporter never answered on {url}")


def points(samples: list[Sample]) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
    return {(s.name, frozenset(s.labels.items()), s.value) for s in samples}


def test_node_exporter_serves_every_metric_of_the_file(
    node_exporter: tuple[Path, str],
) -> None:
    textfile, url = node_exporter
    journal = (
        Journal()
        .with_installed("B", "2.0.0", T0)
        .with_install_record("B", "2.0.0", 123_456_789, 42.5, T0)
        .with_commit_record("A", "1.0.0", T0 - timedelta(days=1))
        .with_check(None, T0)
    )
    for i, version in enumerate(HOSTILE):
        journal = journal.with_failed(version, "bad", T0 + timedelta(seconds=i))
    facts = NodeFacts(
        booted_slot="A",
        booted_version=HOSTILE[0],
        primary_slot="B",
        journal=journal,
        lock_held=True,
        metadata_dir=REPO / "keys-example",
        rollout_waiting="window",
        now=T0,
    )
    write_metrics(textfile / "updater.prom", facts)

    served = {f.name: f for f in text_string_to_metric_families(scrape(url))}
    assert [s.value for s in served["node_textfile_scrape_error"].samples] == [0]
    ours = {f.name: f for f in text_string_to_metric_families(render(facts).decode())}
    assert set(ours) <= set(served)
    for name, family in ours.items():
        assert points(served[name].samples) == points(family.samples), name
        assert served[name].documentation == family.documentation, name
    failed = served["ab_updater_failed_version_timestamp_seconds"].samples
    assert sorted(s.labels["version"] for s in failed) == sorted(HOSTILE)
