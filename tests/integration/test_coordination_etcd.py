"""The etcd reboot lock against a REAL 3-member etcd cluster (Debian's etcd-server 3.4 on
127.0.0.1, tests/etcdcluster.py): contention never exceeds max_concurrent and everyone
gets a turn; a killed member (the leader, the endpoint every lock prefers) does not stop
it; a whole cluster down is one line, bounded by the timeout; quorum_without as Talos
decides it; hostile values in the key are refused in one line and never overwritten;
TLS client certificates reach the server; etcd3gw talks to the gateway path 3.4 serves.

No timed assertions: every wait is a bounded loop, every thread is joined with a bound.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import etcd3gw
import pytest
import requests

from core.errors import ConfigError
from tests.bounded import within
from tests.etcdcluster import EtcdCluster, cluster, etcd_cluster, make_tls, shared_etcd_cluster
from tests.unit.test_coordination import HOSTILE, Settings
from updater.coordination import CoordinationUnavailable, make_lock
from updater.coordination.etcd import API_PATH, EtcdLock

__all__ = ["etcd_cluster", "shared_etcd_cluster"]

T = TypeVar("T")
BOUND = 180.0  # seconds for a whole contention run; far more than it needs
FINISH_TRIES = 100  # 0.2 s apart: a cluster that recovers does so within seconds


def lock_on(endpoints: tuple[str, ...], group: str, max_concurrent: int = 2, **kw: Any) -> EtcdLock:
    settings = replace(
        Settings(backend="etcd", endpoints=endpoints, group=group, max_concurrent=max_concurrent),
        **kw,
    )
    lock = make_lock(settings, "unused-node")
    assert isinstance(lock, EtcdLock)
    return lock


def raw_client(url: str) -> etcd3gw.Etcd3Client:
    host, port = url.removeprefix("http://").split(":")
    return etcd3gw.client(host=host, port=int(port), api_path=API_PATH, timeout=30)


def raw_get(url: str, key: str) -> tuple[bytes, int] | None:
    found = raw_client(url).get(key, metadata=True)
    return (found[0][0], int(found[0][1]["mod_revision"])) if found else None


def leader_first(c: EtcdCluster) -> tuple[str, tuple[str, ...]]:
    """(name of the leader, the endpoints with the leader's first)."""
    status = raw_client(c.endpoints[0]).status()
    ids = {m["ID"]: m["name"] for m in raw_client(c.endpoints[0]).members()}
    leader = ids[status["leader"]]
    rest = tuple(e for n, e in zip(c.members, c.endpoints, strict=True) if n != leader)
    return leader, (c.endpoint(leader), *rest)


# --- contention ---------------------------------------------------------------------


class _Stopped(Exception):
    """A contender stopped by the test while it waited for the cluster."""


@dataclass
class Contention:
    """N contenders taking turns on one group, and a checker reading the key."""

    endpoints: tuple[str, ...]
    group: str
    contenders: int
    max_concurrent: int = 2
    turns: dict[str, int] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    most_seen: int = 0  # by the checker, in etcd
    most_local: int = 0  # nodes between "acquire returned True" and "release called"
    reads: int = 0
    _holding: set[str] = field(default_factory=set)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.contenders):
            node = f"node-{i:02d}"
            self.turns[node] = 0
            self._threads.append(threading.Thread(target=self._guard(self._contend, node)))
        self._threads.append(threading.Thread(target=self._guard(self._check)))
        for t in self._threads:
            t.daemon = True
            t.start()

    def _guard(self, fn: Callable[..., None], *args: str) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(*args)
            except _Stopped:
                pass
            except BaseException as err:  # reported by the test, not lost in a thread
                self.errors.append(err)

        return run

    def _retry(self, call: Callable[[], T], finish: bool = False) -> T:
        """`call()`, again while the cluster cannot answer (an agent's next cycle).
        Stopped by the test unless `finish`: a turn that was taken is completed (at most
        `FINISH_TRIES` tries), so the group is empty at the end."""
        tries = 0
        while finish or not self._stop.is_set():
            try:
                return call()
            except CoordinationUnavailable as err:
                self.unavailable.append(str(err))
                tries += 1
                if finish and tries >= FINISH_TRIES:
                    raise
                time.sleep(0.2)
        raise _Stopped

    def _contend(self, node: str) -> None:
        lock = lock_on(self.endpoints, self.group, self.max_concurrent)
        rng = random.Random(node)
        while not self._stop.is_set():
            if not self._retry(lambda: lock.acquire(node)):
                time.sleep(rng.uniform(0.005, 0.03))
                continue
            with self._mutex:
                self._holding.add(node)
                self.most_local = max(self.most_local, len(self._holding))
            # idempotent for a holder
            assert self._retry(lambda: lock.acquire(node), finish=True) is True
            time.sleep(rng.uniform(0.005, 0.02))
            with self._mutex:
                self._holding.discard(node)
                self.turns[node] += 1
            if not self._retry(lambda: lock.release(node), finish=True):
                # Only after a retry whose first answer was lost; it holds nothing now.
                assert node not in self._retry(lock.holders, finish=True)
            time.sleep(rng.uniform(0.005, 0.03))

    def _check(self) -> None:
        lock = lock_on(self.endpoints, self.group, self.max_concurrent)
        while not self._stop.is_set():
            try:
                holders = lock.holders()
            except CoordinationUnavailable:
                time.sleep(0.05)
                continue
            self.reads += 1
            self.most_seen = max(self.most_seen, len(holders))

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + BOUND
        while not done():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"{what}: not within {BOUND:.0f} s: {self.turns}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads)


