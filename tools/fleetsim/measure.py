"""The figures and invariants of a simulated rollout, from what the agents logged, what
nginx logged and what the nodes' journals and grubenvs hold afterwards.

Pure functions over those records (the caller reads the files): nothing here asks the
agent's code what it would have done. A node's wave is computed from the signed plan and
the position rule of docs/fleet.md (sha256 of machine id, hardware and version joined by
NUL; the first 8 bytes over 2**64), independently of `updater.rollout`.

    lock_intervals(events)            node -> [(took, committed)] from the agent's log
    max_overlap(intervals)            the most nodes between "took" and "committed"
    wave_of(plan, machine_id, ...)    the wave a node belongs to, and its start
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tools.fleetsim.nginx import Request

# The agent's log templates this reads (updater/agent.py, updater/fleet.py).
TOOK = "took a reboot slot of group %s"
COMMITTED = "slot %s (%s) passed its health checks: committed"
RELEASED = "released the reboot lock of group %s"
INSTALLING = "installing %s into slot %s"
WAITING = "waiting: %s"


def logs(events: Iterable[Mapping[str, Any]], msg: str) -> dict[str, list[float]]:
    """node -> the times (sorted) the agent logged the template `msg` for it."""
    found: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("kind") == "log" and e.get("msg") == msg and e.get("node"):
            found[e["node"]].append(float(e["t"]))
    return {n: sorted(ts) for n, ts in found.items()}


def lock_intervals(
    events: Sequence[Mapping[str, Any]], end: float
) -> dict[str, list[tuple[float, float]]]:
    """node -> each span from "took a reboot slot" to the next "committed" (or `end`:
    a node that never committed holds its slot to the end of the run)."""
    took, committed = logs(events, TOOK), logs(events, COMMITTED)
    spans: dict[str, list[tuple[float, float]]] = {}
    for node, starts in took.items():
        commits = committed.get(node, [])
        spans[node] = []
        for start in starts:
            after = [c for c in commits if c >= start]
            spans[node].append((start, after[0] if after else end))
    return spans


def max_overlap(spans: Iterable[tuple[float, float]]) -> tuple[int, float | None]:
    """The largest number of spans open at one moment, and the first such moment. A
    span that ends exactly when another starts does not overlap it."""
    points = []
    for start, stop in spans:
        points.append((start, 1))
        points.append((stop, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # ends before starts at the same time
    best, when, now = 0, None, 0
    for t, d in points:
        now += d
        if now > best:
            best, when = now, t
    return best, when


def position_bits(machine_id: str, hardware: str, version: str) -> int:
    """The node's position as the first 8 bytes of the digest (position = bits / 2**64)."""
    digest = hashlib.sha256(f"{machine_id}\0{hardware}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def wave_of(
    waves: Sequence[tuple[float, float]], machine_id: str, hardware: str, version: str
) -> tuple[int, float]:
    """(index, start) of the wave of a node; `waves` are (cumulative share, start)."""
    bits = position_bits(machine_id, hardware, version)
    for i, (share, start) in enumerate(waves):
        if bits < share * 2**64:
            return i, start
    raise ValueError(f"position {bits / 2**64} beyond the last wave's share")


def per_node(
    requests: Iterable[Request], phase: str, nodes: Iterable[str]
) -> dict[str, list[Request]]:
    """node -> its requests (from its User-Agent) of `phase`; every node is a key."""
    found: dict[str, list[Request]] = {n: [] for n in nodes}
    for r in requests:
        if r.phase == phase and r.node in found:
            found[r.node].append(r)
    return found


def traffic(by_node: Mapping[str, Sequence[Request]]) -> dict[str, Any]:
    """Requests and bytes per node (mean, min, max) and what was asked, counted."""
    counts = [len(rs) for rs in by_node.values()]
    sent = [sum(r.bytes_sent for r in rs) for rs in by_node.values()]
    images = [
        sum(r.bytes_sent for r in rs if r.uri.startswith("/targets/")) for rs in by_node.values()
    ]
    kinds = Counter(f"{r.method} {_kind(r.uri)} {r.status}" for rs in by_node.values() for r in rs)
    return {
        "requests_per_node": spread(counts),
        "bytes_per_node": spread(sent),
        "image_bytes_per_node": spread(images),
        "requests": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
    }


def _kind(uri: str) -> str:
    """A URI with the parts that differ per version replaced, to count alike requests:
    /metadata/3.root.json -> /metadata/N.root.json, targets by their file name tail."""
    if uri.startswith("/metadata/"):
        name = uri.rsplit("/", 1)[1]
        head, _, rest = name.partition(".")
        return f"/metadata/{'N.' + rest if head.isdigit() else name}"
    if uri.startswith("/targets/"):
        parts = uri.split("/")
        return "/targets/" + "/".join(parts[2:-1]) + "/<sha256>." + parts[-1].split(".", 1)[1]
    return uri


def spread(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0, "min": 0, "max": 0}
    return {
        "mean": round(statistics.fmean(values), 2),
        "min": min(values),
        "max": max(values),
    }
