"""Benchmark: the agent's full-image install next to `dd` - how far above the copy floor.

    python bench/copyfloor.py [--sizes 256,1024] [--runs 3] [--keep-dir DIR] [--seed 1]

For each size, in one run: an image like bench/install.py's (its `build_image`: random,
text and zero pieces) is signed into a TUF repository by the signing library behind
`sign-release` (`tools.examplerepo.make_repo`, zstd at sign-release's level) and served
by a real nginx on 127.0.0.1 (`tools.fleetsim.nginx.Nginx`, sendfile). Then, alternating,
each on a fresh disk - a sparse file laid out by the project's layout code
(`updater.disk.layout`) and attached with `losetup --direct-io=off -P`:

* `dd if=raw.img of=/dev/loopNp3 bs=4M conv=fsync` - the copy floor;
* `updater --config ... --json install --no-activate`: the agent's console script,
  booted from slot A, installing slot B (partition node of the loop device) - the
  whole process: interpreter start, imports, TUF refresh from an empty cache,
  invalidating slot B, download, decompress, hash, write, fsync and the read-back
  verification; its peak RSS from wait4.

dd runs first and after every install; each install is compared with the mean of the two
dd runs around it (a shared VM is noisy), and the median of those ratios is reported,
with every sample and the load average. After each run both slots are hashed (outside
the timing) to check they hold the image. Prints one JSON document on stdout; progress
goes to stderr. Needs root (loop devices) and nginx; the GPT is made by the layout code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.fsutil import atomic_write  # noqa: E402
from tools.examplerepo import ROOT_JSON, ImageSpec, make_repo  # noqa: E402
from tools.fleetsim.nginx import Nginx  # noqa: E402
from updater.boot.grub import initial_grubenv  # noqa: E402
from updater.disk.grubenv import write_grubenv  # noqa: E402
from updater.disk.layout import apply_layout, layout_from_dict  # noqa: E402

# bench/install.py's image builder, loaded by path: bench/ is no package, and importing
# it as bench.install would make mypy see that file under two module names.
_spec = importlib.util.spec_from_file_location("bench_install", REPO_ROOT / "bench/install.py")
assert _spec is not None and _spec.loader is not None
_bench_install = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _bench_install  # dataclasses look their module up
_spec.loader.exec_module(_bench_install)
HARDWARE: str = _bench_install.HARDWARE
VERSION: str = _bench_install.VERSION


def build_image(path: Path, size: int, seed: int) -> str:
    """bench/install.py's image: ~45% random, 35% text, 20% zeros; its sha256."""
    digest: str = _bench_install.build_image(path, size, seed)
    return digest


MiB = 1 << 20
BIN = Path(sys.executable).parent
SLOT_NUMBER = {"A": 2, "B": 3}  # partition numbers of root_a / root_b in the layout
RUN_BOUND = 900.0  # seconds: an install or dd that takes longer is a failed run


