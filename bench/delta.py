"""Benchmark: a delta install against a full one, on real node images (docs/delta.md).

    python bench/delta.py [--cache DIR] [--package less] [--keep-dir DIR]

Builds two consecutive root filesystem images with the e2e builder's own steps
(`tools/node`: the trimmed minimal Debian, the agent, its config, then the builder's
`mkfs.ext4 -d`): release N, and N+1 = N plus one Debian package (`apt-get download`,
`dpkg --root` into the tree) and its new version file. Both are signed into one
repository (zstd seekable + chunk index, `tools/examplerepo`) served by nginx on
127.0.0.1 (Range requests; its access log counts the requests). Slot A of a sparse disk
gets N the way the agent installs it (recording A's chunk index); then N+1 is installed
into slot B twice, each in a child process that does nothing else: `--full` (the whole
stream) and by delta (`updater.delta.install_partition`, reusing slot A's chunks).

The pair is built twice: with the builder's mkfs as it is (a random filesystem UUID
and directory hash seed per build) and with a reproducible mkfs (`-U`, `-E hash_seed=`
and `E2FSPROGS_FAKE_TIME` fixed), which is what a release pipeline that wants small
deltas should run. No kernel-upgrade pair: the builder installs the one kernel of its
Debian suite, so there is no second kernel to upgrade to without a second suite.

Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MiB = 1 << 20
HARDWARE = "x86_64-efi"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def build_tree(cache: Path, version: str, out: Path, package: Path | None) -> Path:
    """The staged rootfs of release `version` (the e2e builder's steps), plus `package`."""
    from tools.node import release as builder
    from tools.node.rootfs import base_rootfs, python_deps

    stage = out / f"stage-{version}"
    subprocess.run(["cp", "-a", base_rootfs(cache) / "rootfs", stage], check=True)
    builder._install_agent(stage, python_deps(cache) / "site")
    builder._configure(
        stage,
        version,
        "pass",
        False,
        builder.DEFAULT_BOOT_COMMANDS,
        builder.agent_config(),
        builder.DEFAULT_TRUSTED_ROOT,
    )
    if package is not None:
        subprocess.run(
            ["dpkg", "--root", stage, "--force-script-chrootless", "-i", package],
            check=True,
            capture_output=True,
        )
    return stage


def mkfs(tree: Path, image: Path, *, reproducible: bool) -> None:
    """The builder's mkfs (tools/node/release.py `_mkfs`), or the same made reproducible."""
    from tools.node import release as builder

    if not reproducible:
        builder._mkfs(tree, image, "root_a")
        return
    used = int(subprocess.run(["du", "-sb", tree], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    size = (used * 5 // 4 + 24 * MiB + 4 * MiB - 1) // (4 * MiB) * (4 * MiB)
    with image.open("wb") as f:
        f.truncate(max(size, 300 * MiB))  # both images the same size: no moved groups
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run(
        [
            "mkfs.ext4", "-q", "-F", "-L", "root_a", "-m", "0", "-J", "size=4",
            "-U", "6f1d2c3b-0000-4000-8000-000000000001",
            "-E", "root_owner=0:0,hash_seed=6f1d2c3b-0000-4000-8000-000000000002",
            "-d", tree, image,
        ],
        check=True, capture_output=True, env=env,
    )  # fmt: skip


NGINX = """
daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port}; root {root}; sendfile on; }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child(args: argparse.Namespace) -> None:
    """One install into slot B in this process; prints its figures as JSON."""
    from core.release import releases
    from core.repository import Repository
    from tools.examplerepo import ROOT_JSON
    from updater import delta, install
    from updater.slots import PartitionTarget

    spec = json.loads(args.child)
    disk, size = Path(spec["disk"]), spec["slot_size"]
    slot_a = PartitionTarget("A", "root", "root_a", disk, MiB, size)
    slot_b = PartitionTarget("B", "root", "root_b", disk, MiB + size, size)
    booted, target = (slot_b, slot_a) if spec["into"] == "A" else (slot_a, slot_b)
    repo = Repository(
        f"{spec['url']}/metadata", f"{spec['url']}/targets", ROOT_JSON,
        Path(spec["tuf"]), allow_example_keys=True,
    )  # fmt: skip
    repo.refresh()
    (rel,) = [
        r for r in releases(repo.targets(), HARDWARE, "stable") if r.version == spec["version"]
    ]
    started = time.monotonic()
    result = delta.install_partition(
        repo,
        rel.images["root"],
        target,
        guard=install.SlotGuard([booted]),
        index_dir=Path(spec["index_dir"]),
        booted=booted,
        full=spec["full"],
    )
    seconds = time.monotonic() - started
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({
        "seconds": round(seconds, 3), "fetched": result.fetched, "reused": result.reused,
        "delta": result.delta, "peak_rss_mib": round(hwm / 1024, 1),
    }))  # fmt: skip


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bench child failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(work: Path, old: Path, new: Path, label: str) -> dict[str, Any]:
    from tools.examplerepo import ImageSpec, make_repo

    repo = make_repo(work / f"repo-{label}", [ImageSpec(old, "1.0.0"), ImageSpec(new, "1.1.0")])
    port = free_port()
    ngx = work / f"nginx-{label}"
    ngx.mkdir()
    (ngx / "nginx.conf").write_text(NGINX.format(dir=ngx, port=port, root=repo))
    server = subprocess.Popen(["nginx", "-c", str(ngx / "nginx.conf"), "-p", str(ngx)])
    try:
        for _ in range(100):
            if (ngx / "nginx.pid").exists():
                break
            time.sleep(0.05)
        size = max(old.stat().st_size, new.stat().st_size) + MiB
        disk = work / f"disk-{label}.img"
        with disk.open("wb") as f:
            f.truncate(MiB + 2 * size + MiB)
        index_dir = work / f"index-{label}"
        base: dict[str, Any] = {
            "disk": str(disk), "slot_size": size, "url": f"http://127.0.0.1:{port}",
            "tuf": str(work / f"tuf-{label}"), "index_dir": str(index_dir),
        }  # fmt: skip
        log(f"{label}: installing 1.0.0 into slot A (records its index)")
        run_child({**base, "into": "A", "version": "1.0.0", "full": False})
        results = {}
        for mode in ("full", "delta"):
            (index_dir / "B.root.index").unlink(missing_ok=True)
            before = len((ngx / "access.log").read_text().splitlines())
            log(f"{label}: installing 1.1.0 into slot B ({mode})")
            r = run_child({**base, "into": "B", "version": "1.1.0", "full": mode == "full"})
            lines = (ngx / "access.log").read_text().splitlines()[before:]
            r["http_requests"] = sum(".root.img.zst" in line for line in lines)
            results[mode] = r
        stored = next((repo / "targets" / HARDWARE / "1.1.0").glob("*.root.img.zst"))
        full_bytes = stored.stat().st_size
        fetched = results["delta"]["fetched"]
        return {
            "raw_bytes": new.stat().st_size,
            "full_download_bytes": full_bytes,
            "delta_bytes_fetched": fetched,
            "delta_fraction": round(fetched / full_bytes, 4),
            "bytes_reused": results["delta"]["reused"],
            "http_requests": {m: results[m]["http_requests"] for m in results},
            "seconds": {m: results[m]["seconds"] for m in results},
            "peak_rss_mib": {m: results[m]["peak_rss_mib"] for m in results},
            "goals": {
                "fetched_le_5pct": fetched <= 0.05 * full_bytes,
                "delta_not_slower": results["delta"]["seconds"] <= results["full"]["seconds"],
                "rss_le_64mib": max(r["peak_rss_mib"] for r in results.values()) <= 64,
            },
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "e2e")
    parser.add_argument("--package", default="less", help="the Debian package N+1 adds")
    parser.add_argument("--keep-dir", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-delta-", dir=args.keep_dir))
    work.chmod(0o755)  # nginx's workers (not root) read the repository below it
    try:
        subprocess.run(
            ["apt-get", "download", args.package], cwd=work, check=True, capture_output=True
        )
        (deb,) = work.glob("*.deb")
        pairs = {}
        trees = {v: build_tree(args.cache, v, work, deb if v == "1.1.0" else None)
                 for v in ("1.0.0", "1.1.0")}  # fmt: skip
        for label, reproducible in (("builder-mkfs", False), ("reproducible-mkfs", True)):
            images = {}
            for version, tree in trees.items():
                images[version] = work / f"{label}-{version}.ext4"
                mkfs(tree, images[version], reproducible=reproducible)
            log(f"{label}: images built")
            pairs[label] = measure(work, images["1.0.0"], images["1.1.0"], label)
        print(json.dumps({"package_added": deb.name, "pairs": pairs}, indent=2))
    finally:
        if args.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
