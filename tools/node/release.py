"""Release images of the e2e node: one ext4 root filesystem per (version, behaviour).

A release is the base rootfs plus the agent (project source + its wheels), the agent's
config, the test init, /etc/os-release with VERSION_ID=<version>, and a health check
that passes or fails. `panic=True` makes a release whose /sbin/init exits at once, so
the kernel panics ("Attempted to kill init!") before any user space runs - the case
GRUB's one-try bookkeeping must survive.

Invariants: the kernel is inside the image (/boot/vmlinuz), so installing a release
replaces the kernel too; the filesystem label is the slot's (`root_a`/`root_b`,
what the GRUB script searches for); the agent config is validated on the host with
the project's own `updater.config.parse_config` before it goes into an image; every
input of an image is part of its cache key, so editing updater/ rebuilds it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from tools.node.cache import REPO, Key, cached, default_cache_dir
from tools.node.rootfs import base_rootfs, python_deps, run

GUEST = Path(__file__).parent / "guest"
PROJECT_PACKAGES = ("core", "updater")  # what a node runs: the agent and its core
DEFAULT_BOOT_COMMANDS = ("updater health-check",)
DEFAULT_TRUSTED_ROOT = REPO / "keys-example" / "root.json"
HARDWARE = "e2e-qemu-x86_64"
NODE_DISK = "/dev/nvme0n1"  # the node disk is NVMe: the kernel's driver is built in
Health = Literal["pass", "fail"]

CONFIG = """\
# Agent configuration of the ab-updater e2e test node (tools/node/release.py).
[repository]
metadata_url = "file:///mnt/updates/metadata/"
targets_url = "file:///mnt/updates/targets/"
trusted_root = "/etc/updater/root.json"
allow_example_keys = true  # a test node: its releases are signed with keys-example/

[device]
hardware = "{hardware}"
disk = "{disk}"
bootloader = "grub"
grubenv = "/boot/efi/EFI/BOOT/grubenv"
state_dir = "/var/lib/updater"

[slots.A]
root = "root_a"

[slots.B]
root = "root_b"

[health]
deadline = 8
interval = 1
checks = [{{ command = ["/usr/libexec/e2e/health-check"], timeout = 10 }}]

[hooks]
reboot = ["/usr/sbin/reboot"]
"""

# Written to /dev/console: the agent may capture a check's output, the test reads it.
HEALTH = {
    "pass": "#!/bin/sh\n# e2e release health check: this release is healthy.\n"
    'echo "E2E: health-check pass version={version}" >/dev/console\nexit 0\n',
    "fail": "#!/bin/sh\n# e2e release health check: this release was built to fail it.\n"
    'echo "E2E: health-check fail version={version}" >/dev/console\nexit 1\n',
}
BROKEN_INIT = (
    "#!/bin/sh\n# e2e release built to panic: PID 1 exits, the kernel panics.\n"
    'echo "E2E: broken init version={version}"\nexit 1\n'
)


def release_version(version: int | str) -> str:
    """The agent's version string: 2 -> "2.0.0"; a string must be MAJOR.MINOR.PATCH[-PRE]."""
    from core.release import parse_version

    text = f"{version}.0.0" if isinstance(version, int) else version
    return parse_version(text).text


def agent_config(*, hardware: str = HARDWARE, disk: str = NODE_DISK) -> str:
    """The node's /etc/updater/config.toml."""
    return CONFIG.format(hardware=hardware, disk=disk)