def log(message: str) -> None:
    print(f"copyfloor: {message}", file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=RUN_BOUND
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def make_disk(path: Path, slot_mib: int) -> None:
    """A sparse disk image with the GRUB A/B partitions, slots of `slot_mib` MiB."""
    doc = {
        "layout": {"description": "copyfloor: ESP, two root slots, data"},
        "partition": [
            {"name": "esp", "type": "esp", "size": "1M"},
            {"name": "root_a", "type": "root-x86-64", "size": f"{slot_mib}M"},
            {"name": "root_b", "type": "root-x86-64", "size": f"{slot_mib}M"},
            {"name": "data", "type": "linux-generic", "size": "rest"},
        ],
    }
    path.unlink(missing_ok=True)
    apply_layout(layout_from_dict(doc, "copyfloor"), path, size=(2 * slot_mib + 4) * MiB)


@contextlib.contextmanager
def attached(image: Path) -> Iterator[Path]:
    """`image` as a loop device with partition nodes (made from sysfs where no udev)."""
    device = Path(_run("losetup", "--direct-io=off", "-P", "--find", "--show", image).strip())
    created: list[Path] = []
    try:
        if not Path(f"/sys/class/block/{device.name}p3").exists():
            subprocess.run(["partx", "-a", str(device)], capture_output=True, check=False)
        for n in SLOT_NUMBER.values():
            sysfs = Path(f"/sys/class/block/{device.name}p{n}")
            node = Path(f"/dev/{device.name}p{n}")
            if not sysfs.exists():
                raise RuntimeError(f"the kernel did not make partition {n} of {device}")
            if not node.exists():
                major, minor = (int(x) for x in (sysfs / "dev").read_text().split(":"))
                os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
                created.append(node)
        yield device
    finally:
        for node in created:
            node.unlink(missing_ok=True)
        subprocess.run(["losetup", "-d", str(device)], capture_output=True, check=False)


def slot_sha(device: Path, slot: str, length: int) -> str:
    digest = hashlib.sha256()
    with open(f"/dev/{device.name}p{SLOT_NUMBER[slot]}", "rb") as f:
        left = length
        while left:
            data = f.read(min(left, 8 * MiB))
            if not data:
                break
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def node_env(work: Path) -> dict[str, str]:
    """The agent's environment: byte code cached, as on a node (whose image is compiled
    when it is built) - this VM sets PYTHONDONTWRITEBYTECODE, which would make every
    start compile the tree from source. `compile_tree` fills the cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def compile_tree(work: Path) -> None:
    dirs = [str(REPO_ROOT / d) for d in ("core", "updater")]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *dirs],
        env=node_env(work),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=RUN_BOUND,
    )


def timed(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run `args`; (wall seconds, peak RSS in MiB, stdout). The peak RSS is GNU time's
    (%M): the benchmark's own high-water mark would be carried over fork+exec into a
    child's ru_maxrss (see bench/install.py), GNU time's is a few MiB."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", *args], stdout=out, stderr=err, env=env,
            timeout=RUN_BOUND, check=False,
        )  # fmt: skip
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {done.returncode}: {errors.strip()}")
    return wall, int(errors.strip().splitlines()[-1]) / 1024, text


def run_dd(work: Path, raw: Path, slot_mib: int, size: int, sha: str, n: int) -> float:
    disk = work / f"dd-{n}.img"
    make_disk(disk, slot_mib)
    try:
        with attached(disk) as device:
            wall, _rss, _out = timed(
                ["dd", f"if={raw}", f"of=/dev/{device.name}p3", "bs=4M", "conv=fsync",
                 "status=none"]
            )  # fmt: skip
            if slot_sha(device, "B", size) != sha:
                raise RuntimeError(f"dd run {n}: slot B does not hold the image")
    finally:
        disk.unlink(missing_ok=True)
    return wall


def _config(node: Path, device: Path, url: str) -> Path:
    grubenv = node / "grubenv"
    write_grubenv(grubenv, initial_grubenv("A"))
    atomic_write(node / "os-release", b'NAME="copyfloor"\nIMAGE_VERSION="0.1.0"\n')
    config = node / "config.toml"
    text = f"""
[repository]
metadata_url = "{url}/metadata"
targets_url = "{url}/targets"
trusted_root = "{ROOT_JSON}"
allow_example_keys = true  # a benchmark: the repository is signed with keys-example/
[device]
hardware = "{HARDWARE}"
disk = "{device}"
bootloader = "grub"
grubenv = "{grubenv}"
booted_slot = "A"
state_dir = "{node / "state"}"
os_release = "{node / "os-release"}"
[slots.A]
root = "root_a"
[slots.B]
root = "root_b"
[hooks]
pre_reboot = ["true"]
reboot = ["true"]
"""
    atomic_write(config, text.encode())
    return config


def run_install(work: Path, url: str, slot_mib: int, size: int, sha: str, n: int) -> dict[str, Any]:
    disk = work / f"install-{n}.img"
    node = work / f"node-{n}"
    shutil.rmtree(node, ignore_errors=True)
    node.mkdir()
    make_disk(disk, slot_mib)
    try:
        with attached(disk) as device:
            config = _config(node, device, url)
            args = [str(BIN / "updater"), "--config", str(config), "--json"]
            wall, rss, out = timed([*args, "install", "--no-activate"], node_env(work))
            result = json.loads(out.strip().splitlines()[-1])
            if slot_sha(device, "B", size) != sha:
                raise RuntimeError(f"install run {n}: slot B does not hold the image")
    finally:
        disk.unlink(missing_ok=True)
        shutil.rmtree(node, ignore_errors=True)
    image = result.get("images", {}).get("root", {})
    return {"seconds": wall, "peak_rss_mib": rss, "write_image_seconds": image.get("seconds")}


def bench_size(work: Path, size_mib: int, runs: int, seed: int) -> dict[str, Any]:
    size = size_mib * MiB
    slot_mib = size_mib + 4
    raw = work / f"raw-{size_mib}.img"
    log(f"{size_mib} MiB: building the image")
    sha = build_image(raw, size, seed)
    repo = work / f"repo-{size_mib}"
    shutil.rmtree(repo, ignore_errors=True)
    log(f"{size_mib} MiB: signing it (zstd)")
    make_repo(repo, [ImageSpec(raw, VERSION, hardware=(HARDWARE,), compression="zstd")])
    compressed = next((repo / "targets").rglob("*.zst")).stat().st_size
    load_before = _load()
    with Nginx(repo, work / f"nginx-{size_mib}") as server:
        dds = [run_dd(work, raw, slot_mib, size, sha, 0)]
        installs: list[dict[str, Any]] = []
        for n in range(1, runs + 1):
            log(f"{size_mib} MiB: run {n}/{runs}: install, then dd (load {_load()[0]})")
            installs.append(run_install(work, server.url, slot_mib, size, sha, n))
            dds.append(run_dd(work, raw, slot_mib, size, sha, n))
    raw.unlink()
    shutil.rmtree(repo, ignore_errors=True)
    seconds = [float(i["seconds"]) for i in installs]
    ratios = [t / ((dds[i] + dds[i + 1]) / 2) for i, t in enumerate(seconds)]
    return {
        "size_mib": size_mib,
        "compressed_mib": round(compressed / MiB, 1),
        "runs": runs,
        "ratio_install_to_dd": round(statistics.median(ratios), 3),
        "ratio_install_to_dd_all": [round(r, 3) for r in ratios],
        "install_seconds": round(statistics.median(seconds), 3),
        "install_seconds_all": [round(t, 3) for t in seconds],
        "install_write_image_seconds_all": [i["write_image_seconds"] for i in installs],
        "install_peak_rss_mib_all": [round(float(i["peak_rss_mib"]), 1) for i in installs],
        "dd_seconds": round(statistics.median(dds), 3),
        "dd_seconds_all": [round(d, 3) for d in dds],
        "load_before": load_before,
        "load_after": _load(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="image sizes in MiB, comma separated")
    parser.add_argument("--runs", type=int, default=3, help="installs per size (median)")
    parser.add_argument("--keep-dir", type=Path, help="work here (files are still removed)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: not a comma-separated list of MiB")
    if args.runs <= 0 or any(s <= 0 for s in sizes):
        parser.error("--sizes and --runs must be positive")
    if os.geteuid() != 0:
        parser.error("needs root (loop devices)")
    with contextlib.ExitStack() as stack:
        if args.keep_dir:
            work = args.keep_dir
            work.mkdir(parents=True, exist_ok=True)
        else:
            # /var/tmp: on disk, not a tmpfs, so both really write a disk.
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/var/tmp")))
        compile_tree(work)
        results = [bench_size(work, s, args.runs, args.seed) for s in sizes]
    print(
        json.dumps(
            {
                "sizes": results,
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "commit": _run("git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD").strip(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
