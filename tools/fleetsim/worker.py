"""One process of the simulated fleet: a share of its nodes, each run by the real agent.

    python -m tools.fleetsim.worker SPEC.json      # writes SPEC's "out" (events, summary)

A few threads take the node that is due next from a schedule and run, for it:

* `poll`: `Agent(config, session=...).daemon(once=True)` - one daemon cycle (refresh TUF,
  select, wave gate, download + write + verify, window, quorum, reboot lock, activate,
  hooks): the agent's code, nothing of it re-done here;
* `boot`: after the cycle that ran the reboot hook, and `reboot_seconds` later, the
  simulated firmware boots the node: the slot comes from the model of the shipped GRUB
  script (`tools.powercut.grubmodel.grub_decide`) applied to the node's grubenv (whose
  block GRUB saves back, `<slot>_TRY=1`), with a kernel in a slot iff it holds a whole
  release image; then `Agent(config with booted_slot = that slot).health_check()`.

A node is done when it runs the target version on a committed slot and holds no reboot
lock. The agent's log records (what it says it did: "took a reboot slot", "committed",
...) are kept with their timestamps and the node they came from, and written with each
cycle's CPU time (`time.thread_time`) to SPEC's out/events-<worker>.jsonl; the worker's
summary (its own CPU and peak RSS, as `getrusage` has them) to out/summary-<worker>.json.

Invariants: the agent is only ever called through its public methods; a node's HTTP
requests carry `node=<name> phase=<phase>` in their User-Agent (nginx logs it); every
wait is bounded by SPEC's deadline; the worker exits by itself.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from core.errors import UpdaterError
from core.fsutil import atomic_write
from tools.fleetsim.fleet import SLOT_LABELS, NodeSpec, config_text
from tools.powercut.grubmodel import grub_decide
from updater.agent import Agent
from updater.config import Config, parse_config
from updater.disk.gpt import read_gpt
from updater.state import load_journal

_context = threading.local()  # .node: the name of the node this thread runs now


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    phase: str  # "warmup" and "idle": one cycle per node; "rollout": until done
    nodes: tuple[NodeSpec, ...]
    server: str
    etcd: tuple[str, ...]
    max_concurrent: int
    out: Path
    target: str  # the version a node must end on ("rollout")
    digests: dict[str, str]  # raw sha256 of each release image -> version
    image_bytes: int
    threads: int = 8
    poll: float = 10.0  # seconds between two daemon cycles of a node
    jitter: float = 0.5  # each interval is poll * uniform(1 - jitter, 1 + jitter)
    reboot_seconds: float = 2.0  # from the reboot hook to the health check
    deadline: float = 0.0  # time.time() by which the worker gives up (0: none)
    seed: int = 0

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        d = json.loads(path.read_text())
        d["nodes"] = tuple(NodeSpec.from_json(n) for n in d["nodes"])
        d["etcd"] = tuple(d["etcd"])
        d["out"] = Path(d["out"])
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "nodes": [n.to_json() for n in self.nodes],
            "etcd": list(self.etcd),
            "out": str(self.out),
        }


class Recorder(logging.Handler):
    """Keeps every log record of the agent with its time and the node it came from."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        node = getattr(_context, "node", None)
        self.add(
            {
                "t": record.created,
                "node": node,
                "kind": "log",
                "level": record.levelname,
                "logger": record.name,
                "msg": str(record.msg),
                "text": record.getMessage(),
            }
        )

    def add(self, event: dict[str, Any]) -> None:
        with self._mutex:
            self.events.append(event)


class SimNode:
    """One node: its agent (remade after each boot, as a new process would be), its
    HTTP session, and what the simulated hardware is doing (up or rebooting)."""

    def __init__(self, spec: NodeSpec, w: WorkerSpec, recorder: Recorder) -> None:
        self.spec = spec
        self.w = w
        self.recorder = recorder
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"ab-updater fleetsim node={spec.name} phase={w.phase}"
        self.rebooting = False
        self.done = False
        self.agent = self._agent(spec.booted())

    def _config(self, booted: str) -> Config:
        text = config_text(
            self.spec,
            booted,
            server=self.w.server,
            etcd=self.w.etcd,
            max_concurrent=self.w.max_concurrent,
        )
        path = self.spec.dir / "config.toml"
        atomic_write(path, text.encode())  # for a person: `updater --config ... status`
        return parse_config(text, path)

    def _agent(self, booted: str) -> Agent:
        return Agent(self._config(booted), session=self.session)

    def event(self, kind: str, **kw: Any) -> None:
        self.recorder.add({"t": time.time(), "node": self.spec.name, "kind": kind, **kw})

    def step(self) -> None:
        """Run what is due: a boot if the node is rebooting, else a daemon cycle."""
        _context.node = self.spec.name
        cpu, t = time.thread_time(), time.time()
        kind = "boot" if self.rebooting else "poll"
        try:
            if self.rebooting:
                self._boot()
            else:
                self.agent.daemon(once=True)  # logs, never raises an UpdaterError
        except UpdaterError as e:  # a failed health check (SlotFailed), a lock error
            self.event("error", step=kind, error=str(e))
        finally:
            self.event("step", step=kind, start=t, cpu=time.thread_time() - cpu)
            _context.node = None
        journal = load_journal(self.spec.state_dir)
        if not self.rebooting and kind == "poll" and journal.pending is not None:
            self.rebooting = True  # the cycle ran the reboot hook (activated, pending)
            self.event("reboot-hook", slot=journal.pending.slot, version=journal.pending.version)
        elif kind == "boot":
            self.rebooting = False
        booted = self.spec.booted()
        self.done = (
            not self.rebooting
            and journal.version_in(booted) == self.w.target
            and journal.pending is None
            and journal.lock_held is None
            and journal.last_commit is not None
            and journal.last_commit.version == self.w.target
        )

    def holds_release(self, slot: str) -> bool:
        """Whether the slot's partition holds a whole release image (its kernel)."""
        gpt = read_gpt(self.spec.disk)
        part = gpt.find(SLOT_LABELS[slot])
        with self.spec.disk.open("rb") as f:
            f.seek(part.first_lba * gpt.sector_size)
            data = f.read(self.w.image_bytes)
        return hashlib.sha256(data).hexdigest() in self.w.digests

    def _boot(self) -> None:
        """The firmware and GRUB: the shipped script's choice on this grubenv, its save
        of `<slot>_TRY=1`; then the new agent's health check, as on every boot."""
        raw = self.spec.grubenv.read_bytes()
        decision = grub_decide(raw, {slot: self.holds_release(slot) for slot in SLOT_LABELS})
        if decision.slot is None:
            self.event("no-boot", said=list(decision.said))
            self.done = True  # it never boots again: it stays as it is (and is counted)
            return
        if decision.passes != 1:  # GRUB found no slot at first and rebooted: worth seeing
            self.event("second-pass", said=list(decision.said))
        if decision.first_saved is not None and decision.first_saved != raw:
            atomic_write(self.spec.grubenv, decision.first_saved)
        self.spec.set_booted(decision.slot)
        self.event("booted", slot=decision.slot, said=list(decision.said))
        self.agent = self._agent(decision.slot)
        self.agent.health_check()


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    node: SimNode = field(compare=False)


