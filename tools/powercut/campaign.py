"""The power-cut campaign: record update cycles, replay hundreds of cuts, judge each,
boot a seeded sample of them with real GRUB, and report.

`run` records (or reuses) the cycles of `tools.powercut.record`, plans the cuts of
each (`replay.plan_cuts`, seeded), replays them one boot at a time with a `Replayer`
and judges each disk on the host (`judge.judge_disk`); the cuts drawn for booting are
copied out as they come by and booted in the background (`boot_sample`, two QEMUs at
a time, at most `MAX_WAITING` sample disks on the host at once), each until the node
powers off by itself: GRUB's choice must be the model's, and the node must converge
(every `updater health-check` and `updater install` finishes without a traceback, the
last boot powers off after an install that had nothing left to do, and the slot it
runs holds a signed release). After the last cut of a boot the working copy holds the
whole log, and its sha256 must be that of the disk QEMU left: the log is the ground
truth only if replaying all of it gives the disk back.

Invariants: the same seed and recordings give the same cuts and samples; a campaign
never stops at a bad disk (every verdict is recorded); disk use is bounded (one
working copy per recording, a few sample disks, extracted partitions removed after
use); the report (report.json and the printed summary) counts cut points, the regions
each cut put at stake, bricks, stuck agents, notes and sample outcomes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tools.node import Node, boot_until, make_updates_disk
from tools.node.disk import OVMF_VARS
from tools.node.scenarios import ANSI, HEALTH, INSTALL
from tools.powercut.grubmodel import SIGNATURE
from tools.powercut.judge import (
    SLOT_LABELS,
    DurableGrubenv,
    Verdict,
    judge_disk,
    regions,
    sha256_region,
    verdict_json,
)
from tools.powercut.record import REAL_ESP_MOUNT, Recording, sha256_file
from tools.powercut.replay import Cut, Region, Replayer, plan_cuts
from tools.powercut.writelog import WriteLog, read_log
from updater.disk.gpt import read_gpt

Say = Callable[[str], None]
MAX_WAITING = 3  # sample disks copied out and not yet booted
GRUB_DECISION = re.compile(r"^(booting slot|skipping slot|NO BOOTABLE SLOT)")


@dataclass
class SampleResult:
    cut: str
    predicted: str | None
    booted: str | None
    model_agrees: bool
    converged: bool
    boots: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    story: list[str] = field(default_factory=list)


@dataclass
class Report:
    seed: int
    cuts: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_strategy: Counter[str] = field(default_factory=Counter)
    at_stake: Counter[str] = field(default_factory=Counter)  # region -> cuts with writes there
    torn: Counter[str] = field(default_factory=Counter)  # region -> cuts tearing a write there
    verdicts: list[Verdict] = field(default_factory=list)
    samples: list[SampleResult] = field(default_factory=list)
    replay_checked: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bricks(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.bricks]

    @property
    def stuck(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.stuck and not v.bricks]

    @property
    def lost(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.lost and not v.bricks and not v.stuck]

    @property
    def failed_samples(self) -> list[SampleResult]:
        return [s for s in self.samples if not (s.model_agrees and s.converged)]

    @property
    def ok(self) -> bool:
        return not self.bricks and not self.stuck and not self.lost and not self.failed_samples

    def to_json(self) -> dict[str, Any]:
        notes = Counter(_note_kind(n) for v in self.verdicts for n in v.notes)
        return {
            "seed": self.seed,
            "cuts": self.cuts,
            "by_kind": dict(self.by_kind),
            "by_strategy": dict(self.by_strategy),
            "at_stake": dict(self.at_stake),
            "torn": dict(self.torn),
            "bricks": len(self.bricks),
            "stuck": len(self.stuck),
            "lost_durable_writes": len(self.lost),
            "notes": dict(notes),
            "replay_checked": self.replay_checked,
            "samples": [s.__dict__ for s in self.samples],
            "seconds": self.seconds,
            "verdicts": [verdict_json(v) for v in self.verdicts],
        }

    def lines(self) -> list[str]:
        out = [
            f"cut points: {self.cuts} (seed {self.seed}) - " + _counts(self.by_kind),
            "subsets: " + _counts(self.by_strategy),
            "regions at stake: " + _counts(self.at_stake),
            "torn writes in: " + _counts(self.torn),
            f"bricks: {len(self.bricks)}, stuck agents: {len(self.stuck)}, "
            f"durable grubenv writes lost: {len(self.lost)}",
        ]
        notes = Counter(_note_kind(n) for v in self.verdicts for n in v.notes)
        out += [f"  note x{c}: {n}" for n, c in notes.most_common()]
        out += [f"  BRICK {v.summary()}" for v in self.bricks[:20]]
        out += [f"  STUCK {v.summary()}" for v in self.stuck[:20]]
        out += [f"  LOST {v.summary()}" for v in self.lost[:10]]
        agree = sum(s.model_agrees for s in self.samples)
        conv = sum(s.converged for s in self.samples)
        boots = sum(s.boots for s in self.samples)
        out.append(f"sampled disks booted: {len(self.samples)} ({boots} boots): GRUB agreed "
                   f"with the model {agree}, converged {conv}")  # fmt: skip
        out += [f"  FAILED {s.cut}: {'; '.join(s.problems)}" for s in self.failed_samples]
        out += [f"replay reproduces {x}" for x in self.replay_checked]
        out.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return out


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def _note_kind(note: str) -> str:
    """A note without its specifics (cluster numbers, versions), for counting."""
    return re.sub(r"\d+", "N", note)[:110]


def layout_regions(disk: Path) -> list[Region]:
    """The regions a cut can put at stake: both GPT copies and every partition."""
    gpt = read_gpt(disk)
    total = gpt.total_sectors
    named = list(regions(gpt).values())
    return [Region("gpt-primary", 0, 34), Region("gpt-backup", total - 33, total), *named]


def touched(
    entries: Sequence[Any], indices: Sequence[int] | range, where: Sequence[Region]
) -> set[str]:
    return {r.name for i in indices for r in where if r.touches(entries[i])}


def draw_samples(cuts: Sequence[Cut], logs: dict[int, WriteLog], where: Sequence[Region],
                 count: int, seed: int) -> set[str]:  # fmt: skip
    """`count` cuts to boot, spread over boots and over the regions they put at stake."""
    rng = random.Random(seed ^ 0x5A4D)
    groups: dict[tuple[int, str], list[Cut]] = {}
    for cut in cuts:
        stake = touched(logs[cut.boot].entries, cut.pending(), where)
        first = next((r for r in ("esp", "gpt-primary", "gpt-backup", "data", "root_a", "root_b")
                      if r in stake), "nothing")  # fmt: skip
        groups.setdefault((cut.boot, first), []).append(cut)
    for members in groups.values():
        rng.shuffle(members)
    chosen: list[str] = []
    keys = sorted(groups)
    while len(chosen) < count and any(groups.values()):
        for key in keys:
            if groups[key] and len(chosen) < count:
                chosen.append(groups[key].pop().name)
    return set(chosen)


class SampleSink(Protocol):
    """Takes the disk of a cut drawn for booting while it exists (`judge_recording`)."""

    def submit(self, rec: Recording, cut: Cut, disk: Path, verdict: Verdict) -> None: ...


class Sampler:
    """Boots sample disks in the background, `workers` QEMUs at a time."""

    def __init__(self, workdir: Path, say: Say, workers: int = 2) -> None:
        self.workdir = workdir
        self.say = say
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sample")
        self.waiting = threading.BoundedSemaphore(MAX_WAITING)
        self.futures: list[Future[SampleResult]] = []

    def submit(self, rec: Recording, cut: Cut, disk: Path, verdict: Verdict) -> None:
        self.waiting.acquire()
        sdir = self.workdir / cut.name
        if sdir.exists():
            shutil.rmtree(sdir)
        sdir.mkdir(parents=True)
        copy = sdir / "node.img"
        sparse_copy(disk, copy)
        repo = rec.boots[cut.boot - 1].repo
        repo_dir = rec.path(repo) if repo else None

        def job() -> SampleResult:
            try:
                result = boot_sample(sdir, copy, repo_dir, verdict, rec)
            finally:
                copy.unlink(missing_ok=True)
                self.waiting.release()
            self.say(f"[sample] {result.cut}: GRUB {result.booted} (model {result.predicted}), "
                     f"{'converged' if result.converged else 'DID NOT CONVERGE'} in "
                     f"{result.boots} boots, {result.seconds:.0f} s"
                     + (f": {'; '.join(result.problems)}" if result.problems else ""))  # fmt: skip
            return result

        self.futures.append(self.pool.submit(job))

    def results(self) -> list[SampleResult]:
        out = [f.result() for f in self.futures]
        self.pool.shutdown()
        return out


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a disk image keeping its holes (and sharing blocks where the fs can)."""
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)