@pytest.fixture
def contention() -> Iterator[list[Contention]]:
    runs: list[Contention] = []
    yield runs
    for run in runs:  # threads stopped even when the test failed
        run.stop()


def test_contenders_never_exceed_max_concurrent_and_each_gets_turns(
    shared_etcd_cluster: EtcdCluster, contention: list[Contention]
) -> None:
    run = Contention(shared_etcd_cluster.endpoints, "contend", contenders=12)
    contention.append(run)
    run.start()
    run.wait_until(lambda: min(run.turns.values()) >= 3, "3 turns for each of 12 contenders")
    run.stop()
    assert not run.errors and not run.unavailable
    assert run.most_seen <= 2 and run.most_local <= 2
    assert max(run.most_seen, run.most_local) == 2  # the limit was reached, not just kept
    assert run.reads > 0 and sum(run.turns.values()) >= 36
    assert lock_on(shared_etcd_cluster.endpoints, "contend").holders() == ()


def test_a_killed_leader_mid_contention_does_not_stop_the_rollout(
    etcd_cluster: EtcdCluster, contention: list[Contention]
) -> None:
    leader, endpoints = leader_first(etcd_cluster)  # every lock prefers the leader
    run = Contention(endpoints, "killed", contenders=6)
    contention.append(run)
    run.start()
    run.wait_until(lambda: sum(run.turns.values()) >= 6, "6 turns before the kill")
    etcd_cluster.kill(leader)
    before = dict(run.turns)
    run.wait_until(
        lambda: all(run.turns[n] >= before[n] + 2 for n in before),
        "2 more turns for each contender after the leader was killed",
    )
    run.stop()
    assert not run.errors
    assert run.most_seen <= 2 and run.most_local <= 2
    # Whatever failed during the election was one line naming the endpoints.
    assert all(u.startswith(f"coordination: etcd at {endpoints[0]}, ") for u in run.unavailable)


# --- the lock's answers ---------------------------------------------------------------


def test_acquire_is_idempotent_and_a_non_holder_cannot_release(
    shared_etcd_cluster: EtcdCluster,
) -> None:
    lock = lock_on(shared_etcd_cluster.endpoints, "answers")
    url = shared_etcd_cluster.endpoints[1]
    assert lock.holders() == ()
    assert lock.release("a") is False  # no key yet: nothing written
    assert raw_get(url, lock.key) is None
    assert lock.acquire("a") is True
    value, revision = raw_get(url, lock.key) or (b"", 0)
    assert json.loads(value) == {"semaphore": 1, "max": 2, "holders": ["a"]}
    assert lock.acquire("a") is True
    assert lock.release("b") is False
    assert raw_get(url, lock.key) == (value, revision)  # neither wrote anything
    assert lock.acquire("b") is True
    assert lock.acquire("c") is False  # full
    assert lock.holders() == ("a", "b")
    assert lock.release("a") is True
    assert lock.release("a") is False
    assert lock.acquire("c") is True
    assert lock.holders() == ("b", "c")
    # The key has no lease: a holder's slot survives its reboot.
    found = raw_client(url).get(lock.key, metadata=True)
    assert "lease" not in found[0][1]


def test_a_lowered_limit_admits_nobody_until_the_group_drains(
    shared_etcd_cluster: EtcdCluster,
) -> None:
    wide = lock_on(shared_etcd_cluster.endpoints, "lowered", max_concurrent=3)
    assert all(wide.acquire(n) for n in ("a", "b", "c"))
    narrow = lock_on(shared_etcd_cluster.endpoints, "lowered", max_concurrent=1)
    assert narrow.acquire("d") is False
    assert narrow.acquire("a") is True  # still a holder
    assert narrow.release("a") and narrow.release("b")
    assert narrow.acquire("d") is False
    assert narrow.release("c") and narrow.acquire("d")
    value, _ = raw_get(shared_etcd_cluster.endpoints[0], narrow.key) or (b"", 0)
    assert json.loads(value) == {"semaphore": 0, "max": 1, "holders": ["d"]}


