"""Benchmark: a delta install against a full one, on real node images (docs/delta.md).

    python bench/delta.py [--cache DIR] [--package less] [--keep-dir DIR] [--no-kernel]

Builds two consecutive root filesystem images with the e2e builder's own steps
(`tools/node`: the trimmed minimal Debian, the agent, its config, then the builder's
`mkfs.ext4 -d`): release N, and N+1 = N plus one Debian package (`apt-get download`,
`dpkg --root` into the tree) and its new version file. Both are signed into one
repository (zstd seekable + chunk index, `tools/examplerepo`) served by nginx on
127.0.0.1 (Range requests; its access log counts the requests). Slot A of a sparse disk
gets N the way the agent installs it (recording A's chunk index); then N+1 is installed
into slot B twice, each in a child process that does nothing else: `--full` (the whole
stream) and by delta (`updater.delta.install_partition`, reusing slot A's chunks).

The one-package pair is built three ways: with the builder's mkfs as it is (a random
filesystem UUID and directory hash seed per build), with a reproducible mkfs (`-U`,
`-E hash_seed=` and `E2FSPROGS_FAKE_TIME` fixed), and with stable placement: N by the
builder's mkfs, N+1 built from N's image by `tools/node/incremental.py` (unchanged
files keep their blocks). A kernel-upgrade pair follows: N+1 = N with the newest
bookworm cloud kernel of deb.debian.org (bookworm + bookworm-security, `apt-get
download` with a private sources list and apt state under the work directory, so the
host's apt is untouched) in place of the builder's, installed the way
`tools/node/rootfs.py` `_keep_kernel` keeps one kernel and the node's few modules;
built with the builder's mkfs and incrementally.

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
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def build_tree(cache: Path, version: str, out: Path, package: Path | None, name: str = "") -> Path:
    """The staged rootfs of release `version` (the e2e builder's steps), plus `package`."""
    from tools.node import release as builder
    from tools.node.rootfs import base_rootfs, python_deps

    stage = out / f"stage-{name or version}"
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


def apt_options(work: Path) -> list[str]:
    """apt-get/apt-cache options for a private apt: bookworm + bookworm-security only."""
    from tools.node.rootfs import MIRROR, SUITE

    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (apt / "sources.list").write_text(
        f"deb [signed-by={keyring}] {MIRROR} {SUITE} main\n"
        f"deb [signed-by={keyring}] {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    settings = {
        "Dir::Etc::SourceList": apt / "sources.list", "Dir::Etc::SourceParts": "/dev/null",
        "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": apt / "preferences.d",
        "Dir::State::Lists": apt / "lists", "Dir::Cache": apt / "cache",
        "Dir::State::status": "/dev/null",
    }  # fmt: skip
    return [arg for k, v in settings.items() for arg in ("-o", f"{k}={v}")]


def newer_kernel(work: Path, current: str) -> Path:
    """The .deb of the newest bookworm cloud kernel, which must be newer than `current`."""
    options = apt_options(work)
    subprocess.run(["apt-get", *options, "update"], check=True, capture_output=True)
    depends = subprocess.run(
        ["apt-cache", *options, "depends", "linux-image-cloud-amd64"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    names = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names or names[0] == f"linux-image-{current}":
        raise SystemExit(
            f"bench: no kernel newer than {current} in bookworm(-security): {names or depends}"
        )
    out = work / "kernel"
    out.mkdir()
    subprocess.run(["apt-get", *options, "download", names[0]], cwd=out, check=True,
                   capture_output=True)  # fmt: skip
    (deb,) = out.glob("*.deb")
    return deb


def kernel_tree(cache: Path, out: Path, deb: Path) -> Path:
    """Release 1.1.0 = 1.0.0 with the kernel of `deb` in place of the builder's."""
    from tools.node.rootfs import _keep_kernel

    stage = build_tree(cache, "1.1.0", out, None, name="1.1.0-kernel")
    extract = out / "kernel-deb"
    subprocess.run(["dpkg-deb", "-x", deb, extract], check=True)
    old = (stage / "etc/e2e/kernel-version").read_text().strip()
    shutil.rmtree(stage / "usr/lib/modules" / old)
    (stage / "boot/vmlinuz").unlink()
    for path in (extract / "boot").iterdir():
        shutil.copy2(path, stage / "boot" / path.name)
    (moddir,) = [p for p in (extract / "lib/modules", extract / "usr/lib/modules") if p.is_dir()]
    (new,) = moddir.iterdir()
    shutil.copytree(new, stage / "usr/lib/modules" / new.name, symlinks=True)
    subprocess.run(["chroot", stage, "depmod", new.name], check=True)  # as its postinst does
    _keep_kernel(stage)  # the builder's own step: /boot/vmlinuz, the node's modules, depmod
    return stage


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
    load = os.getloadavg()[0]
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
        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
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
            "load_1min_before_after": {m: results[m]["load_1min"] for m in results},
            "goals": {
                "fetched_le_5pct": fetched <= 0.05 * full_bytes,
                "delta_not_slower": results["delta"]["seconds"] <= results["full"]["seconds"],
                "rss_le_64mib": max(r["peak_rss_mib"] for r in results.values()) <= 64,
            },
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def incremental_pair(
    work: Path, base: Path, tree: Path, label: str, builds: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Release N+1 built from N's image (`tools/node/incremental.py`), then measured."""
    from dataclasses import asdict

    from tools.node.incremental import build_incremental

    new = work / f"{label}-1.1.0.ext4"
    stats = build_incremental(base, tree, new, "root_a")
    builds[f"{label}-1.1.0"] = asdict(stats)
    log(f"{label}: N+1 built from N's image in {stats.seconds} s")
    return measure(work, base, new, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "e2e")
    parser.add_argument("--package", default="less", help="the Debian package N+1 adds")
    parser.add_argument("--keep-dir", type=Path)
    parser.add_argument("--no-kernel", action="store_true", help="skip the kernel pair")
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
        builds: dict[str, dict[str, Any]] = {}
        for label, reproducible in (("builder-mkfs", False), ("reproducible-mkfs", True)):
            images = {}
            for version, tree in trees.items():
                images[version] = work / f"{label}-{version}.ext4"
                started = time.monotonic()
                mkfs(tree, images[version], reproducible=reproducible)
                builds[f"{label}-{version}"] = {"seconds": round(time.monotonic() - started, 3)}
            log(f"{label}: images built")
            pairs[label] = measure(work, images["1.0.0"], images["1.1.0"], label)
        base = work / "builder-mkfs-1.0.0.ext4"  # release N as the builder makes it today
        pairs["stable-placement"] = incremental_pair(
            work, base, trees["1.1.0"], "stable-placement", builds
        )
        kernels: dict[str, str] = {}
        if not args.no_kernel:
            current = (trees["1.0.0"] / "etc/e2e/kernel-version").read_text().strip()
            kdeb = newer_kernel(work, current)
            ktree = kernel_tree(args.cache, work, kdeb)
            kernels = {"from": current, "to": kdeb.name}
            new = work / "kernel-builder-mkfs-1.1.0.ext4"
            started = time.monotonic()
            mkfs(ktree, new, reproducible=False)
            builds["kernel-builder-mkfs-1.1.0"] = {"seconds": round(time.monotonic() - started, 3)}
            pairs["kernel-builder-mkfs"] = measure(work, base, new, "kernel-builder-mkfs")
            pairs["kernel-stable-placement"] = incremental_pair(
                work, base, ktree, "kernel-stable-placement", builds
            )
        print(json.dumps(
            {"package_added": deb.name, "kernel": kernels, "image_builds": builds,
             "pairs": pairs}, indent=2,
        ))  # fmt: skip
    finally:
        if args.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
