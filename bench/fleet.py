"""Benchmark: a phased rollout to a simulated fleet of 1,000 nodes on one machine.

    python bench/fleet.py [--nodes 1000] [--max-concurrent 10] [--waves 0.1@0,0.5@20,1@40]
                          [--groups 1] [--poll 60] [--reboot-seconds 2] [--keep-dir DIR]

Each node has its own state directory, a small sparse disk laid out by the project's
layout code (GRUB A/B) and a grubenv, and runs the REAL agent (`Agent.daemon(once=True)`
per poll, `Agent.health_check()` after each simulated reboot) in a few worker processes
of `tools.fleetsim`, against one nginx on 127.0.0.1 serving a repository signed with
`sign-release` and a 3-member etcd cluster holding the reboot locks (`max_concurrent`
per group). The update 2.0.0 is signed in with `sign-release add --waves` (here the
starts are seconds after t0, a few seconds after signing). The slot a node boots after
its reboot is the one the model of the shipped GRUB script picks from its grubenv
(`tools.powercut.grubmodel`).

Reports (one JSON document on stdout, progress on stderr): bytes and requests per node
for the first poll, an idle poll and the whole update (nginx's access log, the node in
the User-Agent); the most nodes ever between "took a reboot slot" and "committed" per
group (the agents' own log records, timestamped) and the most holders etcd ever showed;
installs before their wave's start (agent log, nginx image requests, journals); the
rollout time (t0 to the last commit); CPU seconds per node (worker processes, hooks
included; nginx and etcd reported apart); peak RSS of a worker process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.fleetsim.report import report  # noqa: E402 - after the path fix above
from tools.fleetsim.run import Params, simulate  # noqa: E402


def parse_waves(spec: str) -> tuple[tuple[float, float], ...]:
    """`SHARE@SECONDS,...` (cumulative share, seconds after t0)."""
    waves = []
    for item in spec.split(","):
        share, sep, offset = item.partition("@")
        if not sep:
            raise argparse.ArgumentTypeError(f"--waves {item!r}: expected SHARE@SECONDS")
        try:
            waves.append((float(share), float(offset)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--waves {item!r}: not numbers") from None
    return tuple(waves)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Params()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--groups", type=int, default=defaults.groups, help="reboot groups")
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent)
    parser.add_argument(
        "--waves",
        type=parse_waves,
        default=defaults.waves,
        help="SHARE@SECONDS after t0, comma-separated (default 0.1@0,0.5@20,1@40)",
    )
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="per process")
    parser.add_argument("--poll", type=float, default=defaults.poll, help="seconds between polls")
    parser.add_argument("--jitter", type=float, default=defaults.jitter)
    parser.add_argument("--reboot-seconds", type=float, default=defaults.reboot_seconds)
    parser.add_argument("--image-kib", type=int, default=defaults.image_bytes >> 10)
    parser.add_argument("--timeout", type=float, default=defaults.timeout)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--keep-dir", type=Path, help="work here and keep the files")
    args = parser.parse_args(argv)
    params = Params(
        nodes=args.nodes,
        groups=args.groups,
        max_concurrent=args.max_concurrent,
        waves=args.waves,
        workers=args.workers,
        threads=args.threads,
        poll=args.poll,
        jitter=args.jitter,
        reboot_seconds=args.reboot_seconds,
        image_bytes=args.image_kib << 10,
        timeout=args.timeout,
        seed=args.seed,
    )
    started = time.time()
    print(f"bench: fleet of {params.nodes} nodes", file=sys.stderr, flush=True)
    if args.keep_dir is not None:
        figures = report(simulate(args.keep_dir, params))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir="/var/tmp"))
        try:
            figures = report(simulate(tmp / "work", params))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    figures["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