def test_hostile_values_in_the_key_are_refused_in_one_line_and_kept(
    shared_etcd_cluster: EtcdCluster,
) -> None:
    lock = lock_on(shared_etcd_cluster.endpoints, "hostile")
    url = shared_etcd_cluster.endpoints[0]
    raw = raw_client(url)
    tried = 0
    for value, why in HOSTILE:
        raw.put(lock.key, value)
        stored = raw_get(url, lock.key)
        assert stored is not None and stored[0] == value
        for call in (lambda: lock.acquire("n1"), lambda: lock.release("n1"), lock.holders):
            with pytest.raises(CoordinationUnavailable) as caught:
                call()
            message = str(caught.value)
            assert message.startswith(f"coordination: etcd at {url}, "), message
            assert f": key {lock.key}: " in message and why in message, message
            assert "\n" not in message and len(message) < 500
            tried += 1
        assert raw_get(url, lock.key) == stored  # nothing written over it
    assert tried == 3 * len(HOSTILE)


# --- unavailable ----------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port of 127.0.0.1 that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def test_the_whole_cluster_down_is_one_line_bounded_by_the_timeout(
    etcd_cluster: EtcdCluster, silent_port: int
) -> None:
    endpoints = (*etcd_cluster.endpoints, f"http://127.0.0.1:{silent_port}")
    lock = lock_on(endpoints, "down", timeout=1.0)
    assert lock.acquire("a") is True
    etcd_cluster.stop()
    calls: list[Callable[[], object]] = [
        lambda: lock.acquire("b"),
        lambda: lock.release("a"),
        lock.holders,
        lambda: lock.quorum_without("m0"),
    ]
    for call in calls:
        with pytest.raises(CoordinationUnavailable) as caught:
            within(call)  # the bound of a hang; 1 s per silent endpoint is what it takes
        message = str(caught.value)
        assert message.startswith(f"coordination: etcd at {', '.join(endpoints)}: "), message
        assert "no endpoint answered" in message and "\n" not in message
        assert message.count("connection refused") == 3, message
        assert f"127.0.0.1:{silent_port}: no answer within 1 s" in message, message


# --- quorum ---------------------------------------------------------------------------


def test_quorum_without_a_member_as_talos_decides_it(etcd_cluster: EtcdCluster) -> None:
    lock = lock_on(etcd_cluster.endpoints, "quorum")
    assert [lock.quorum_without(m) for m in etcd_cluster.members] == [None, None, None]
    unknown = lock.quorum_without("m9")
    assert unknown is not None and "'m9' is not a voting member" in unknown
    # The cluster is found through quorum_endpoints when they are given.
    only = lock_on(("http://127.0.0.1:9",), "quorum", quorum_endpoints=(etcd_cluster.endpoints[1],))
    assert only.quorum_without("m0") is None

    etcd_cluster.kill("m2")
    # If m2 led, the other two elect a new leader first; until then neither is healthy
    # and every answer below would be "would lose quorum" (seen under load).
    etcd_cluster.wait_healthy("m0", "m1")
    for member in ("m0", "m1"):
        why = lock.quorum_without(member)
        assert why is not None, member
        assert why.startswith(f"rebooting etcd member {member} would lose quorum: 1 of the 2")
        assert "2 of 3 needed" in why and "m2: " in why and "connection refused" in why
        assert "\n" not in why
    assert lock.quorum_without("m2") is None  # already down: the other two are a quorum

    etcd_cluster.kill("m1")
    # m0 alone has no leader: it still lists members and says why not, for everyone.
    why = lock.quorum_without("m2")
    assert why is not None and "0 of the 2" in why, why


# --- TLS and the gateway path ---------------------------------------------------------


def test_tls_client_certificate_ca_and_key_reach_the_server(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    with cluster(tmp_path, members=1, tls=tls) as c:
        good = lock_on(c.endpoints, "tls", ca=tls.ca, cert=tls.client_cert, key=tls.client_key)
        assert good.acquire("a") is True and good.holders() == ("a",)
        assert good.quorum_without("m0") is not None  # a single member: none left
        cases = {
            "no client certificate": lock_on(c.endpoints, "tls", ca=tls.ca),
            "no CA": lock_on(c.endpoints, "tls", cert=tls.client_cert, key=tls.client_key),
        }
        for case, lock in cases.items():
            with pytest.raises(CoordinationUnavailable) as caught:
                within(lock.holders)
            message = str(caught.value)
            assert message.startswith(f"coordination: etcd at {c.endpoints[0]}: "), case
            assert "\n" not in message, case
            if case == "no CA":
                assert "TLS: certificate verify failed" in message, message


def test_etcd3gw_uses_the_gateway_path_etcd_34_serves(shared_etcd_cluster: EtcdCluster) -> None:
    url = shared_etcd_cluster.endpoints[0]
    version = requests.get(f"{url}/version", timeout=30).json()["etcdserver"]
    assert version.startswith("3.4."), version
    discovered = etcd3gw.client(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), api_path=None)
    assert discovered.api_path == API_PATH == "/v3/"
    key = base64.b64encode(b"probe").decode()
    for path, status in ((API_PATH, 200), ("/v3beta/", 200), ("/v3alpha/", 404)):
        done = requests.post(f"{url}{path}kv/range", json={"key": key}, timeout=30)
        assert done.status_code == status, (path, done.text)


def test_a_bad_endpoint_in_the_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        lock_on(("etcd:2379",), "g")
