"""Benchmark: install one image from a signed TUF repository over HTTP into a disk slot.

    python bench/install.py --size-mib 1024 [--keep-dir DIR]

Builds an N MiB raw image (deterministic mix of random, text and zero blocks), signs it
into a TUF repository with the real signing library (zstd, via tools/examplerepo.py),
serves the repository with an HTTP server on 127.0.0.1 (http.server with sendfile; the
fault-injecting tests/httpserver.py holds whole files in memory), and installs it into slot B of
a sparse disk image exactly as the agent does: `Repository.refresh`, `release.releases`,
`stream_target` -> `install.write_image` (decompress, hash, write, fsync, read back).
The install runs in a child process that does nothing else, so its peak RSS
(`ru_maxrss`) is the install's, not the image builder's. The child is started first,
while the parent is still small: Linux carries the parent's RSS high-water mark over
fork+exec into the child's `ru_maxrss`, so a child forked after building the image would
report the builder's peak. `VmHWM` from /proc/self/status (reset by exec) is reported
beside it as a cross-check.

In the same run, `dd ... bs=4M conv=fsync,notrunc` copies the raw image into the same
slot: once to allocate the sparse file's blocks (so every measured write overwrites
allocated blocks), then once before and once after each install. The disk and CPUs of
a shared VM are noisy, so each install is compared with the mean of the two dd runs
around it, and the medians of `--runs` such pairs are reported, with every sample.
Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MiB = 1 << 20
HARDWARE = "x86_64-efi"
VERSION = "1.0.0"
SLOT_A_OFFSET = MiB


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def build_image(path: Path, size: int, seed: int) -> str:
    """Write a semi-compressible image, 64 KiB pieces: ~45% random, 35% text, 20% zero.

    Random pieces stand for already-compressed content (squashfs, binaries), text for
    configs and scripts, zeros for free space. Returns the sha256.
    """
    rng = random.Random(seed)
    digest = hashlib.sha256()
    piece = 64 * 1024
    words = [f"{w}{i}" for i, w in enumerate(("lib", "usr", "etc", "conf", "unit", "x86"))]
    with path.open("wb") as f:
        left = size
        while left > 0:
            block = bytearray()
            for _ in range(16):  # 1 MiB per write
                kind = rng.random()
                if kind < 0.45:
                    block += rng.randbytes(piece)
                elif kind < 0.80:
                    line = " ".join(rng.choices(words, k=8)) + f" {rng.getrandbits(32)}\n"
                    block += (line * (piece // len(line) + 1)).encode()[:piece]
                else:
                    block += bytes(piece)
            data = bytes(block[:left])
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def build_repository(work: Path, raw: Path) -> Path:
    from tools.examplerepo import ImageSpec, make_repo

    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    make_repo(repo, [ImageSpec(raw, VERSION, hardware=(HARDWARE,), compression="zstd")])
    return repo


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The stdlib file server, sending bodies with sendfile(2) as nginx or a CDN would,
    so the server's own copying does not eat the CPU the install is measured on."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        outputfile.flush()
        self.connection.sendfile(source)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def dd(raw: Path, disk: Path, offset: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            "dd", f"if={raw}", f"of={disk}", "bs=4M", "conv=fsync,notrunc",
            f"seek={offset}", "oflag=seek_bytes", "status=none",
        ],
        check=True,
    )  # fmt: skip
    return time.monotonic() - started


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def install_child() -> dict[str, Any]:
    """The measured part: runs in its own process (see `--child`); spec on stdin."""
    from core import release
    from core.repository import Repository
    from updater.install import SlotGuard, write_image
    from updater.slots import PartitionTarget

    spec = json.loads(sys.stdin.readline())  # waits until the parent has built everything
    disk, slot_size = Path(spec["disk"]), int(spec["slot_size"])
    slot_a = PartitionTarget("A", "root", "root-a", disk, SLOT_A_OFFSET, slot_size)
    slot_b = PartitionTarget("B", "root", "root-b", disk, SLOT_A_OFFSET + slot_size, slot_size)
    started = time.monotonic()
    repo = Repository(
        spec["url"] + "/metadata/",
        spec["url"] + "/targets/",
        Path(spec["root"]),
        Path(spec["cache"]),
        allow_example_keys=True,  # a benchmark: the repository is signed with keys-example/
    )
    repo.refresh()
    newest = release.releases(repo.targets(), HARDWARE, "stable")[-1]
    image = newest.images["root"]
    result = write_image(
        repo.stream_target(image.target),
        slot_b,
        compression=image.compression,
        raw_length=image.raw_length,
        raw_sha256=image.raw_sha256,
        guard=SlotGuard([slot_a]),
    )
    wall = time.monotonic() - started
    return {
        "install_seconds": wall,
        "write_seconds": result.write_seconds,
        "verify_seconds": result.verify_seconds,
        "compressed_bytes": result.compressed_bytes,
        "bytes_written": result.bytes_written,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vm_hwm_mib": _vm_hwm_mib(),
    }


def run(size_mib: int, work: Path, seed: int, runs: int) -> dict[str, Any]:
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(runs)
    ]
    try:
        return _run(size_mib, work, seed, children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _install(child: subprocess.Popen[str], spec: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(spec["cache"], ignore_errors=True)  # a node's first update: full refresh
    out, _err = child.communicate(json.dumps(spec) + "\n")
    if child.returncode != 0:
        raise RuntimeError(f"install child failed with exit code {child.returncode}")
    measured: dict[str, Any] = json.loads(out)
    return measured


def _run(
    size_mib: int, work: Path, seed: int, children: list[subprocess.Popen[str]]
) -> dict[str, Any]:
    from tools.examplerepo import ROOT_JSON

    size = size_mib * MiB
    raw = work / "raw.img"
    started = time.monotonic()
    log(f"building a {size_mib} MiB image in {work}")
    raw_sha256 = build_image(raw, size, seed)
    log(f"signing the repository (zstd) after {time.monotonic() - started:.1f}s")
    repo = build_repository(work, raw)
    target = next((repo / "targets").rglob("*.zst"))
    slot_size = size + MiB
    disk = work / "disk.img"
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(SLOT_A_OFFSET + 2 * slot_size + MiB)
    slot_b_offset = SLOT_A_OFFSET + slot_size
    server, url = serve(repo)
    try:
        log("dd (first, allocates the slot's blocks)")
        dd_first = dd(raw, disk, slot_b_offset)
        spec = {"disk": str(disk), "slot_size": slot_size, "url": url,
                "root": str(ROOT_JSON), "cache": str(work / "tuf-cache")}  # fmt: skip
        installs: list[dict[str, Any]] = []
        dds = [dd(raw, disk, slot_b_offset)]
        for n, child in enumerate(children, 1):
            log(f"run {n}/{len(children)}: install (child process), then dd")
            installs.append(_install(child, spec))
            dds.append(dd(raw, disk, slot_b_offset))
    finally:
        server.shutdown()
        server.server_close()
    with disk.open("rb") as f:  # every run wrote the same bytes: check the slot
        f.seek(slot_b_offset)
        check = hashlib.sha256()
        left = size
        while left:
            data = f.read(min(left, 8 * MiB))
            check.update(data)
            left -= len(data)
    # Medians: this VM's disk is shared and noisy; every sample is reported too.
    install_all = [float(m["install_seconds"]) for m in installs]
    ratios = [t / ((dds[i] + dds[i + 1]) / 2) for i, t in enumerate(install_all)]
    install_s = statistics.median(install_all)
    dd_s = statistics.median(dds)
    return {
        "size_mib": size_mib,
        "runs": len(installs),
        "compressed_mib": round(target.stat().st_size / MiB, 1),
        "install_seconds": round(install_s, 3),
        "install_seconds_all": [round(t, 3) for t in install_all],
        "install_write_seconds_all": [round(float(m["write_seconds"]), 3) for m in installs],
        "install_verify_seconds_all": [round(float(m["verify_seconds"]), 3) for m in installs],
        "install_mib_per_s": round(size_mib / install_s, 1),
        "peak_rss_mib": round(max(float(m["peak_rss_mib"]) for m in installs), 1),
        "peak_rss_vm_hwm_mib": round(max(float(m["vm_hwm_mib"]) for m in installs), 1),
        "dd_first_seconds": round(dd_first, 3),
        "dd_seconds": round(dd_s, 3),
        "dd_seconds_all": [round(d, 3) for d in dds],
        "ratio_install_to_dd": round(statistics.median(ratios), 3),
        "ratio_install_to_dd_all": [round(r, 3) for r in ratios],
        "slot_ok": check.hexdigest() == raw_sha256,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--keep-dir", type=Path, help="work here and keep the files")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="install+dd pairs (median)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(install_child()))
        return 0
    if args.size_mib <= 0 or args.runs <= 0:
        parser.error("--size-mib and --runs must be positive")
    if args.keep_dir:
        args.keep_dir.mkdir(parents=True, exist_ok=True)
        result = run(args.size_mib, args.keep_dir, args.seed, args.runs)
    else:
        # /var/tmp: on disk, not a tmpfs, so dd and the install really write a disk.
        with tempfile.TemporaryDirectory(prefix="bench-install-", dir="/var/tmp") as tmp:
            result = run(args.size_mib, Path(tmp), args.seed, args.runs)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
