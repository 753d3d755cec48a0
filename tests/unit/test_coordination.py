"""updater.coordination without a cluster: the registry, node ids, endpoint URLs, and the
parse of a stored semaphore value (every refusal one ValueError line). The lock itself
is proven against a real etcd cluster in tests/integration/test_coordination_etcd.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import ConfigError, UpdateFailed
from updater.coordination import BACKENDS, CoordinationUnavailable, make_lock
from updater.coordination.base import MAX_HOLDERS
from updater.coordination.etcd import EtcdLock, Semaphore, parse_endpoint


@dataclass(frozen=True)
class Settings:
    """The spec's CoordinationConfig fields (updater.config's dataclass has the same)."""

    backend: str = "none"
    endpoints: tuple[str, ...] = ()
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    group: str = "default"
    max_concurrent: int = 1
    prefix: str = "/ab-updater/reboot-lock"
    timeout: float = 10.0
    quorum_endpoints: tuple[str, ...] = ()


def test_backend_none_makes_no_lock() -> None:
    assert make_lock(Settings(), "node-1") is None
    assert set(BACKENDS) >= {"none", "etcd"}
    assert issubclass(CoordinationUnavailable, UpdateFailed)


def test_etcd_backend_makes_an_etcd_lock_without_connecting() -> None:
    # Port 9 (discard) on 127.0.0.1: nothing listens; making the lock must not connect.
    lock = make_lock(Settings(backend="etcd", endpoints=("http://127.0.0.1:9",)), "node-1")
    assert isinstance(lock, EtcdLock)
    assert lock.key == "/ab-updater/reboot-lock/default"


@pytest.mark.parametrize(
    ("settings", "node_id", "message"),
    [
        (Settings(backend="fleetlock"), "n", "coordination: unknown backend 'fleetlock'; known:"),
        (Settings(backend="etcd"), "n", "coordination: backend etcd needs endpoints"),
        (Settings(backend="etcd", endpoints=("h:1",)), "n1", "coordination: endpoint 'h:1': not"),
        (Settings(backend="etcd", endpoints=("ftp://h",)), "n", "coordination: endpoint 'ftp:"),
        (Settings(backend="etcd", endpoints=("http://h/x",)), "n", "coordination: endpoint"),
        (Settings(backend="etcd", endpoints=("http://h:99999",)), "n", "coordination: endpoint"),
        (Settings(backend="etcd", endpoints=("http://h",)), "a b", "coordination: node id 'a b'"),
        (Settings(backend="etcd", endpoints=("http://h",)), "", "coordination: node id ''"),
        (Settings(backend="etcd", endpoints=("http://h",)), "x" * 254, "coordination: node id"),
        (
            Settings(backend="etcd", endpoints=("http://h",), cert=Path("/c")),
            "n",
            "coordination: cert and key go together",
        ),
        (
            Settings(backend="etcd", endpoints=("http://h",), max_concurrent=0),
            "n",
            "coordination: max_concurrent must be in 1..10000",
        ),
    ],
)
def test_bad_settings_are_one_config_error_line(
    settings: Settings, node_id: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_lock(settings, node_id)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_endpoint_urls() -> None:
    assert parse_endpoint("https://[::1]:2379/").host == "::1"
    assert parse_endpoint("http://etcd-0").port == 2379
    assert parse_endpoint("http://127.0.0.1:4001").url == "http://127.0.0.1:4001"


def test_semaphore_round_trip_in_locksmiths_layout() -> None:
    value = Semaphore(max=3, holders=("a", "b")).to_bytes()
    assert json.loads(value) == {"semaphore": 1, "max": 3, "holders": ["a", "b"]}
    assert Semaphore.parse(value) == Semaphore(max=3, holders=("a", "b"))
    # Over-full (the limit was lowered while nodes held slots): no negative count.
    assert json.loads(Semaphore(max=1, holders=("a", "b")).to_bytes())["semaphore"] == 0


HOSTILE: list[tuple[bytes, str]] = [
    (b"", "JSON"),
    (b"not json", "JSON"),
    (b"\xff\xfe\x00", "JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nest"),
    (b"NaN", ""),
    (b"[]", "not an object"),
    (b'{"semaphore":1,"max":2}', "lacks keys ['holders']"),
    (b'{"semaphore":1,"max":2,"holders":[],"x":1}', "unknown keys ['x']"),
    (b'{"semaphore":1,"max":2,"holders":"a"}', "holders is a JSON str"),
    (b'{"semaphore":1,"max":2,"holders":{"a":1}}', "holders is a JSON dict"),
    (b'{"semaphore":1,"max":2,"holders":[1]}', "holders[0]"),
    (b'{"semaphore":1,"max":2,"holders":["a b"]}', "holders[0] 'a b'"),
    (b'{"semaphore":1,"max":2,"holders":["a","a"]}', "twice"),
    (b'{"semaphore":1,"max":1000000000000000000,"holders":[]}', "max 1000000000000000000"),
    (b'{"semaphore":1,"max":-1,"holders":[]}', "max -1"),
    (b'{"semaphore":1,"max":true,"holders":[]}', "max True"),
    (b'{"semaphore":1,"max":2.5,"holders":[]}', "max 2.5"),
    (b'{"semaphore":"x","max":2,"holders":[]}', "semaphore 'x'"),
    (b'{"semaphore":1,"max":2,"holders":[' + b"0," * 10**6 + b"0]}", "1000001 holders"),
    (json.dumps({"semaphore": 0, "max": 2, "holders": ["n"] * 2 * 10**6}).encode(), "larger"),
]


@pytest.mark.parametrize(("raw", "why"), HOSTILE, ids=lambda v: repr(v)[:40])
def test_a_hostile_value_is_one_value_error_line(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        Semaphore.parse(raw)
    assert why in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_holders_up_to_the_bound_parse() -> None:
    ids = [f"node-{i}" for i in range(MAX_HOLDERS)]
    raw = json.dumps({"semaphore": 0, "max": MAX_HOLDERS, "holders": ids}).encode()
    assert len(Semaphore.parse(raw).holders) == MAX_HOLDERS