def grub_lines(log: str) -> list[str]:
    """The script's decision lines (`ab-updater: ...`) of one console, colour codes gone."""
    lines = ANSI.sub("", log).splitlines()
    said = [
        x[x.index("ab-updater: ") + len("ab-updater: ") :] for x in lines if "ab-updater: " in x
    ]
    return [x.strip() for x in said if GRUB_DECISION.match(x.strip())]


def boot_sample(sdir: Path, disk: Path, repo: Path | None, verdict: Verdict,
                rec: Recording) -> SampleResult:  # fmt: skip
    """Boot a replayed disk until it powers off (at most 5 boots): each boot runs the
    health check and `updater --json install` with the repository as it was."""
    vars_copy = sdir / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    node = Node(workdir=sdir, disk=disk, ovmf_vars=vars_copy)
    updates = make_updates_disk(repo, sdir / "updates.img", commands=(INSTALL,))
    start = time.monotonic()
    results = boot_until(node, updates_disk=updates, max_boots=5, timeout=300)
    seconds = time.monotonic() - start
    updates.unlink(missing_ok=True)
    problems: list[str] = []
    story: list[str] = []
    said: list[str] = []
    booted: str | None = None
    for r in results:
        if booted is None:
            said += grub_lines(r.serial_log)
            booted = r.booted.get("slot")
        story.append(f"{r.exit_reason}: slot {r.booted.get('slot')} {r.booted.get('version')}; "
                     + ", ".join(f"{c} -> {s}" for c, s in r.commands))  # fmt: skip
        if "Traceback (most recent call last)" in r.serial_log:
            problems.append(f"a traceback on the console ({r.log_path})")
        for command, status in r.commands:
            allowed = {HEALTH: (0, 5), INSTALL: (0,), REAL_ESP_MOUNT: (0,)}.get(command, (0,))
            if status not in allowed:
                problems.append(f"{command!r} exited {status} ({r.log_path})")
        if r.exit_reason in ("timeout", "error", "killed"):
            problems.append(f"boot ended by {r.exit_reason} ({r.log_path})")
    expected = [x for x in verdict.said if GRUB_DECISION.match(x)]
    agrees = booted == verdict.chosen and said[: len(expected)] == expected
    if not agrees:
        problems.append(f"GRUB said {said} and booted {booted}; the model said {expected}")
    last = results[-1]
    converged = last.exit_reason == "poweroff" and not problems
    if last.exit_reason != "poweroff":
        problems.append(f"no poweroff after {len(results)} boots (last: {last.exit_reason})")
    if last.exit_status(INSTALL) is None and last.exit_reason == "poweroff":
        problems.append("the last boot did not run install")
        converged = False
    slot = last.booted.get("slot")
    if slot in SLOT_LABELS:
        part = regions(read_gpt(disk))[SLOT_LABELS[slot]]
        held = [v for v, r in rec.releases.items()
                if sha256_region(disk, part, r.size) == r.sha256]  # fmt: skip
        if not held:
            problems.append(f"the node ends running slot {slot}, which holds no signed release")
            converged = False
    return SampleResult(verdict.cut, verdict.chosen, booted, agrees, converged, len(results),
                        seconds, problems, story)  # fmt: skip


