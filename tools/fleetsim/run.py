"""A whole simulated rollout: build the fleet, start etcd and nginx, run the phases in
worker processes, publish the update, and measure - `simulate(work, Params(...))`.

Phases, each a set of `tools.fleetsim.worker` processes over the same nodes:

1. `warmup` - one daemon cycle per node against the repository holding 1.0.0 only: the
   node's first TUF refresh (root, timestamp, snapshot, targets), nothing to install;
2. `idle`   - one more cycle per node, nothing new: what a poll costs a fleet at rest;
3. the update 2.0.0 is signed in with `sign-release add --waves` (waves at t0 + offsets)
   and published;
4. `rollout` - every node polls every `poll` seconds until it runs 2.0.0 on a committed
   slot and holds no reboot lock (or the run's timeout passes).

While the rollout runs, a sampler reads each group's semaphore from etcd (through the
agent's own etcd backend) to confirm, from the lock's side, what the agents' logs say.

Invariants: everything started here (etcd members, nginx, workers) is stopped before
`simulate` returns, and every wait is bounded (`Params.timeout`); the report says what
was measured, including invariant violations - it never raises because of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.release import format_time
from tools.etcdcluster import EtcdCluster, die_with_parent
from tools.examplerepo import REPO_ROOT
from tools.fleetsim.fleet import NEW, FleetFiles, build_fleet, publish_update
from tools.fleetsim.nginx import Nginx, Request, read_access_log
from tools.fleetsim.worker import WorkerSpec
from updater.config_fleet import CoordinationConfig
from updater.coordination import make_lock


@dataclass(frozen=True)
class Params:
    nodes: int = 1000
    groups: int = 1
    max_concurrent: int = 10
    # (cumulative share, seconds after t0): 10% at t0, 50% at t0 + 20 s, all at t0 + 40 s
    waves: tuple[tuple[float, float], ...] = ((0.1, 0.0), (0.5, 20.0), (1.0, 40.0))
    workers: int = 2  # processes
    threads: int = 8  # per process
    poll: float = 60.0  # seconds between two daemon cycles of a node (x uniform(1 +- jitter))
    jitter: float = 0.5
    reboot_seconds: float = 2.0  # from the reboot hook to the health check
    image_bytes: int = 1 << 20
    lead: float = 5.0  # t0 is this long after the update is about to be signed
    timeout: float = 1800.0  # seconds the rollout may take before the workers give up
    seed: int = 0


@dataclass
class Phase:
    """One phase's worker processes: how long, their CPU and peak RSS, what they logged."""

    name: str
    seconds: float
    cpu: float  # user + system of the worker processes (and their hooks)
    max_rss_kib: int
    summaries: list[dict[str, Any]]
    events: list[dict[str, Any]]


def _run_phase(
    fleet: FleetFiles,
    p: Params,
    name: str,
    server: str,
    etcd: tuple[str, ...],
    groups: list[str] | None = None,
) -> tuple[Phase, HolderSampler | None]:
    """Run phase `name` in worker processes; with `groups`, sample those groups' reboot
    semaphores in etcd while it runs (the sampler's thread starts after the workers:
    they are started with a parent-death signal, which is unsafe to set up in a
    process that has threads)."""
    out = fleet.work / "phases" / name
    out.mkdir(parents=True)
    deadline = time.time() + p.timeout if name == "rollout" else 0.0
    procs = []
    workers = min(p.workers, len(fleet.nodes))
    for i in range(workers):
        spec = WorkerSpec(
            index=i,
            phase=name,
            nodes=fleet.nodes[i::workers],
            server=server,
            etcd=etcd,
            max_concurrent=p.max_concurrent,
            out=out,
            target=NEW,
            digests=fleet.digests,
            image_bytes=p.image_bytes,
            threads=p.threads,
            poll=p.poll,
            jitter=p.jitter,
            reboot_seconds=p.reboot_seconds,
            deadline=deadline,
            seed=p.seed,
        )
        path = out / f"spec-{i}.json"
        path.write_text(json.dumps(spec.to_json()))
        log = (out / f"worker-{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tools.fleetsim.worker", str(path)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # no worker outlives a killed benchmark
            )
        )
        log.close()
    sampler = None if groups is None else HolderSampler(etcd, groups, p.max_concurrent)
    started = time.time()
    with sampler or contextlib.nullcontext():
        cpu, rss, failed = _wait(procs, out)
    if failed:
        raise RuntimeError(f"phase {name}: " + "; ".join(failed))
    summaries = [json.loads((out / f"summary-{i}.json").read_text()) for i in range(workers)]
    events: list[dict[str, Any]] = []
    for i in range(workers):
        with (out / f"events-{i}.jsonl").open() as f:
            events.extend(json.loads(line) for line in f)
    return Phase(name, time.time() - started, cpu, rss, summaries, events), sampler


