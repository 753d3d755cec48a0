"""The fleet part of the agent's configuration: `[coordination]`, `[metrics]` and the
maintenance windows of `[daemon]` (issue 12), read by `updater.config`.

Kept apart so config.py stays about one node; the invariants are config.py's (every
key validated, unknown keys are errors, every problem is one line naming the file, the
table and the key). Besides them:

* coordination is on only when `backend` says so: with backend "none" (the default)
  every other `[coordination]` key is an error, so `endpoints = [...]` without
  `backend = "etcd"` cannot leave a fleet rebooting uncoordinated;
* TLS files (`ca`, `cert`, `key`) need an https endpoint, `cert` and `key` go together,
  `quorum_endpoints` needs `etcd_member`: a setting that would be silently unused is an
  error;
* `windows` and `timezone` are checked by `updater.windows.parse_windows`, the parser
  the agent uses, so a config that loads has windows the agent can apply; the zone is
  read from the tz database (or the tzdata package) here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.release import check_name
from updater.coordination.base import BACKENDS
from updater.windows import WindowError, parse_windows

if TYPE_CHECKING:  # updater.config imports this module
    from updater.config import _Table

# The registry's names (a new backend module is known here at once); "none": no lock.
COORDINATION_BACKENDS = tuple(sorted(BACKENDS))
ETCD_SCHEMES = ("http", "https")
METRICS_SUFFIX = ".prom"  # node_exporter's textfile collector reads only *.prom files


@dataclass(frozen=True)
class CoordinationConfig:
    backend: str = "none"  # "none" | "etcd"
    endpoints: tuple[str, ...] = ()  # http(s) URLs of etcd client endpoints; required for etcd
    ca: Path | None = None  # PEM bundle the endpoints' certificates are checked against
    cert: Path | None = None  # client certificate; cert and key together or neither
    key: Path | None = None
    group: str = "default"  # nodes of one group share one semaphore
    max_concurrent: int = 1  # nodes of the group between "lock taken" and "committed"
    prefix: str = "/ab-updater/reboot-lock"  # etcd key prefix: the lock is <prefix>/<group>
    timeout: float = 10.0  # seconds, per request
    node_id: str | None = None  # None: the machine id
    # This node's etcd member name: it reboots only if the cluster keeps quorum without it.
    etcd_member: str | None = None
    quorum_endpoints: tuple[str, ...] = ()  # the cluster of that member; (): endpoints


@dataclass(frozen=True)
class MetricsConfig:
    # node_exporter textfile, e.g. /var/lib/node_exporter/textfile/updater.prom; None: off
    path: Path | None = None


def daemon_windows(t: _Table) -> tuple[tuple[str, ...], str]:
    """`[daemon] windows` and `timezone`, checked by the parser the agent uses."""
    specs = t.strings("windows")
    timezone = t.string("timezone") or "UTC"
    try:
        parse_windows(specs, timezone)
    except WindowError as err:
        if err.index is None:
            raise t.error("timezone", err.reason) from err
        raise t.error(f"windows[{err.index}]", err.described) from err
    return specs, timezone


def coordination(t: _Table) -> CoordinationConfig:
    backend = t.string("backend") or CoordinationConfig.backend
    if backend not in COORDINATION_BACKENDS:
        known = ", ".join(COORDINATION_BACKENDS)
        raise t.value_error("backend", backend, f"is not a coordination backend (known: {known})")
    if backend == "none":
        others = sorted(set(t.data) - {"backend"})
        if others:
            raise t.error(
                others[0],
                'only used with backend = "etcd" (backend is "none": no coordination)',
            )
        t.finish()
        return CoordinationConfig()

    endpoints = t.urls("endpoints", ETCD_SCHEMES)
    if not endpoints:
        raise t.error("endpoints", f'missing (required with backend = "{backend}")')
    etcd_member = _name(t, "etcd_member")
    quorum_endpoints = t.urls("quorum_endpoints", ETCD_SCHEMES)
    if quorum_endpoints and etcd_member is None:
        raise t.error("quorum_endpoints", "only used with etcd_member (the member they serve)")
    ca, cert, key = t.path("ca"), t.path("cert"), t.path("key")
    if (cert is None) != (key is None):
        missing, given = ("key", "cert") if key is None else ("cert", "key")
        raise t.error(missing, f"missing (required with {given}: a client certificate needs both)")
    https = any(url.lower().startswith("https:") for url in (*endpoints, *quorum_endpoints))
    for name, value in (("ca", ca), ("cert", cert), ("key", key)):
        if value is not None and not https:
            raise t.error(name, "only used with https:// endpoints (every endpoint is http://)")
    config = CoordinationConfig(
        backend=backend,
        endpoints=endpoints,
        ca=ca,
        cert=cert,
        key=key,
        group=_name(t, "group") or CoordinationConfig.group,
        max_concurrent=t.integer("max_concurrent", 1, minimum=1, maximum=10000),
        prefix=_prefix(t),
        timeout=t.number("timeout", 10.0, minimum=0.1, maximum=3600),
        node_id=_name(t, "node_id"),
        etcd_member=etcd_member,
        quorum_endpoints=quorum_endpoints,
    )
    t.finish()
    return config


def metrics(t: _Table) -> MetricsConfig:
    path = t.path("path")
    if path is not None and not path.name.endswith(METRICS_SUFFIX):
        raise t.value_error(
            "path",
            str(path),
            f"does not end in {METRICS_SUFFIX} (node_exporter's textfile collector "
            f"reads only *{METRICS_SUFFIX} files)",
        )
    t.finish()
    return MetricsConfig(path=path)


def _name(t: _Table, key: str) -> str | None:
    """A name with the rule of hardware and channel names (check_name)."""
    value = t.string(key)
    if value is None:
        return None
    try:
        return check_name(key, value)
    except ValueError as err:
        raise t.error(key, str(err)) from err


def _prefix(t: _Table) -> str:
    prefix = t.string("prefix") or CoordinationConfig.prefix
    if not prefix.startswith("/"):
        raise t.value_error("prefix", prefix, "does not start with '/'")
    if prefix.endswith("/"):
        raise t.value_error("prefix", prefix, "ends with '/' (the lock is <prefix>/<group>)")
    bad = next((c for c in prefix if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise t.value_error("prefix", prefix, f"contains the control character {bad!r}")
    return prefix