@dataclass(frozen=True)
class AgentGrubenvWrite:
    """The agent writing a new grubenv block (a temp file's data on the ESP) at log
    entry `index`, and `flushed`: the flush after which its replace is complete - the
    first flush, after the one that made the data durable, that follows ESP metadata
    writes (the rename's directory and FAT sectors). None if the boot ended first."""

    index: int
    flushed: int | None
    block: bytes


def agent_grubenv_writes(log: WriteLog, esp: Region) -> list[AgentGrubenvWrite]:
    """The agent's grubenv writes of one boot, from the log alone. GRUB's own save_env
    (in place, before the OS mounts the ESP: before its boot sector is first written)
    is not one."""
    mounted = False
    found: list[AgentGrubenvWrite] = []
    entries = log.entries
    for e in entries:
        if not esp.touches(e):
            continue
        if e.sector == esp.first:
            mounted = True
            continue
        if not mounted or e.nr_sectors != 2:
            continue
        block = log.data(e)
        if not block.startswith(SIGNATURE):
            continue
        flushes = [f.index for f in entries[e.index :] if f.is_flush]
        flushed = None
        if flushes:
            first = flushes[0]
            for f in flushes[1:]:
                if any(esp.touches(x) for x in entries[first:f]):
                    flushed = f
                    break
        found.append(AgentGrubenvWrite(e.index, flushed, block))
    return found