def _wait(procs: list[subprocess.Popen[bytes]], out: Path) -> tuple[float, int, list[str]]:
    """Wait for every worker: their CPU (user + system, the hooks they ran included),
    the largest peak RSS, and how each one that failed ended."""
    cpu, rss, failed = 0.0, 0, []
    for i, proc in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        rss = max(rss, usage.ru_maxrss)
        if proc.returncode != 0:
            failed.append(f"worker {i} exited {proc.returncode}: {_tail(out / f'worker-{i}.log')}")
    return cpu, rss, failed


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "(no log)"


class HolderSampler:
    """Reads every group's reboot semaphore from etcd, over and over, until stopped."""

    def __init__(self, endpoints: tuple[str, ...], groups: list[str], limit: int) -> None:
        self.locks = {
            g: make_lock(
                CoordinationConfig(
                    backend="etcd", endpoints=endpoints, group=g, max_concurrent=limit
                ),
                "fleetsim-observer",
            )
            for g in groups
        }
        self.most: dict[str, int] = defaultdict(int)
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holder-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for group, lock in self.locks.items():
                assert lock is not None
                try:
                    held = len(lock.holders())
                except Exception:  # counted: the sampler only observes
                    self.errors += 1
                    continue
                self.most[group] = max(self.most[group], held)
                self.samples += 1

    def __enter__(self) -> HolderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, children waited for included) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """What a simulation leaves to be measured (`tools.fleetsim.report`)."""

    fleet: FleetFiles
    params: Params
    phases: dict[str, Phase]
    requests: list[Request]  # nginx's access log
    waves: list[tuple[float, float]]  # (cumulative share, start as time.time())
    waves_spec: str  # what `sign-release add --waves` was given
    t0: float
    published: float  # when `sign-release publish` had returned
    etcd_most_holders: dict[str, int]  # group -> the most holders a sample saw
    etcd_samples: int
    etcd_sample_errors: int
    setup_seconds: float
    servers_cpu: dict[str, float]  # nginx, etcd: CPU seconds over the whole run


def simulate(work: Path, p: Params) -> Run:
    """Run the whole simulation in `work` (created; its files are left there)."""
    t = time.time()
    fleet = build_fleet(
        work, nodes=p.nodes, groups=p.groups, image_bytes=p.image_bytes, seed=p.seed
    )
    setup = time.time() - t
    with EtcdCluster(work, members=3) as etcd, Nginx(fleet.repo, work / "nginx") as server:
        phases = {
            name: _run_phase(fleet, p, name, server.url, etcd.endpoints)[0]
            for name in ("warmup", "idle")
        }
        t0 = math.ceil(time.time() + p.lead)
        waves = [(share, float(t0 + offset)) for share, offset in p.waves]
        spec = ",".join(f"{share}@{format_time(_utc(start))}" for share, start in waves)
        publish_update(fleet, spec)
        published = time.time()
        groups = sorted({n.group for n in fleet.nodes})
        phases["rollout"], sampler = _run_phase(
            fleet, p, "rollout", server.url, etcd.endpoints, groups
        )
        assert sampler is not None
        servers_cpu = {
            "nginx": _proc_cpu_tree(server.pid),
            "etcd": sum(
                _proc_cpu(m.process.pid) for m in etcd.members.values() if m.process is not None
            ),
        }
    return Run(
        fleet=fleet,
        params=p,
        phases=phases,
        requests=read_access_log(server.access_log),
        waves=waves,
        waves_spec=spec,
        t0=t0,
        published=published,
        etcd_most_holders=dict(sampler.most),
        etcd_samples=sampler.samples,
        etcd_sample_errors=sampler.errors,
        setup_seconds=setup,
        servers_cpu=servers_cpu,
    )


def _proc_cpu_tree(pid: int) -> float:
    """A process and its children (nginx: the master and its worker)."""
    total = _proc_cpu(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += _proc_cpu(int(child))
    return total


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
