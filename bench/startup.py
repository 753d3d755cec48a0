"""Benchmark: process start-up of the agent's everyday commands on a real node state.

    python bench/startup.py [--runs 30] [--tree DIR] [--no-site] [--compile-every-start]
                            [--keep-dir DIR]

Builds a node state once, all real: a 1 GiB sparse disk laid out with `updater layout
apply partition-layouts/grub-efi-ab.toml`, a grubenv made by `grub-editenv` (slot A
committed, B empty), the example trusted root, and a config with `booted_slot = "A"` and
no health checks. Then it runs each measured command `--runs` times as its own process
and reports the wall time (median, min, p90, every sample) and the CPU time (user + sys
of that child, from `RUSAGE_CHILDREN`) per command:

* `updater --json status`, `updater status --json` and `updater health-check` (the
  commands of every boot and every look - the fast-start goal is <= 120 ms wall);
* `python -c pass` and `python -c "import click"`: the floor any click CLI stands on,
  and `python -S -c pass`: the interpreter without `site` (the venv's .pth files,
  among them the editable install's import finder, which a node does not have).

The commands run round-robin (one of each, repeated), so a burst of load from elsewhere
spreads over all of them. The agent is started exactly as its console script starts it
(`from updater.cli import main; sys.exit(main())`) with `PYTHONPATH=<tree>` from an
empty directory, so `--tree` can point at an unpacked older commit (`git archive
a1f9770 | tar -x -C /tmp/before`) run by the same interpreter. Finally one
`python -X importtime` run per agent command lists the modules it imported that cost
most (self and cumulative) and which heavy packages (tuf, requests, cryptography, ...)
were imported at all. With `--no-site` the agent runs as `python -S` with the
interpreter's site-packages on PYTHONPATH, as on a node (a plain path, no .pth import
hooks: the venv's editable install adds an import finder to every start here).

Bytecode: by default the children may write .pyc files, into a cache in the work
directory (`PYTHONPYCACHEPREFIX`), and the warm-up run fills it - as on a node, whose
image is compiled when it is built. `--compile-every-start` measures what this
development VM does instead (`PYTHONDONTWRITEBYTECODE=1` and no `__pycache__` in the
tree): the tree's modules are compiled from source at every start.
Prints one JSON document on stdout; progress goes to stderr.
The machine's load average before and after is in the JSON: measure on a quiet host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# What the console script does (see the generated `.venv/bin/updater`).
ENTRY = "import sys; from updater.cli import main; sys.argv[0] = 'updater'; sys.exit(main())"
# Top-level packages that must not be imported on the everyday paths (docs/architecture).
HEAVY = (
    "tuf",
    "securesystemslib",
    "requests",
    "urllib3",
    "cryptography",
    "zstandard",
    "pyudev",
    "core.repository",
    "core.fetcher",
    "core.decompress",
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    tree: Path  # the source tree whose agent runs
    python: str  # the interpreter (a venv's, with click, construct, ... installed)
    runs: int
    top: int  # modules listed per importtime profile
    no_site: bool  # run the agent as `python -S`, site-packages on PYTHONPATH
    bytecode_cache: bool  # .pyc files cached (a node) or compiled at every start


def build_node(work: Path, python: str, env: dict[str, str]) -> Path:
    """Lay out a disk and a grubenv and write a config; returns the config's path."""
    disk, grubenv = work / "disk.img", work / "grubenv"
    layout = REPO_ROOT / "partition-layouts" / "grub-efi-ab.toml"
    updater = [python, "-c", ENTRY]
    subprocess.run(
        [*updater, "layout", "apply", str(layout), str(disk), "--size", "1G", "--force"],
        check=True,
        capture_output=True,
        env=env,
        cwd=work,
    )
    grubenv.unlink(missing_ok=True)
    subprocess.run(["grub-editenv", str(grubenv), "create"], check=True)
    env_vars = ["ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0"]
    subprocess.run(["grub-editenv", str(grubenv), "set", *env_vars], check=True)
    (work / "os-release").write_text('NAME="node"\nIMAGE_VERSION="1.0.0"\n')
    config = work / "config.toml"
    config.write_text(
        f"""# bench/startup.py: a node whose booted slot A is committed; no health checks.
[repository]
metadata_url = "http://127.0.0.1:9/metadata"
targets_url = "http://127.0.0.1:9/targets"
trusted_root = "{REPO_ROOT / "keys-example" / "root.json"}"
allow_example_keys = true  # a benchmark: nothing is fetched
[device]
hardware = "x86_64-efi"
disk = "{disk}"
bootloader = "grub"
grubenv = "{grubenv}"
booted_slot = "A"
state_dir = "{work / "state"}"
os_release = "{work / "os-release"}"
[slots.A]
root = "root_a"
[slots.B]
root = "root_b"
"""
    )
    return config


