"""`update-mirror`: a verified mirror of a signed update repository, for air-gapped sites.

The mirror holds no keys: it verifies upstream with the agent's own TUF code
(`core.repository`), keeps verified bytes in an object store and publishes states
atomically (`mirror.store`), reports on and exports the served state (`mirror.state`),
and serves it over HTTP (`mirror.server`). `mirror.cli` is the command line.

This module is the package's API: `mirror.sync(...)`, `mirror.verify(...)`, ...
"""

from mirror.state import expiry, export, metadata_files, status, verify
from mirror.upstream import SyncResult, Wanted, plan_targets, sync, unsafe_targets

__all__ = [
    "SyncResult",
    "Wanted",
    "expiry",
    "export",
    "metadata_files",
    "plan_targets",
    "status",
    "sync",
    "unsafe_targets",
    "verify",
]
