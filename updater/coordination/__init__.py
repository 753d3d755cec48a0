"""Reboot coordination of a fleet: a group's reboot lock behind one Protocol.

`make_lock(config, node_id)` is the way in (None for backend "none"); the Protocol, the
error and the registry are in `base`, each backend is a module of its own (`etcd`).
"""

from updater.coordination.base import (
    BACKENDS,
    CoordinationUnavailable,
    RebootLock,
    make_lock,
)

__all__ = ["BACKENDS", "CoordinationUnavailable", "RebootLock", "make_lock"]
