"""The reboot lock on etcd (locksmith's semaphore), through etcd's JSON gateway with etcd3gw.

One key per group, `<prefix>/<group>`, holds locksmith's JSON layout:

    {"semaphore": 1, "max": 2, "holders": ["<node id>"]}

`holders` are the nodes holding a slot, in the order they took it; `max` is the limit
the last writer enforced (its configured `max_concurrent`: nodes of one group should
agree) and `semaphore` the slots left. A node takes or gives back a slot by reading the
key and writing the new value in one etcd transaction that compares the key's
`mod_revision` with the one it read (`create_revision == 0` when the key is absent): a
compare-and-swap, so concurrent nodes never lose each other's update. On a conflict the
transaction's failure branch returns the current value and the node decides again, a
bounded number of times (`MAX_ATTEMPTS`; from the second conflict on after a random
backoff and a fresh read). The value has no lease:
a holder's slot survives its reboot, and a node that never comes back keeps it until an
operator releases it.

Requests go to the configured endpoints in turn, starting with the last that answered;
each is bounded by the configured timeout (connect and read). Reads are linearizable, so
a member cut off from the quorum does not answer from stale data. TLS: the CA, client
certificate and key of the config are handed to every client; proxies of the
environment are not used (the cluster is inside the site).

`quorum_without(member)` lists the cluster's members (`quorum_endpoints`, else the
lock's endpoints), checks every OTHER voting member over its own client URLs (its status
names it and a leader, no alarm, and a linearizable read goes through), and says None
only if the healthy others are a quorum of all voting members (n // 2 + 1) - the member
may then reboot without the cluster losing quorum (Talos checks the others' health the
same way before an upgrade).

Invariants: every failure is a `CoordinationUnavailable` whose one line is
`coordination: etcd at <endpoints>: <why>`; a stored value that is not exactly the
layout above (bad JSON, wrong types, unknown keys, more than MAX_HOLDERS holders, an
invalid node id, a max out of range, over MAX_VALUE bytes) is refused the same way and
never overwritten - the operator sees it, no slot is taken on guesswork.
"""

from __future__ import annotations

import base64
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors

from core.errors import ConfigError
from core.textparse import loads_json
from updater.coordination.base import (
    MAX_HOLDERS,
    CoordinationSettings,
    CoordinationUnavailable,
    check_node_id,
)

T = TypeVar("T")

# etcd >= 3.4 serves its gateway at /v3/ (3.4 also at /v3beta/, which 3.5 removed).
# Named here so etcd3gw does not discover it with an extra GET /version per client.
API_PATH = "/v3/"
DEFAULT_PORT = 2379
MAX_ATTEMPTS = 32  # compare-and-swap attempts of one acquire or release
MAX_VALUE = 4 << 20  # bytes: 10000 holders of the longest id fit with room to spare
_BACKOFF = 0.02  # seconds, doubled per conflict, capped at _BACKOFF_CAP
_BACKOFF_CAP = 1.0
_LAYOUT = frozenset({"semaphore", "max", "holders"})


