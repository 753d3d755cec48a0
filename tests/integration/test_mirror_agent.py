"""The agent installs through a mirror: `update-mirror serve` (console script), a real
nginx configured with the block from docs/mirror.md, and an exported tree read via
`updater install --from` (file://). Plus publish races: a reader that is between
timestamp and snapshot, or between metadata and image, when a sync publishes; and two
agents installing while a sync publishes. All servers listen on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import requests

import mirror
from core.repository import Repository, RequestsFetcher
from tests.agentnode import BIN, LAYOUTS, MiB, Node, node
from tests.conftest import require_tool, run_tool
from tests.signing_helpers import ROOT_JSON, ImageSpec, add_release, publish
from updater.boot.grub import initial_grubenv
from updater.disk.grubenv import write_grubenv

__all__ = ["node"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "mirror.md"


@dataclass
class MirrorNode(Node):
    """A node whose repository URLs point at a mirror instead of upstream."""

    mirror_url: str = ""

    def write_config(self, booted: str) -> None:
        super().write_config(booted)
        text = self.config.read_text()
        self.config.write_text(text.replace(self.server.url, self.mirror_url))


def via(n: Node, url: str) -> MirrorNode:
    return MirrorNode(**{f.name: getattr(n, f.name) for f in fields(n)}, mirror_url=url)


def sync(n: Node, mdir: Path, **kw: Any) -> mirror.SyncResult:
    return mirror.sync(
        f"{n.server.url}/metadata",
        f"{n.server.url}/targets",
        mdir,
        ROOT_JSON,
        backoff=0.0,
        allow_example_keys=True,
        **kw,
    )


def new_release(n: Node, version: str) -> None:
    img = n.root / f"v{version}.img"
    img.write_bytes(random.Random(version).randbytes(2 * MiB + 4096))
    n.images[version] = img
    add_release(n.repo, [ImageSpec(img, version)])
    publish(n.repo)


@contextlib.contextmanager
def serving(mdir: Path) -> Iterator[str]:
    """`update-mirror serve` as a real process on an ephemeral 127.0.0.1 port."""
    proc = subprocess.Popen(
        [str(BIN / "update-mirror"), "serve", str(mdir), "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), proc.stderr.read() if proc.stderr else line
        yield line.rsplit(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_server_block(mdir: Path, port: int) -> str:
    """The documented nginx server block, with the mirror path and port substituted."""
    block = DOCS.read_text().split("```nginx\n", 1)[1].split("```", 1)[0]
    assert "root /srv/mirror/current;" in block and "listen 8080;" in block
    return block.replace("/srv/mirror", str(mdir)).replace(
        "listen 8080;", f"listen 127.0.0.1:{port};"
    )


@contextlib.contextmanager
def nginx(mdir: Path, work: Path) -> Iterator[str]:
    binary = require_tool("nginx")
    work.mkdir()
    port = free_port()
    temp = "\n".join(
        f"    {k}_temp_path {work}/{k};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (work / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
{nginx_server_block(mdir, port)}
}}
""")
    proc = subprocess.Popen(
        [binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Wait until it listens (or has died), bounded in time: a refused connection
        # returns at once, so 500 bare attempts were ~50 ms - too short for an nginx
        # starting on a loaded machine (failed once in a fresh chroot).
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "error.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            assert time.monotonic() < deadline, "nginx did not start listening within 60 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def assert_serves_ranges(base: str, mdir: Path) -> None:
    """Content-Length, HEAD, Range (a-b, a-, suffix) and 416 on a mirrored image."""
    image = next((mdir / "current" / "targets").rglob("*.zst"))
    data = image.read_bytes()
    url = f"{base}/targets/{image.relative_to(mdir / 'current' / 'targets')}"
    full = requests.get(url, timeout=10)
    assert full.status_code == 200 and full.content == data
    assert int(full.headers["Content-Length"]) == len(data)
    head = requests.head(url, timeout=10)
    assert int(head.headers["Content-Length"]) == len(data)
    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = requests.get(url, headers={"Range": f"bytes={len(data) - 10}-"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-10:]
    suffix = requests.get(url, headers={"Range": "bytes=-7"}, timeout=10)
    assert suffix.status_code == 206 and suffix.content == data[-7:]
    bad = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert bad.status_code == 416
    assert requests.get(f"{base}/../manifests/1.json", timeout=10).status_code in (400, 404)


def assert_installed(n: Node, version: str, result: dict[str, object]) -> None:
    assert result["version"] == version and result["slot"] == "B"
    assert n.holds("B", version)


def test_agent_installs_through_update_mirror_serve(node: Node, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    sync(node, mdir)
    with serving(mdir) as url:
        assert_serves_ranges(url, mdir)
        result = via(node, url).ok("install")
    assert_installed(node, "2.0.0", result)


def test_agent_installs_through_nginx(node: Node, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    sync(node, mdir)
    with nginx(mdir, tmp_path / "nginx") as url:
        assert_serves_ranges(url, mdir)
        result = via(node, url).ok("install")
        # A publish is picked up on the next request, through the symlink.
        new_release(node, "3.0.0")
        sync(node, mdir)
        check = via(node, url).ok("check")
    assert_installed(node, "2.0.0", result)
    assert check["version"] == "3.0.0"


def test_agent_installs_from_an_exported_tree(node: Node, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    new_release(node, "3.0.0")
    sync(node, mdir)
    usb = tmp_path / "usb"
    done = subprocess.run(
        [
            str(BIN / "update-mirror"),
            "export",
            str(mdir),
            str(usb),
            "--hardware",
            "x86_64-efi",
            "--version",
            "2.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    readme = (usb / "README.txt").read_text()
    assert "updater install --from" in readme and "2.0.0" in readme and "timestamp" in readme
    assert len(list((usb / "targets").rglob("*.zst"))) == 1  # only the chosen release
    # The node is offline: its configured upstream is stopped.
    node.server.stop()
    result = node.ok("install", "--from", str(usb), "--version", "2.0.0")
    assert_installed(node, "2.0.0", result)


class PausingFetcher(RequestsFetcher):
    """Runs `hook` once, right after the first fetch of a URL ending with `suffix`."""

    def __init__(self, suffix: str, hook: Callable[[], object]) -> None:
        super().__init__()
        self.suffix, self.hook, self.fired = suffix, hook, False

    def _fetch(self, url: str) -> Iterator[bytes]:
        data = b"".join(super()._fetch(url))
        if url.endswith(self.suffix) and not self.fired:
            self.fired = True
            self.hook()
        return iter([data])


def test_publish_between_timestamp_and_snapshot_is_consistent(node: Node, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    sync(node, mdir)
    new_release(node, "3.0.0")
    with serving(mdir) as url:
        fetcher = PausingFetcher("/timestamp.json", lambda: sync(node, mdir))
        repo = Repository(
            f"{url}/metadata",
            f"{url}/targets",
            ROOT_JSON,
            tmp_path / "reader",
            fetcher=fetcher,
            allow_example_keys=True,
        )
        repo.refresh()
        assert (
            fetcher.fired and json.loads((mdir / "manifests" / "2.json").read_text())["number"] == 2
        )
        targets = repo.targets()  # the old state's snapshot and targets, still served
        (path,) = (p for p in targets if not p.endswith(".index"))
        assert len(b"".join(repo.stream_target(targets[path]))) == targets[path].length
        fresh = Repository(
            f"{url}/metadata", f"{url}/targets", ROOT_JSON, tmp_path / "r2", allow_example_keys=True
        )
        assert len(fresh.targets()) == 4  # two images, each with its chunk index


def test_publish_that_prunes_between_metadata_and_image_is_consistent(
    node: Node, tmp_path: Path
) -> None:
    mdir = tmp_path / "mirror"
    sync(node, mdir)
    with serving(mdir) as url:
        repo = Repository(
            f"{url}/metadata",
            f"{url}/targets",
            ROOT_JSON,
            tmp_path / "reader",
            allow_example_keys=True,
        )
        (target,) = (t for p, t in repo.targets().items() if not p.endswith(".index"))
        new_release(node, "3.0.0")
        assert sync(node, mdir, keep=1).releases[0]["version"] == "3.0.0"
        # 2.0.0 is no longer mirrored, but a reader that chose it still gets it whole.
        assert len(b"".join(repo.stream_target(target))) == target.length


def second_node(first: Node, root: Path) -> Node:
    """Another node (own disk, grubenv, journal) of the same fleet as `first`."""
    root.mkdir()
    disk = root / "disk.img"
    subprocess.run(
        [BIN / "updater", "layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk, "--size", "1G"],
        check=True,
        capture_output=True,
    )
    grubenv = root / "grubenv"
    write_grubenv(grubenv, initial_grubenv("A"))
    (root / "os-release").write_text('NAME="node"\nIMAGE_VERSION="1.0.0"\n')
    made = Node(root, disk, grubenv, first.server, first.repo, images=first.images)
    made.write_slot("A", first.images["1.0.0"])
    return made


def test_two_agents_install_while_a_sync_publishes(node: Node, tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    sync(node, mdir)
    other = second_node(node, tmp_path / "node2")
    new_release(node, "3.0.0")
    with serving(mdir) as url:
        nodes = [via(node, url), via(other, url)]
        for n in nodes:
            n.write_config("A")
        procs = [
            subprocess.Popen(
                [str(BIN / "updater"), "--config", str(n.config), "--json", "install"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in nodes
        ]
        published = sync(node, mdir)
        outs = [p.communicate(timeout=120) for p in procs]
    assert published.downloaded == [
        "x86_64-efi/3.0.0/root.img.zst",
        "x86_64-efi/3.0.0/root.index",
    ]
    for n, p, (out, err) in zip(nodes, procs, outs, strict=True):
        assert p.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        # Either release is fine; a mix (or an unverified image) is not.
        assert result["version"] in ("2.0.0", "3.0.0")
        assert_installed(n, result["version"], result)
    mirror.verify(mdir, ROOT_JSON, allow_example_keys=True)
    run_tool("grub-editenv", node.grubenv, "list")