def build_release(
    version: int | str,
    *,
    cache: Path | None = None,
    label: str = "root_a",
    health: Health = "pass",
    panic: bool = False,
    boot_commands: tuple[str, ...] = DEFAULT_BOOT_COMMANDS,
    trusted_root: Path = DEFAULT_TRUSTED_ROOT,
    config: str | None = None,
) -> Path:
    """The ext4 image (a file) of release `version`, labelled `label`, built or cached.

    `version` 2 means "2.0.0"; it becomes IMAGE_VERSION and VERSION_ID in os-release.
    """
    cache = cache or default_cache_dir()
    version = release_version(version)
    config_text = agent_config() if config is None else config
    _validate_config(config_text)
    base = base_rootfs(cache)
    deps = python_deps(cache)
    key = (
        Key("release")
        .text(base.name, deps.name, str(version), label, health, panic, boot_commands)
        .text(config_text, trusted_root.read_bytes())
        .files([Path(__file__)])
        .tree(GUEST, suffixes=("",))
    )
    for package in PROJECT_PACKAGES:
        key.tree(REPO / package)

    def build(out: Path) -> None:
        stage = out / "stage"
        run("cp", "-a", base / "rootfs", stage)
        _install_agent(stage, deps / "site")
        _configure(stage, str(version), health, panic, boot_commands, config_text, trusted_root)
        _mkfs(stage, out / "root.ext4", label)
        shutil.rmtree(stage)

    return cached(cache, key, build) / "root.ext4"


def _validate_config(text: str) -> None:
    from updater.config import parse_config

    parse_config(text, Path("/etc/updater/config.toml"))


def _install_agent(root: Path, site: Path) -> None:
    lib = root / "usr/lib/ab-updater"
    lib.mkdir(parents=True)
    run("cp", "-a", site, lib / "site")
    for package in PROJECT_PACKAGES:
        shutil.copytree(
            REPO / package, lib / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    (root / "usr/lib/python3/dist-packages/ab-updater.pth").write_text(
        "/usr/lib/ab-updater\n/usr/lib/ab-updater/site\n"
    )
    _install(GUEST / "updater", root / "usr/bin/updater")
    # The root filesystem is mounted read-only: compile now (host and guest are 3.11).
    # -s/-p: each .pyc names its node path, not the stage's (which differs per release)
    run(
        sys.executable, "-m", "compileall", "-q", "-j0",
        "--invalidation-mode", "unchecked-hash", "-s", root, "-p", "/", lib,
    )  # fmt: skip


def _configure(
    root: Path,
    version: str,
    health: Health,
    panic: bool,
    boot_commands: tuple[str, ...],
    config: str,
    trusted_root: Path,
) -> None:
    os_release = (
        'NAME="ab-updater e2e node"\nID=ab-updater-e2e\nID_LIKE=debian\n'
        f'VERSION="{version} (e2e)"\nVERSION_ID={version}\n'
        f"IMAGE_ID=ab-updater-e2e\nIMAGE_VERSION={version}\n"
        f'PRETTY_NAME="ab-updater e2e node {version}"\n'
    )
    for rel in ("etc/os-release", "usr/lib/os-release"):
        (root / rel).unlink(missing_ok=True)
        (root / rel).write_text(os_release)
    (root / "etc/updater/config.toml").write_text(config)
    shutil.copyfile(trusted_root, root / "etc/updater/root.json")
    (root / "etc/e2e/boot-commands").write_text("".join(f"{c}\n" for c in boot_commands))
    (root / "etc/hostname").write_text(f"e2e-node-v{version}\n")
    (root / "usr/libexec/e2e").mkdir(parents=True, exist_ok=True)
    _write_exec(root / "usr/libexec/e2e/health-check", HEALTH[health].format(version=version))
    for name in ("reboot", "poweroff"):
        _install(GUEST / name, root / "usr/sbin" / name)
    init = root / "sbin/init"
    init.unlink(missing_ok=True)
    if panic:
        _write_exec(init, BROKEN_INIT.format(version=version))
    else:
        _install(GUEST / "init", init)


def _install(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    _write_exec(dst, src.read_text())


def _write_exec(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _mkfs(tree: Path, image: Path, label: str) -> None:
    used = int(subprocess.run(["du", "-sb", tree], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    mib = 1 << 20
    size = (used * 5 // 4 + 24 * mib + 4 * mib - 1) // (4 * mib) * (4 * mib)
    with image.open("wb") as f:
        f.truncate(size)
    run(
        "mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-J", "size=4",
        "-E", "root_owner=0:0", "-d", tree, image,
    )  # fmt: skip


def relabel(image: Path, label: str, out: Path) -> Path:
    """A copy of the ext4 `image` with filesystem label `label` (slot A <-> slot B)."""
    run("cp", "--sparse=always", image, out)
    run("tune2fs", "-L", label, out)
    return out
