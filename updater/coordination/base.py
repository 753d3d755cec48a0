"""The reboot lock of a group of nodes, behind one small Protocol, and the backend registry.

A node takes one slot of its group's semaphore before it reboots into a new slot and
gives it back only after `health-check` has committed that slot (or rolled back to a
healthy one): the slot is held across the reboot, so a node that never comes back keeps
it and the group's rollout stops instead of spreading (locksmith's and airlock's model).
A control-plane node that is an etcd member also asks `quorum_without(member)` first:
it reboots only if the etcd cluster keeps quorum without it (Talos's rule).

Backends are modules of this package, chosen by the config's `backend` name from
`BACKENDS` (so a FleetLock backend is one more module and one more entry; the agent does
not change). They are imported only when a lock is made: the fast commands (`status`,
`health-check` with nothing to release) never load an HTTP client for a lock they do
not use.

Invariants: every failure to reach a backend, or a backend's state this code cannot
trust, is a `CoordinationUnavailable` with one line naming the backend's endpoints -
never a traceback, never a reboot (callers reboot only on `acquire() == True`);
`make_lock` returns None only for backend "none"; an unknown backend name is a
`ConfigError` listing the known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from core.errors import ConfigError, UpdateFailed

# What a node id may be (the machine id, a host name, an FQDN, "rack1/node-7" is not):
# it is stored in a shared JSON list and printed in one-line messages.
NODE_ID_RULE = "1-253 characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")
MAX_HOLDERS = 10000  # the config's bound on max_concurrent; more holders is not our data


class CoordinationUnavailable(UpdateFailed):
    """The coordination backend cannot be reached, cannot answer (no quorum), or holds
    state that cannot be trusted; the node does not reboot and tries again later."""


class RebootLock(Protocol):
    """A group's reboot semaphore (see the module docstring)."""

    def acquire(self, node_id: str) -> bool:
        """True: `node_id` holds a slot now (taken now, or already held); False: the
        group is full."""
        ...

    def release(self, node_id: str) -> bool:
        """True: `node_id` held a slot and it is released now; False: it held none."""
        ...

    def holders(self) -> tuple[str, ...]:
        """The node ids holding a slot, in the order they took it."""
        ...

    def quorum_without(self, member: str) -> str | None:
        """None: the etcd member named `member` may reboot (the others alone are a
        quorum, each of them checked healthy); else one line saying why not."""
        ...


class CoordinationSettings(Protocol):
    """The fields of the config's `[coordination]` table a backend reads
    (`updater.config.CoordinationConfig` has them all)."""

    @property
    def backend(self) -> str: ...
    @property
    def endpoints(self) -> tuple[str, ...]: ...
    @property
    def ca(self) -> Path | None: ...
    @property
    def cert(self) -> Path | None: ...
    @property
    def key(self) -> Path | None: ...
    @property
    def group(self) -> str: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def prefix(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def quorum_endpoints(self) -> tuple[str, ...]: ...


Factory = Callable[[CoordinationSettings, str], RebootLock]


def _etcd(config: CoordinationSettings, node_id: str) -> RebootLock:
    from updater.coordination.etcd import EtcdLock  # loaded only when used

    return EtcdLock.from_config(config, node_id)


# backend name -> factory; "none" (no coordination) makes no lock.
BACKENDS: dict[str, Factory | None] = {"none": None, "etcd": _etcd}


def check_node_id(node_id: object, what: str = "node id") -> str:
    """`node_id` if it follows NODE_ID_RULE, else ValueError naming it and the rule."""
    if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
        shown = repr(node_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"{what} {shown} is not valid ({NODE_ID_RULE})")
    return node_id


def make_lock(config: CoordinationSettings, node_id: str) -> RebootLock | None:
    """The reboot lock of `config`'s group for the node `node_id`, or None for backend
    "none". Makes no network request (a backend connects when first used)."""
    if config.backend not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"coordination: unknown backend {config.backend!r}; known: {known}")
    factory = BACKENDS[config.backend]
    if factory is None:
        return None
    try:
        check_node_id(node_id)
    except ValueError as err:
        raise ConfigError(f"coordination: {err}") from None
    return factory(config, node_id)
