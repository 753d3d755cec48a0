"""What a simulated rollout (`tools.fleetsim.run.Run`) shows: each node's outcome, read
from its files afterwards, and the benchmark's figures.

    nodes = outcomes(run)      # one NodeOutcome per node: wave, install, commit, lock
    figures = report(run)      # the JSON of bench/fleet.py

A node's wave is computed from the signed plan by the position rule of docs/fleet.md
(`measure.wave_of`), its install times are what the agent logged ("installing ..."),
what nginx logged (the first request for an image of the update) and what the journal
recorded (`last_install.at`, whole seconds); its final state is its journal, the slot it
booted, and the slot the model of the shipped GRUB script would boot next from its
grubenv. Reading only: nothing is written, nothing asks the agent.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from core.release import format_time
from tools.fleetsim import measure
from tools.fleetsim.fleet import HARDWARE, NEW
from tools.fleetsim.run import Phase, Run
from tools.powercut.grubmodel import grub_decide
from updater.state import load_journal


@dataclass(frozen=True)
class NodeOutcome:
    name: str
    group: str
    wave: int
    wave_start: float
    installing_logged: float | None  # the agent's first "installing 2.0.0 into slot B"
    image_requested: float | None  # nginx: the node's first request for a 2.0.0 image
    install_recorded: float | None  # the journal's last_install.at (whole seconds)
    committed_version: str | None  # the journal's last_commit
    booted: str
    booted_version: str | None
    grub_next: str | None  # the slot the GRUB model boots next from the grubenv
    lock_held: str | None
    pending: bool

    def installed_early(self) -> list[str]:
        """Which records say the node installed before its wave's start."""
        early = []
        if self.installing_logged is not None and self.installing_logged < self.wave_start:
            early.append("agent log")
        if self.image_requested is not None and self.image_requested < self.wave_start:
            early.append("nginx")
        # The journal keeps whole seconds (truncated); wave starts are whole seconds.
        if self.install_recorded is not None and self.install_recorded < self.wave_start:
            early.append("journal")
        return early

    def ends_on_new(self) -> bool:
        return (
            self.committed_version == NEW
            and self.booted_version == NEW
            and self.grub_next == self.booted
            and self.lock_held is None
            and not self.pending
        )


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def outcomes(run: Run) -> list[NodeOutcome]:
    events = run.phases["rollout"].events
    installing = measure.logs(events, measure.INSTALLING)
    image_gets: dict[str, float] = {}
    prefix = f"/targets/{HARDWARE}/{NEW}/"
    for r in run.requests:
        if r.phase == "rollout" and r.node and r.uri.startswith(prefix):
            image_gets[r.node] = min(r.at, image_gets.get(r.node, math.inf))
    found = []
    for node in run.fleet.nodes:
        machine_id = node.machine_id.read_text().strip()
        wave, start = measure.wave_of(run.waves, machine_id, HARDWARE, NEW)
        journal = load_journal(node.state_dir)
        booted = node.booted()
        decision = grub_decide(node.grubenv.read_bytes(), {"A": True, "B": True})
        found.append(
            NodeOutcome(
                name=node.name,
                group=node.group,
                wave=wave,
                wave_start=start,
                installing_logged=installing.get(node.name, [None])[0],
                image_requested=image_gets.get(node.name),
                install_recorded=_epoch(journal.last_install.at if journal.last_install else None),
                committed_version=journal.last_commit.version if journal.last_commit else None,
                booted=booted,
                booted_version=journal.version_in(booted),
                grub_next=decision.slot if decision.passes == 1 else None,
                lock_held=journal.lock_held,
                pending=journal.pending is not None,
            )
        )
    return found


def lock_overlap(run: Run) -> dict[str, int]:
    """group -> the most nodes at one moment between "took a reboot slot" and
    "committed" (the agents' log records; a node that never committed holds to the end)."""
    events = run.phases["rollout"].events
    end = max((float(e["t"]) for e in events), default=run.t0)
    group_of = {n.name: n.group for n in run.fleet.nodes}
    per_group: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for node, spans in measure.lock_intervals(events, end).items():
        per_group[group_of[node]].extend(spans)
    return {g: measure.max_overlap(spans)[0] for g, spans in sorted(per_group.items())}


def problems(run: Run) -> list[dict[str, Any]]:
    """Errors the agents logged and anything the simulation itself recorded as wrong."""
    return [
        {k: e.get(k) for k in ("t", "node", "kind", "level", "text", "error", "said")}
        for phase in run.phases.values()
        for e in phase.events
        if e["kind"] in ("error", "crash", "no-boot", "second-pass")
        or e.get("level") in ("ERROR", "CRITICAL")
    ]