@dataclass(frozen=True)
class Semaphore:
    """A group's lock value (locksmith's layout), valid by construction of `parse`."""

    max: int
    holders: tuple[str, ...]

    def to_bytes(self) -> bytes:
        free = max(0, self.max - len(self.holders))
        doc = {"semaphore": free, "max": self.max, "holders": list(self.holders)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Semaphore:
        """The value stored in the key; ValueError (one line) if it is not the layout."""
        if len(raw) > MAX_VALUE:
            raise ValueError(f"value of {len(raw)} bytes is larger than {MAX_VALUE}")
        try:
            doc = loads_json(raw)
        except ValueError as err:
            raise ValueError(f"value is not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"value is a JSON {type(doc).__name__}, not an object")
        if set(doc) != _LAYOUT:
            extra = sorted(set(doc) - _LAYOUT)
            missing = sorted(_LAYOUT - set(doc))
            raise ValueError(
                f"value has unknown keys {extra}" if extra else f"value lacks keys {missing}"
            )
        for name in ("semaphore", "max"):
            number = doc[name]
            if type(number) is not int or not 0 <= number <= MAX_HOLDERS:
                raise ValueError(f"{name} {_short(number)} is not an integer in 0..{MAX_HOLDERS}")
        holders = doc["holders"]
        if not isinstance(holders, list):
            raise ValueError(f"holders is a JSON {type(holders).__name__}, not a list")
        if len(holders) > MAX_HOLDERS:
            raise ValueError(f"{len(holders)} holders, more than {MAX_HOLDERS}")
        for i, holder in enumerate(holders):
            check_node_id(holder, f"holders[{i}]")
        if len(set(holders)) != len(holders):
            raise ValueError("holders names a node twice")
        return cls(max=doc["max"], holders=tuple(holders))


def _short(value: object, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@dataclass(frozen=True)
class _Endpoint:
    url: str
    protocol: str
    host: str
    port: int


def parse_endpoint(url: str) -> _Endpoint:
    """An etcd client URL (`http(s)://host[:port]`); ConfigError naming it otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as err:
        raise ConfigError(f"coordination: endpoint {url!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"coordination: endpoint {url!r}: not an http(s)://host[:port] URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"coordination: endpoint {url!r}: has more than scheme, host and port")
    return _Endpoint(url.rstrip("/"), parts.scheme, parts.hostname, port)


@dataclass(frozen=True)
class _TLS:
    ca: Path | None
    cert: Path | None
    key: Path | None
    timeout: float

    def client(self, endpoint: _Endpoint) -> etcd3gw.Etcd3Client:
        client = etcd3gw.client(
            host=endpoint.host,
            port=endpoint.port,
            protocol=endpoint.protocol,
            ca_cert=str(self.ca) if self.ca else None,
            cert_cert=str(self.cert) if self.cert else None,
            cert_key=str(self.key) if self.key else None,
            timeout=self.timeout,
            api_path=API_PATH,
        )
        client.session.trust_env = False  # no proxies or netrc from the environment
        return client


_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_SSL_RE = re.compile(r"\[SSL: [A-Z_]+\] ([^'\")(\]]+)")


def _why(err: Exception, timeout: float) -> str:
    """One short phrase for a failed request (etcd3gw wraps requests' long messages)."""
    text = err.detail_text if isinstance(err, etcd_errors.Etcd3Exception) else None
    text = text or str(err) or type(err).__name__
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error") or body.get("message"), str):
        return _short(body.get("error") or body.get("message"), 160).strip("'\"")
    if isinstance(err, etcd_errors.ConnectionTimeoutError) or "timed out" in text:
        return f"no answer within {timeout:g} s"
    for pattern, prefix in ((_SSL_RE, "TLS: "), (_ERRNO_RE, "")):
        found = pattern.search(text)
        if found:
            return prefix + found.group(1).strip().lower()
    return _short(" ".join(text.split()), 160).strip("'\"")


# What one request to one endpoint may raise: etcd3gw's errors, requests' own (TLS
# setup, a broken body), a non-JSON body, or an answer of an unexpected shape.
_REQUEST_ERRORS = (
    etcd_errors.Etcd3Exception,
    requests.RequestException,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    OSError,
)


class _Pool:
    """Clients of a list of endpoints, tried in turn from the last that answered."""

    def __init__(self, endpoints: Sequence[_Endpoint], tls: _TLS) -> None:
        self.endpoints = tuple(endpoints)
        self.tls = tls
        self._clients = [tls.client(e) for e in self.endpoints]
        self._preferred = 0
        self.label = ", ".join(e.url for e in self.endpoints)

    def unavailable(self, why: str) -> CoordinationUnavailable:
        return CoordinationUnavailable(f"coordination: etcd at {self.label}: {why}")

    def call(self, what: str, op: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        reasons = []
        count = len(self._clients)
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                result = op(self._clients[index])
            except _REQUEST_ERRORS as err:
                reasons.append(f"{self.endpoints[index].url}: {_why(err, self.tls.timeout)}")
                continue
            self._preferred = index
            return result
        raise self.unavailable(f"{what}: no endpoint answered ({'; '.join(reasons)})")


def _kv_value(kvs: object) -> tuple[bytes | None, int]:
    """(value, mod_revision) of the one key of a range answer; (None, 0) if absent."""
    if not kvs:
        return None, 0
    if not isinstance(kvs, list) or not isinstance(kvs[0], dict):
        raise TypeError("range answer is not a list of keys")
    kv = kvs[0]
    return base64.b64decode(kv.get("value", ""), validate=True), int(kv["mod_revision"])


class EtcdLock:
    """The `RebootLock` of one group on an etcd cluster (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        group: str,
        max_concurrent: int,
        prefix: str = "/ab-updater/reboot-lock",
        timeout: float = 10.0,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        quorum_endpoints: Sequence[str] = (),
    ) -> None:
        if not endpoints:
            raise ConfigError("coordination: backend etcd needs endpoints")
        if not 1 <= max_concurrent <= MAX_HOLDERS:
            raise ConfigError(f"coordination: max_concurrent must be in 1..{MAX_HOLDERS}")
        if (cert is None) != (key is None):
            raise ConfigError("coordination: cert and key go together")
        tls = _TLS(ca=ca, cert=cert, key=key, timeout=timeout)
        self.pool = _Pool([parse_endpoint(u) for u in endpoints], tls)
        self.quorum_pool = (
            _Pool([parse_endpoint(u) for u in quorum_endpoints], tls)
            if quorum_endpoints
            else self.pool
        )
        self.tls = tls
        self.max_concurrent = max_concurrent
        self.key = f"{prefix.rstrip('/')}/{group}"

    @classmethod
    def from_config(cls, config: CoordinationSettings, node_id: str) -> EtcdLock:
        """The lock of `config`'s group (node_id is checked by `make_lock`; the lock's
        methods name the node they act for)."""
        return cls(
            config.endpoints,
            group=config.group,
            max_concurrent=config.max_concurrent,
            prefix=config.prefix,
            timeout=config.timeout,
            ca=config.ca,
            cert=config.cert,
            key=config.key,
            quorum_endpoints=config.quorum_endpoints,
        )

    # --- the semaphore ------------------------------------------------------------

    def _parse(self, raw: bytes | None) -> Semaphore | None:
        if raw is None:
            return None
        try:
            return Semaphore.parse(raw)
        except ValueError as err:
            raise self.pool.unavailable(f"key {self.key}: {err}") from None

    def _read(self) -> tuple[Semaphore | None, int]:
        def op(client: etcd3gw.Etcd3Client) -> tuple[bytes | None, int]:
            answer = client.post(client.get_url("/kv/range"), json={"key": _b64(self.key)})
            return _kv_value(answer.get("kvs"))

        raw, revision = self.pool.call(f"read {self.key}", op)
        return self._parse(raw), revision

    def _swap(self, revision: int, new: Semaphore) -> tuple[bool, Semaphore | None, int]:
        """Write `new` if the key is still at `revision` (0: still absent). (True, ...)
        when written; else (False, the current value, its revision)."""
        key = _b64(self.key)
        compare = (
            {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision}
            if revision
            else {"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}
        )
        txn = {
            "compare": [compare],
            "success": [{"request_put": {"key": key, "value": _b64(new.to_bytes())}}],
            "failure": [{"request_range": {"key": key}}],
        }

        def op(client: etcd3gw.Etcd3Client) -> tuple[bool, bytes | None, int]:
            answer = client.transaction(txn)
            # proto3 JSON leaves out a false `succeeded`.
            if answer.get("succeeded") is True:
                return True, None, 0
            ranged = answer["responses"][0]["response_range"]
            return (False, *_kv_value(ranged.get("kvs")))

        done, raw, current = self.pool.call(f"update {self.key}", op)
        return done, (None if done else self._parse(raw)), current

    def _update(self, decide: Callable[[Semaphore | None], tuple[bool, Semaphore | None]]) -> bool:
        """Read, `decide` (-> answer, new value or None to write nothing), swap; again
        on a conflict, at most MAX_ATTEMPTS times. The first retry decides on the value
        the failed transaction returned (current, no extra request); later ones back
        off first, then read again - a value read before a sleep is stale after it."""
        state, revision = self._read()
        for attempt in range(MAX_ATTEMPTS):
            answer, new = decide(state)
            if new is None:
                return answer
            done, state, revision = self._swap(revision, new)
            if done:
                return answer
            if attempt:
                time.sleep(random.uniform(0, min(_BACKOFF * 2**attempt, _BACKOFF_CAP)))
                state, revision = self._read()
        raise self.pool.unavailable(
            f"key {self.key}: gave up after {MAX_ATTEMPTS} conflicting updates"
        )

    def acquire(self, node_id: str) -> bool:
        node_id = self._node(node_id)

        def decide(state: Semaphore | None) -> tuple[bool, Semaphore | None]:
            holders = state.holders if state else ()
            if node_id in holders:
                return True, None
            if len(holders) >= self.max_concurrent:
                return False, None
            return True, Semaphore(self.max_concurrent, (*holders, node_id))

        return self._update(decide)

    def release(self, node_id: str) -> bool:
        node_id = self._node(node_id)
        # A swap whose answer was lost (a timeout, then the next endpoint) may have
        # applied: having seen the node as a holder during this call, its absence now
        # means it is released.
        seen = False

        def decide(state: Semaphore | None) -> tuple[bool, Semaphore | None]:
            nonlocal seen
            holders = state.holders if state else ()
            if node_id not in holders:
                return seen, None
            seen = True
            rest = tuple(h for h in holders if h != node_id)
            return True, Semaphore(self.max_concurrent, rest)

        return self._update(decide)

    def holders(self) -> tuple[str, ...]:
        state, _ = self._read()
        return state.holders if state else ()

    def _node(self, node_id: str) -> str:
        try:
            return check_node_id(node_id)
        except ValueError as err:
            raise ConfigError(f"coordination: {err}") from None

    # --- quorum -------------------------------------------------------------------

    def quorum_without(self, member: str) -> str | None:
        def op(client: etcd3gw.Etcd3Client) -> list[dict[str, Any]]:
            members = client.members()
            if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
                raise ValueError("member list is not a list of members")
            return [dict(m) for m in members]

        members = [m for m in self.quorum_pool.call("list members", op) if not m.get("isLearner")]
        names = [str(m.get("name", "")) for m in members]
        if member not in names:
            listed = ", ".join(n or "(unstarted)" for n in names)
            return f"etcd member {member!r} is not a voting member of the cluster ({listed})"
        others = [m for m in members if m.get("name") != member]
        needed = len(members) // 2 + 1
        with ThreadPoolExecutor(max_workers=max(1, min(len(others), 16))) as pool:
            verdicts = list(pool.map(self._member_health, others))
        healthy = verdicts.count(None)
        if healthy >= needed:
            return None
        sick = "; ".join(v for v in verdicts if v is not None)
        return (
            f"rebooting etcd member {member} would lose quorum: {healthy} of the "
            f"{len(others)} other members healthy, {needed} of {len(members)} needed ({sick})"
        )

    def _member_health(self, member: dict[str, Any]) -> str | None:
        """None if the member answers over one of its client URLs as itself, with a
        leader, no alarm, and a linearizable read; else one phrase saying why not."""
        name = str(member.get("name") or f"(unstarted, id {member.get('ID')})")
        urls = member.get("clientURLs") or []
        if not member.get("name") or not isinstance(urls, list) or not urls:
            return f"{name}: not started"
        reasons = []
        for url in urls:
            try:
                endpoint = parse_endpoint(str(url))
            except ConfigError:
                reasons.append(f"{_short(url)}: not an http(s) client URL")
                continue
            client = self.tls.client(endpoint)
            try:
                status = client.status()
                why = _status_problem(status, str(member.get("ID")))
                if why is None:
                    # Linearizable: goes through only if this member reaches a quorum.
                    client.get(self.key, count_only=True)
                    return None
                reasons.append(f"{endpoint.url}: {why}")
            except _REQUEST_ERRORS as err:
                reasons.append(f"{endpoint.url}: {_why(err, self.tls.timeout)}")
            finally:
                client.session.close()
        return f"{name}: {', '.join(reasons)}"


def _status_problem(status: Any, member_id: str) -> str | None:
    if not isinstance(status, dict):
        return "status is not an object"
    header = status.get("header")
    answered = header.get("member_id") if isinstance(header, dict) else None
    if answered != member_id:
        return f"answers as member {_short(answered)}, not {member_id}"
    errors = status.get("errors")
    if errors:
        return _short(errors, 120)
    if status.get("leader") in (None, "", "0"):
        return "no leader"
    return None
