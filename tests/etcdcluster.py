"""The real etcd cluster of the tests: the runner is tools/etcdcluster.py (Debian's
`/usr/bin/etcd`, free 127.0.0.1 ports, temp dirs, parent-death signal, bounded waits,
optional client-cert TLS), shared with the fleet benchmark, which imports no test
helper; this module re-exports it and adds the pytest fixtures.

    with EtcdCluster(tmp_path, members=3) as cluster: ...      # see tools/etcdcluster.py

`etcd_cluster` is a function-scoped fixture (tests that kill members get a fresh
cluster); `shared_etcd_cluster` a module-scoped one for tests that only use it. A member
that does not come up fails the test naming it and the tail of its log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.etcdcluster import (
    ETCD,
    MAX_REQUEST_BYTES,
    START_BOUND,
    STOP_BOUND,
    EtcdCluster,
    EtcdClusterError,
    Member,
    TLSFiles,
    cluster,
    free_port,
    health,
    make_tls,
)

__all__ = [
    "ETCD",
    "MAX_REQUEST_BYTES",
    "START_BOUND",
    "STOP_BOUND",
    "EtcdCluster",
    "EtcdClusterError",
    "Member",
    "TLSFiles",
    "cluster",
    "etcd_cluster",
    "free_port",
    "health",
    "make_tls",
    "shared_etcd_cluster",
]


@contextlib.contextmanager
def _failing(root: Path | None) -> Iterator[EtcdCluster]:
    """`cluster(root)`; a cluster that does not come up fails the test (one line)."""
    with contextlib.ExitStack() as stack:
        try:
            started = stack.enter_context(cluster(root))
        except EtcdClusterError as e:
            pytest.fail(str(e))
        yield started


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster for one test (it may kill or stop members)."""
    with _failing(tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
def shared_etcd_cluster() -> Iterator[EtcdCluster]:
    """One 3-member cluster for a whole test module; tests must not kill its members
    and should use keys of their own."""
    with _failing(None) as c:
        yield c