def _step_cpu(phase: Phase, kind: str) -> dict[str, float]:
    cpus = [float(e["cpu"]) for e in phase.events if e["kind"] == "step" and e["step"] == kind]
    return {"steps": len(cpus), "mean_ms": round(1000 * sum(cpus) / max(len(cpus), 1), 2)}


def report(run: Run) -> dict[str, Any]:
    """The benchmark's figures (see bench/fleet.py and bench/README.md)."""
    p, phases = run.params, run.phases
    nodes = outcomes(run)
    names = [n.name for n in nodes]
    n = len(nodes)
    events = phases["rollout"].events
    overlap = lock_overlap(run)
    polls = Counter(e["node"] for e in events if e["kind"] == "step" and e["step"] == "poll")
    waits = Counter(
        e["text"].split(":", 2)[1].strip()  # "waiting: wave: ..." -> wave
        for e in events
        if e.get("msg") == measure.WAITING
    )
    committed = measure.logs(events, measure.COMMITTED)
    last_commit = max((ts[-1] for ts in committed.values()), default=None)
    found = problems(run)
    total_cpu = sum(ph.cpu for ph in phases.values())
    early = Counter(where for node in nodes for where in node.installed_early())
    return {
        "params": asdict(p),
        "nodes": n,
        "setup_seconds": round(run.setup_seconds, 1),
        "rollout_plan": {
            "waves_spec": run.waves_spec,
            "t0": format_time(datetime.fromtimestamp(run.t0, UTC)),
            "published_before_t0_seconds": round(run.t0 - run.published, 1),
            "waves": [
                {
                    "share": share,
                    "start_after_t0_s": round(start - run.t0, 1),
                    "nodes": sum(node.wave == i for node in nodes),
                }
                for i, (share, start) in enumerate(run.waves)
            ],
        },
        "first_poll": measure.traffic(measure.per_node(run.requests, "warmup", names)),
        "idle_poll": {
            **measure.traffic(measure.per_node(run.requests, "idle", names)),
            "cpu_seconds_per_node": round(phases["idle"].cpu / n, 4),
        },
        "update": {
            **measure.traffic(measure.per_node(run.requests, "rollout", names)),
            "polls_per_node": measure.spread([polls[name] for name in names]),
            "cpu_seconds_per_node": round(phases["rollout"].cpu / n, 4),
        },
        "lock": {
            "max_concurrent": p.max_concurrent,
            "max_between_taken_and_committed": max(overlap.values(), default=0),
            "per_group": overlap,
            "groups_over_limit": sum(v > p.max_concurrent for v in overlap.values()),
            "etcd_max_holders_sampled": max(run.etcd_most_holders.values(), default=0),
            "etcd_samples": run.etcd_samples,
            "etcd_sample_errors": run.etcd_sample_errors,
        },
        "waves": {
            "nodes_installed_before_wave_start": sum(bool(x.installed_early()) for x in nodes),
            "by_record": {k: early.get(k, 0) for k in ("agent log", "nginx", "journal")},
        },
        "waits_logged": dict(waits),
        "result": {
            "nodes_on_new_committed": sum(node.ends_on_new() for node in nodes),
            "nodes": n,
            "lock_still_held": sum(node.lock_held is not None for node in nodes),
            "problems": len(found),
            "first_problems": found[:5],
        },
        "time": {
            "rollout_seconds_t0_to_last_commit": (
                None if last_commit is None else round(last_commit - run.t0, 1)
            ),
            "phase_seconds": {k: round(v.seconds, 1) for k, v in phases.items()},
        },
        "cpu": {
            "worker_cpu_seconds": round(total_cpu, 1),
            "cpu_seconds_per_node": round(total_cpu / n, 4),
            "agent_step_cpu": {
                "first_poll": _step_cpu(phases["warmup"], "poll"),
                "idle_poll": _step_cpu(phases["idle"], "poll"),
                "rollout_poll": _step_cpu(phases["rollout"], "poll"),
                "boot_and_health_check": _step_cpu(phases["rollout"], "boot"),
            },
            "servers_cpu_seconds": {k: round(v, 1) for k, v in run.servers_cpu.items()},
        },
        "memory": {
            "peak_rss_kib_of_a_worker": max(ph.max_rss_kib for ph in phases.values()),
            "workers": p.workers,
            "threads_per_worker": p.threads,
        },
    }