def durable_grubenv(cut: Cut, writes: Sequence[AgentGrubenvWrite]) -> DurableGrubenv | None:
    """What the grubenv must hold on the cut's disk (see `judge_disk`), if known."""
    done = [w for w in writes if w.flushed is not None and w.flushed < cut.durable]
    if not done:
        return None
    last = done[-1]
    in_flight = [w.block for w in writes if w.index > last.index and w.index < cut.at]
    return DurableGrubenv((last.block, *in_flight), f"#{last.index}", f"#{last.flushed}")


def judge_recording(
    rec: Recording,
    report: Report,
    *,
    seed: int,
    work: Path,
    say: Say,
    samples: int | set[str] = 0,
    sampler: SampleSink | None = None,
    between: int = 1,
    focus_extra: int = 2,
    only: set[str] | None = None,
) -> None:
    """Plan, replay and judge every cut of one recording; submit the drawn samples."""
    logs = {b.number: read_log(rec.path(b.log)) for b in rec.boots}
    where = layout_regions(rec.path(rec.boots[0].before))
    focus = [r for r in where if r.name in ("esp", "gpt-primary", "gpt-backup", "data")]
    esp = next(r for r in where if r.name == "esp")
    cuts = plan_cuts({n: log.entries for n, log in logs.items()}, seed,
                     between=between, focus=focus, focus_extra=focus_extra)  # fmt: skip
    if only is not None:
        cuts = [c for c in cuts if c.name in only]
    if sampler is None:
        samples = set()
    elif isinstance(samples, int):
        samples = draw_samples(cuts, logs, where, samples, seed)
    say(f"[{rec.variant}] {len(cuts)} cuts over {len(logs)} boots "
        f"({sum(len(x.entries) for x in logs.values())} log entries); "
        f"{len(samples)} to boot")  # fmt: skip
    digests: dict[tuple[object, ...], str] = {}
    work.mkdir(parents=True, exist_ok=True)
    for boot in rec.boots:
        log = logs[boot.number]
        mine = sorted((c for c in cuts if c.boot == boot.number), key=lambda c: (c.durable, c.at))
        env_writes = agent_grubenv_writes(log, esp) if rec.variant != "gptprio" else []
        with Replayer(rec.path(boot.before), log, work / "replay.img") as replayer:
            for cut in mine:
                report.cuts += 1
                report.by_kind[cut.kind] += 1
                report.by_strategy[cut.strategy] += 1
                for name in touched(log.entries, cut.pending(), where):
                    report.at_stake[name] += 1
                for name in touched(log.entries, list(cut.torn), where):
                    report.torn[name] += 1
                with replayer.replayed(cut) as disk:

                    def digest(d: Path, region: Region, length: int, cut: Cut = cut) -> str:
                        key = (replayer.content_key(cut, region), length)
                        if key not in digests:
                            digests[key] = sha256_region(d, region, length)
                        return digests[key]

                    verdict = judge_disk(
                        disk, cut=f"{rec.variant}:{cut.name}", variant=rec.variant,
                        releases=rec.releases, bootloader_sha256=rec.bootloader_sha256,
                        work=work / "judge", digest=digest,
                        durable_grubenv=durable_grubenv(cut, env_writes),
                    )  # fmt: skip
                    report.verdicts.append(verdict)
                    if not verdict.ok:
                        say(f"  {verdict.summary()}")
                    if sampler is not None and cut.name in samples:
                        sampler.submit(rec, cut, disk, verdict)
            if only is None:
                replayer.advance(len(log.entries))
                got = sha256_file(replayer.disk)
                if got != boot.after_sha256:
                    raise AssertionError(
                        f"{rec.variant} boot {boot.number}: replaying the whole log gives a disk "
                        f"with sha256 {got}, QEMU left {boot.after_sha256}"
                    )
                report.replay_checked.append(f"{rec.variant} boot {boot.number}")
        (work / "replay.img").unlink(missing_ok=True)