class Schedule:
    """The nodes of a worker by when their next step is due. A due boot goes before any
    due poll: a boot is the hardware's time (the reboot takes `reboot_seconds`), and it
    must not queue behind other nodes' polls when the CPU is busy - that would stretch
    every lock holder's reboot by the backlog. Bounded by the deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.gave_up = False
        self._boots: list[_Due] = []
        self._polls: list[_Due] = []
        self._cond = threading.Condition()
        self._running = 0
        self._seq = 0

    def put(self, node: SimNode, at: float) -> None:
        with self._cond:
            self._push(node, at)

    def _push(self, node: SimNode, at: float) -> None:
        heapq.heappush(self._boots if node.rebooting else self._polls, _Due(at, self._seq, node))
        self._seq += 1
        self._cond.notify_all()

    def take(self) -> SimNode | None:
        """The next due node (waiting until one is); None when all are done or the
        deadline passed."""
        with self._cond:
            while True:
                now = time.time()
                if self.deadline and now > self.deadline:
                    self.gave_up = bool(self._boots or self._polls) or self._running > 0
                    self._cond.notify_all()
                    return None
                for heap in (self._boots, self._polls):
                    if heap and heap[0].at <= now:
                        self._running += 1
                        return heapq.heappop(heap).node
                if not (self._boots or self._polls) and self._running == 0:
                    self._cond.notify_all()
                    return None
                soonest = min((h[0].at for h in (self._boots, self._polls) if h), default=now + 1)
                self._cond.wait(min(max(soonest - now, 0.0), 1.0))

    def finished(self, node: SimNode, again: float | None) -> None:
        """`node`'s step is over; it is due again in `again` seconds (None: never)."""
        with self._cond:
            self._running -= 1
            if again is not None:
                self._push(node, time.time() + again)
            self._cond.notify_all()


def run(w: WorkerSpec) -> dict[str, Any]:
    recorder = Recorder()
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    root.addHandler(recorder)
    for name in ("updater", "core"):
        logging.getLogger(name).setLevel(logging.INFO)
    rng = random.Random(w.seed * 1000 + w.index)
    rng_mutex = threading.Lock()
    started = time.time()
    nodes = [SimNode(spec, w, recorder) for spec in w.nodes]
    once = w.phase != "rollout"
    schedule = Schedule(w.deadline)
    for node in nodes:  # the first cycles spread over one interval
        schedule.put(node, started + (0.0 if once else rng.uniform(0, w.poll)))

    def loop() -> None:
        while (node := schedule.take()) is not None:
            try:
                node.step()
            except Exception as e:  # a defect of the simulation: recorded, node stopped
                node.event("crash", error=f"{type(e).__name__}: {e}")
                node.done = True
            if once or node.done:
                schedule.finished(node, None)
            elif node.rebooting:
                schedule.finished(node, w.reboot_seconds)
            else:
                with rng_mutex:
                    again = w.poll * rng.uniform(1 - w.jitter, 1 + w.jitter)
                schedule.finished(node, again)

    threads = [threading.Thread(target=loop, name=f"fleetsim-{i}") for i in range(w.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    w.out.mkdir(parents=True, exist_ok=True)
    events = w.out / f"events-{w.index}.jsonl"
    atomic_write(events, b"".join(json.dumps(e).encode() + b"\n" for e in recorder.events))
    summary = {
        "index": w.index,
        "phase": w.phase,
        "nodes": len(nodes),
        "done": sum(n.done for n in nodes),
        "gave_up": schedule.gave_up,
        "seconds": time.time() - started,
        "cpu_user": usage.ru_utime,
        "cpu_system": usage.ru_stime,
        "max_rss_kib": usage.ru_maxrss,
    }
    atomic_write(w.out / f"summary-{w.index}.json", json.dumps(summary).encode())
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tools.fleetsim.worker SPEC.json", file=sys.stderr)
        return 2
    run(WorkerSpec.load(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