def commands(python: str, config: Path, no_site: bool) -> dict[str, list[str]]:
    agent = [python, *(["-S"] if no_site else []), "-c", ENTRY, "--config", str(config)]
    return {
        "updater --json status": [*agent, "--json", "status"],
        "updater status --json": [*agent, "status", "--json"],
        "updater health-check": [*agent, "health-check"],
        "python -c pass": [python, "-c", "pass"],
        "python -S -c pass": [python, "-S", "-c", "pass"],
        "python -c 'import click'": [python, "-c", "import click"],
    }


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one child process; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, cwd=cwd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    ms = [round(s * 1000, 1) for s in samples]
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1),
        "all_ms": ms,
    }


def import_profile(argv: list[str], env: dict[str, str], cwd: Path, top: int) -> dict[str, Any]:
    """One `-X importtime` run: total, the costliest modules, the heavy ones imported."""
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env, cwd=cwd
    )
    rows: list[tuple[str, int, int]] = []  # (module, self us, cumulative us)
    total_us = 0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, field = line.removeprefix("import time:").split("|")
        rows.append((field.strip(), int(self_us), int(cumulative_us)))
        # Depth 0 (one space after the bar, no indentation): a root of the import
        # tree; the roots' cumulative times add up to the whole.
        if not field.startswith("  "):
            total_us += int(cumulative_us)
    names = {name for name, _, _ in rows}
    return {
        "imports_ms": round(total_us / 1000, 1),
        "modules": len(rows),
        "heavy_imported": sorted(
            h for h in HEAVY if h in names or any(n.startswith(h + ".") for n in names)
        ),
        "top_self_ms": [
            [name, round(s / 1000, 1)] for name, s, _ in sorted(rows, key=lambda r: -r[1])[:top]
        ],
        "top_cumulative_ms": [
            [name, round(c / 1000, 1)]
            for name, _, c in sorted(rows, key=lambda r: -r[2])[:top]
            if name.split(".")[0] not in ("encodings", "site")
        ],
    }


def site_packages(python: str) -> str:
    """The interpreter's site-packages (where click, construct, ... are installed)."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def child_env(work: Path, opts: Options) -> dict[str, str]:
    path = [str(opts.tree)]
    if opts.no_site:
        path.append(site_packages(opts.python))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.pop("JOURNAL_STREAM", None)
    if opts.bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def run(work: Path, opts: Options) -> dict[str, Any]:
    load_before = os.getloadavg()
    log(f"building the node state in {work} with the CLI of {opts.tree}")
    env = child_env(work, opts)
    config = build_node(work, opts.python, env)
    cwd = work / "cwd"  # empty: `python -c` puts the cwd first on sys.path
    cwd.mkdir(exist_ok=True)
    measured = commands(opts.python, config, opts.no_site)
    for argv in measured.values():  # warm the page cache (and the .pyc cache)
        run_once(argv, env, cwd)
    wall: dict[str, list[float]] = {name: [] for name in measured}
    cpu: dict[str, list[float]] = {name: [] for name in measured}
    for n in range(opts.runs):
        if n % 10 == 0:
            log(f"round {n + 1}/{opts.runs}")
        for name, argv in measured.items():
            w, c = run_once(argv, env, cwd)
            wall[name].append(w)
            cpu[name].append(c)
    profiles = {
        name: import_profile(argv, env, cwd, opts.top)
        for name, argv in measured.items()
        if name.startswith("updater")
    }
    return {
        "tree": str(opts.tree),
        "no_site": opts.no_site,
        "bytecode_cache": opts.bytecode_cache,
        "runs": opts.runs,
        "wall": {name: summary(s) for name, s in wall.items()},
        "cpu": {name: summary(s) for name, s in cpu.items()},
        "importtime": profiles,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "interpreter": opts.python,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each command")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="source tree to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter (a venv's)")
    parser.add_argument("--top", type=int, default=12, help="modules listed per command")
    parser.add_argument("--no-site", action="store_true", help="run the agent as python -S")
    parser.add_argument(
        "--compile-every-start", action="store_true", help="no .pyc cache (see above)"
    )
    parser.add_argument("--keep-dir", type=Path, help="work here and keep the files")
    args = parser.parse_args(argv)
    if args.runs <= 0 or args.top <= 0:
        parser.error("--runs and --top must be positive")
    tree = args.tree.resolve()
    if not (tree / "updater" / "cli.py").exists() and not (tree / "updater" / "cli").is_dir():
        parser.error(f"--tree {tree}: no updater/cli.py or updater/cli/ there")
    if args.compile_every_start and any(tree.glob("*/__pycache__")):
        parser.error(f"--tree {tree} holds __pycache__ directories: it would not compile")
    opts = Options(
        tree, args.python, args.runs, args.top, args.no_site, not args.compile_every_start
    )
    if args.keep_dir:
        args.keep_dir.mkdir(parents=True, exist_ok=True)
        result = run(args.keep_dir.resolve(), opts)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            result = run(Path(tmp), opts)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