def recorders() -> dict[str, Callable[..., Recording]]:
    from tools.powercut.record import record_gptprio, record_grub, record_small

    return {"grub": record_grub, "gptprio": record_gptprio, "small": record_small}


class NoRecording(Exception):
    """`run(reuse=True)` found no saved recording to reuse."""


def run(
    workdir: Path,
    *,
    seed: int,
    samples: int,
    variants: Sequence[str] = ("grub", "gptprio"),
    reuse: bool = False,
    cache: Path | None = None,
    say: Say = print,
) -> Report:
    """The whole campaign (module docstring); writes workdir/report.json. With `reuse`,
    nothing is recorded: a variant without a saved recording is a `NoRecording`."""
    if reuse:
        for v in variants:
            if not (workdir / v / "recording.json").is_file():
                raise NoRecording(f"--reuse: no recording of {v} in {workdir / v} "
                                  "(run once without --reuse to record it)")  # fmt: skip
    report = Report(seed)
    start = time.monotonic()
    makers = recorders()
    recs: dict[str, Recording] = {}
    todo = [] if reuse else list(variants)
    for v in variants:
        if v not in todo:
            recs[v] = Recording.load(workdir / v)
            say(f"[{v}] reusing the recording in {workdir / v}")
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="record") as pool:
        futures = {v: pool.submit(_fresh_recording, makers[v], workdir / v, cache, say)
                   for v in todo}  # fmt: skip
        for v, future in futures.items():
            recs[v] = future.result()
    report.seconds["record"] = time.monotonic() - start
    sampler = Sampler(workdir / "samples", say) if samples else None
    start = time.monotonic()
    for v in variants:
        judge_recording(
            recs[v], report, seed=seed, work=workdir / "work" / v, say=say,
            samples=samples if v != "gptprio" else 0, sampler=sampler,
        )  # fmt: skip
    report.seconds["judge"] = time.monotonic() - start
    start = time.monotonic()
    if sampler is not None:
        report.samples = sampler.results()
    report.seconds["samples (after judging)"] = time.monotonic() - start
    out = workdir / "report.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n")
    tmp.replace(out)
    return report


def _fresh_recording(maker: Callable[..., Recording], workdir: Path, cache: Path | None,
                     say: Say) -> Recording:  # fmt: skip
    if workdir.exists():
        shutil.rmtree(workdir)
    return maker(workdir, cache=cache, say=say)
